"""TokLIP configuration: the VQGAN, the token encoder and its teacher, and the two training stages.

Defaults are the paper's 256 px setting (LlamaGen's VQGAN, SigLIP2 so400m, Table A1); configs/tiny.yaml
shrinks everything. Saved in every TokLIP directory's config.json, so loading needs no hub access.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from semhitok.common.config_io import ConfigError, check_min, check_positive


@dataclass
class VQGANConfig:
    """LlamaGen's VQ-16 design: conv encoder/decoder, l2-normalised codebook of 16,384 codes of 8 dims."""

    image_size: int = 256
    codebook_size: int = 16384
    code_dim: int = 8
    channels: int = 128
    channel_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])  # one downsampling between levels
    res_blocks: int = 2
    z_channels: int = 256

    def __post_init__(self) -> None:
        check_min(self, 1, "image_size", "codebook_size", "code_dim", "channels", "res_blocks", "z_channels")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ConfigError(f"vqgan.channel_mult: a non-empty list of positive ints, got {self.channel_mult}")
        if self.image_size % self.downsample:
            raise ConfigError(f"vqgan.image_size: {self.image_size} is not a multiple of the downsampling {self.downsample}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def grid(self) -> int:
        return self.image_size // self.downsample


@dataclass
class TokLIPConfig:
    vqgan: VQGANConfig = field(default_factory=VQGANConfig)
    # A trained VQGAN directory (config.json model_type "vqgan" + model.safetensors) to use instead of training
    # one (the paper uses LlamaGen's released weights, which need a conversion this project does not ship).
    vqgan_dir: str = ""

    # Teacher and token-encoder initialisation: a SiglipModel (text + vision towers) by HF name or local path,
    # or "random": a random SiglipModel of vision_config / text_config (tiny preset and tests). Filled in from
    # the loaded teacher and saved.
    teacher: str = "google/siglip2-so400m-patch16-256"
    vision_config: dict | None = None
    text_config: dict | None = None
    # The teacher's text tokenizer: empty = the teacher directory's; "bytes" = UTF-8 bytes + 3 specials
    # (for a random text tower, whose vocab_size must then be >= 259).
    text_tokenizer: str = ""
    text_max_length: int = 64

    # Token encoder: 2-layer MLP (code_dim -> mlp_ratio*width -> width, GELU; the paper's A.1) then the teacher's
    # ViT layers with causal attention (causal=false: the paper's bidirectional ablation).
    mlp_ratio: int = 4
    causal: bool = True

    # Encoder stage (Table A1): InfoNCE against the teacher's text features + MSE to its image features.
    temperature: float = 0.07  # fixed InfoNCE temperature (ours: only the MLP and the token encoder train)
    contrast_weight: float = 1.0
    distill_weight: float = 1.0
    # Steps of each stage; batch, lr and the rest of the VQGAN stage come from tokenizer_train.
    vqgan_steps: int = 40_000
    encoder_steps: int = 100_000
    encoder_lr: float = 1e-5
    encoder_weight_decay: float = 0.1
    encoder_warmup_steps: int = 500
    encoder_batch_size: int = 0  # 0: tokenizer_train.batch_size

    def __post_init__(self) -> None:
        check_min(self, 1, "text_max_length", "mlp_ratio", "vqgan_steps", "encoder_steps")
        check_min(self, 0, "contrast_weight", "distill_weight", "encoder_weight_decay", "encoder_warmup_steps",
                  "encoder_batch_size")
        check_positive(self, "temperature", "encoder_lr")
        if self.teacher == "random" and (self.vision_config is None or self.text_config is None):
            raise ConfigError("toklip.teacher=random needs toklip.vision_config and toklip.text_config")
