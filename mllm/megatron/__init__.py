"""The Megatron-Core backend of the unified LLM (mllm_train.backend=megatron): the same model as mllm/model.py's
SemHiTokLM with its base LM as megatron-core's GPTModel, for tensor and pipeline parallelism past ZeRO-3.

    convert.py   HF Qwen2/Qwen2.5/LLaMA weights <-> GPTModel weights (fused QKV by query groups, SwiGLU fc1,
                 tied/untied head, vocabulary padded to a multiple of 128 x TP), both ways
    model.py     the GPTModel built from a transformers config, with the adapter's visual embeddings and the
                 per-document attention mask of packed rows
    cpu.py       the three CUDA assumptions of megatron-core 0.16 bypassed on CPU (tests, gloo): never imported on GPU

Needs the `megatron` extra (megatron-core); nothing else in the package imports this one.
"""
