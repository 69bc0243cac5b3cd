"""TokLIP configuration: the VQGAN, the token encoder and its teacher, and the two training stages.

Defaults are the paper's 256 px setting (LlamaGen's VQ-16, SigLIP2 so400m, Table A1) with the contrastive
set-up of TencentARC/TokLIP's training code (gathered batch, learned logit scale, x1000 distillation,
canonicalised captions); configs/tiny.yaml shrinks everything. Saved in every TokLIP directory's config.json,
so loading needs no hub access.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from semhitok.common.config_io import ConfigError, check_min, check_positive, check_range


@dataclass
class VQGANConfig:
    """LlamaGen's VQ-16 (vqgan.py): the defaults are its ModelArgs, named after our modules (LlamaGen's name after
    each field). image_size is not in its weights: the conv net runs at any multiple of the downsampling."""

    image_size: int = 256
    codebook_size: int = 16384  # codebook_size
    code_dim: int = 8  # codebook_embed_dim; codes and features l2-normalised (codebook_l2_norm)
    channels: int = 128  # ch
    channel_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])  # encoder_ch_mult = decoder_ch_mult
    res_blocks: int = 2  # num_res_blocks (the decoder has one more per level)
    z_channels: int = 256  # z_channels

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
    # A trained VQGAN instead of stage 1: our VQGAN directory (config.json model_type "vqgan" + model.safetensors),
    # or LlamaGen's released checkpoint (vq_ds16_t2i.pt, read with weights_only=True, or its state dict as
    # .safetensors), converted by llamagen.py into <run_dir>/tokenizer/toklip_vqgan/final (the paper's set-up).
    vqgan_pretrained: str = ""

    # Teacher and token-encoder initialisation: a SiglipModel (text + vision towers) by HF name or local path,
    # or "random": a random SiglipModel of vision_config / text_config (tiny preset and tests). Filled in from
    # the loaded teacher and saved.
    teacher: str = "google/siglip2-so400m-patch16-256"
    vision_config: dict | None = None
    text_config: dict | None = None
    # The teacher's text tokenizer: empty = the teacher directory's; "bytes" = UTF-8 bytes + 3 specials
    # (for a random text tower, whose vocab_size must then be >= 259).
    text_tokenizer: str = ""
    text_max_length: int = 64  # the repo's context_length for SigLIP2
    # Captions before tokenizing: "canonicalize" as the repo's SigLIP2 configs (open_clip's canonicalize_text: "_"
    # to space, ASCII punctuation removed, lowercase, whitespace collapsed), "none" as given; "auto": canonicalize
    # with the teacher's own tokenizer, none with "bytes" (our stage-0 teachers learn raw captions).
    caption_clean: Literal["auto", "canonicalize", "none"] = "auto"

    # Token encoder: 2-layer MLP (code_dim -> mlp_ratio*width -> width, GELU; the paper's A.1) then the teacher's
    # ViT layers with causal attention (causal=false: the paper's bidirectional ablation).
    mlp_ratio: int = 4
    causal: bool = True
    # What the MLLM's adapter reads per image position (input_features): "concat" = the paper's fusion (Table 7):
    # the causal encoder's feature [c] and the VQ code vector [code_dim], one adapter MLP each, outputs
    # concatenated; "vqgan" = the plain-VQGAN baseline of Table 7: the code vector alone (a per-id lookup).
    llm_inputs: Literal["concat", "vqgan"] = "concat"

    # Encoder stage (Table A1; loss as the repo's DistillClipLoss): InfoNCE between the l2-normalised pooled z and
    # the teacher's text features, gathered over all ranks, at a learned logit scale (exp of a trained scalar,
    # initialised to 1/0.07, clamped to <= logit_scale_max after every step), plus distill_weight x MSE between
    # the l2-normalised z and the teacher's l2-normalised image features (the repo's x1000).
    logit_scale_init: float = 1 / 0.07
    logit_scale_max: float = 100.0
    contrast_weight: float = 1.0
    distill_weight: float = 1000.0
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
        check_positive(self, "encoder_lr")
        check_range(self, 1.0, 1e4, "logit_scale_max")
        if not 1.0 <= self.logit_scale_init <= self.logit_scale_max:
            raise ConfigError(f"toklip.logit_scale_init: {self.logit_scale_init} is not in [1, logit_scale_max="
                              f"{self.logit_scale_max}] (the repo clamps log scale to [0, ln 100])")
        if self.teacher == "random" and (self.vision_config is None or self.text_config is None):
            raise ConfigError("toklip.teacher=random needs toklip.vision_config and toklip.text_config")
