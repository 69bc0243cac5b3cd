"""DualToken's configuration: the `dualtoken` section of the run config, saved with every checkpoint.

Defaults are the paper's 384 px setting (sec. 3.2, 4.1): SigLIP so400m/14-384 (27 layers), reconstruction on
the features after layer 6, semantics at layer 26, residual depth 8. The paper gives neither codebook sizes
nor code widths nor the pixel decoder.

`variant` picks whose reading of the unspecified parts is built:
  paper    (ours, the default): per-depth codebooks of 64 dims, linear code projections, a ViT-B pixel decoder on
           the tower's grid (15 px patches on a 405 px canvas at 384), L_sem = ||F - F_0||^2 on the layer-26
           features, loss weights 1 (recon) / 1 (semantic) / 0.25 (commitment).
  official (the authors' repo, github.com/songweii/DualToken, model_config_siglip_384_rvq8_32d and
           src/open_clip_train/train.py): one codebook shared by the 8 depths, 32 dims; attention projections
           (AttnProjection: attention + linear skip + GeGLU MLP) into and out of both code spaces; a layer-4
           shortcut (its projection x 0.6) added to the layer-6 pixel features; the quantized semantic features
           replace layer 26's output and run through the tower's remaining layers and its pooling head, whose
           pooled feature is matched to the initial tower's (MSE + cosine); a VQGAN-style conv decoder on the
           27x27 latent resized to 24x24 (x16 up to 384); recon and commitment weights x5. Its optional first
           stage freezes the tower's embeddings and layers 1..26 (`freeze_tower`). Not reproduced: the repo's
           adaptive GAN weight (|grad recon| / |grad G| at the last conv, clamped to [0.3, 10], x0.75); the GAN
           term here is tokenizer_train.gan_weight as for every kind.
Fields left None take the variant's value (code widths, loss weights, the shortcut)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from semhitok.common.config_io import ConfigError, check_min, check_range

# the variant's value of each field left None
VARIANT_DEFAULTS = {
    "paper": dict(sem_code_dim=64, pix_code_dim=64, recon_weight=1.0, semantic_weight=1.0, commit_weight=0.25,
                  shortcut_layer=0),
    "official": dict(sem_code_dim=32, pix_code_dim=32, recon_weight=5.0, semantic_weight=1.0, commit_weight=5.0),
}


@dataclass
class DualTokenConfig:
    # paper (ours) or official (the authors' repo): see the module docstring
    variant: Literal["paper", "official"] = "paper"

    # The vision tower both vocabularies come from: a SigLIP vision tower by HF name or local path (a full
    # SiglipModel dir works too), or "random" with siglip_config (tiny preset, tests). Same loading as SemHiTok's
    # teacher (tokenizer/siglip.py load_teacher); siglip_config is filled in from the loaded tower and saved.
    teacher: str = "google/siglip-so400m-patch14-384"
    siglip_config: dict | None = None

    # Hidden-state indices (hidden_states[k] = output of layer k; 0 = patch embeddings). Reconstruction reads
    # hidden_states[pixel_layer] (layers 1..pixel_layer get its gradient); semantics read
    # hidden_states[semantic_layer]. paper: the tower is cut after semantic_layer (no pooling head: ours);
    # official: the whole tower with its head (the pooled semantic loss runs through it).
    pixel_layer: int = 6
    semantic_layer: int = 26
    # official: hidden_states[shortcut_layer], projected to the pixel code space, x shortcut_weight, is added to
    # the pixel features before quantization (0: no shortcut). None: paper 0; official pixel_layer - 2 (the repo's
    # 4 under layer 6), 0 when that is below 1 (the tiny tower)
    shortcut_layer: int | None = None
    shortcut_weight: float = 0.6

    depth: int = 8  # D: residual codes per position in each vocabulary
    sem_codebook_size: int = 16384
    sem_code_dim: int | None = None
    pix_codebook_size: int = 16384
    pix_code_dim: int | None = None
    ema_decay: float = 0.99
    # a code whose EMA usage (assignments per step) falls below this is restarted from a current residual
    dead_code_threshold: float = 0.03

    # paper's pixel decoder (tokenizer/vit.py Transformer over the tower's grid): ViT-B, as SemHiTok's default
    decoder_width: int = 768
    decoder_heads: int = 12
    decoder_layers: int = 12
    # official's conv decoder (tokenizer/dualtoken/conv_decoder.py): the grid x grid latent resized to
    # decoder_latent^2, a residual block to conv_in_channels, then len(conv_ch_mult) - 1 x2 upsamplings of
    # conv_res_blocks + 1 residual blocks each (attention at the latent resolution); image = latent * 2^(levels-1)
    decoder_latent: int = 24
    conv_channels: int = 128
    conv_ch_mult: list[int] = field(default_factory=lambda: [1, 1, 4, 4, 8])
    conv_in_channels: int = 1024
    conv_res_blocks: int = 2

    # Loss weights (paper eq. 2-4): lambda_1 recon (pixel L2; perceptual and GAN weights come from
    # tokenizer_train), lambda_2 semantic, lambda_3 commitment (both vocabularies)
    recon_weight: float | None = None
    semantic_weight: float | None = None
    commit_weight: float | None = None
    # official's optional first stage: the tower's embeddings and layers 1..semantic_layer frozen (the
    # projections, codebooks, decoder and, official, the layers above semantic_layer and the head train)
    freeze_tower: bool = False

    def __post_init__(self) -> None:
        if self.variant not in VARIANT_DEFAULTS:
            raise ConfigError(f"variant: {self.variant!r} is not one of {tuple(VARIANT_DEFAULTS)}")
        for name, value in VARIANT_DEFAULTS[self.variant].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.shortcut_layer is None:
            self.shortcut_layer = max(0, self.pixel_layer - 2) if self.variant == "official" else 0
        check_min(self, 1, "pixel_layer", "depth", "sem_codebook_size", "sem_code_dim", "pix_codebook_size",
                  "pix_code_dim", "decoder_width", "decoder_heads", "decoder_layers", "decoder_latent",
                  "conv_channels", "conv_in_channels")
        check_min(self, 0, "dead_code_threshold", "recon_weight", "semantic_weight", "commit_weight", "shortcut_layer",
                  "shortcut_weight", "conv_res_blocks")
        check_range(self, 0, 1, "ema_decay")
        if self.semantic_layer <= self.pixel_layer:
            raise ConfigError(f"semantic_layer={self.semantic_layer} must be deeper than pixel_layer={self.pixel_layer}")
        if self.shortcut_layer > self.semantic_layer:
            raise ConfigError(f"shortcut_layer={self.shortcut_layer} must not be deeper than semantic_layer={self.semantic_layer}")
        if self.decoder_width % self.decoder_heads:
            raise ConfigError(f"decoder_width: {self.decoder_width} is not a multiple of decoder_heads={self.decoder_heads}")
        if not self.conv_ch_mult or min(self.conv_ch_mult) < 1:
            raise ConfigError(f"conv_ch_mult: a non-empty list of positive multipliers, got {self.conv_ch_mult}")

    @property
    def official(self) -> bool:
        return self.variant == "official"
