"""SemHiTok MLLM config for transformers' remote code (AutoConfig with trust_remote_code=True).

Self-contained: copied into every export beside modeling_semhitok.py and processing_semhitok.py.
The base LLM's own config (Qwen2, LLaMA, ...) is `text_config`; the rest describes the visual vocabulary:
ids [0, text_vocab_size) are text, id text_vocab_size + h is visual id h, whose input embedding comes from
the adapter (semantic code h // codes_per_group, pixel code h), never from the embedding table. A text reply
holds ids below text_tokens (the tokenizer's size; the rows up to text_vocab_size are padding).
"""

from transformers import AutoConfig, PretrainedConfig


class SemHiTokMLLMConfig(PretrainedConfig):
    model_type = "semhitok_mllm"
    sub_configs = {"text_config": AutoConfig}

    def __init__(self, text_config=None, text_vocab_size: int = 0, visual_vocab_size: int = 0, image_start: int = 0,
                 image_end: int = 0, codes_per_group: int = 1, sem_code_dim: int = 1, pix_code_dim: int = 1,
                 adapter_hidden: int = 1, adapter_inputs: str = "both", image_grid: int = 0, text_tokens: int = 0, **kwargs):
        if isinstance(text_config, dict):
            text_config = dict(text_config)
            text_config = AutoConfig.for_model(text_config.pop("model_type", "qwen2"), **text_config)
        self.text_config = text_config
        self.text_vocab_size, self.visual_vocab_size, self.text_tokens = text_vocab_size, visual_vocab_size, text_tokens
        self.image_start, self.image_end, self.image_grid = image_start, image_end, image_grid
        self.codes_per_group, self.sem_code_dim, self.pix_code_dim = codes_per_group, sem_code_dim, pix_code_dim
        self.adapter_hidden, self.adapter_inputs = adapter_hidden, adapter_inputs
        if text_config is not None:
            kwargs.setdefault("tie_word_embeddings", getattr(text_config, "tie_word_embeddings", False))
        super().__init__(**kwargs)
