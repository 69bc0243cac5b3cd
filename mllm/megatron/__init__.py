"""The Megatron-Core backend of the unified LLM (mllm_train.backend=megatron, docs/megatron.md): the same model as
mllm/model.py's SemHiTokLM with its base as megatron-core's GPTModel, for tensor parallelism past ZeRO-3.

    convert.py   HF Qwen2/Qwen2.5/LLaMA weights <-> GPTModel weights (fused QKV by query groups, SwiGLU fc1,
                 tied/untied head, vocabulary padded to a multiple of 128 x TP), both ways
    model.py     MegatronLM: this rank's GPTModel beside the adapter, per-document attention of packed rows,
                 vocabulary-parallel cross-entropy; TP slicing and gathering of full state dicts
    engine.py    the training step (DP gradient averaging, TP-aware clipping); dist_checkpointing checkpoints
                 loadable at any TP, PP and DP
    train.py     the training loop of `semhitok train` with mllm_train.backend=megatron, export to the usual format
    cpu.py       the CUDA assumptions of megatron-core 0.16 bypassed on CPU (tests, gloo): a no-op on GPU

Needs the `megatron` extra (megatron-core); nothing outside this package imports it.
"""
