"""DualToken's configuration: the `dualtoken` section of the run config, saved with every checkpoint.

Defaults are the paper's 384 px setting (sec. 3.2, 4.1): SigLIP so400m/14-384 (27 layers), reconstruction on
the features after layer 6, semantics at layer 26, residual depth 8. The paper gives neither codebook sizes
nor code widths nor the pixel decoder: those defaults are ours (configs/384.yaml says so too)."""

from __future__ import annotations

from dataclasses import dataclass

from semhitok.common.config_io import ConfigError, check_min, check_range


@dataclass
class DualTokenConfig:
    # The vision tower both vocabularies come from: a SigLIP vision tower by HF name or local path (a full
    # SiglipModel dir works too), or "random" with siglip_config (tiny preset, tests). Same loading as SemHiTok's
    # teacher (tokenizer/model.py load_teacher); siglip_config is filled in from the loaded tower and saved.
    teacher: str = "google/siglip-so400m-patch14-384"
    siglip_config: dict | None = None

    # Hidden-state indices (hidden_states[k] = output of layer k; 0 = patch embeddings). Reconstruction reads
    # hidden_states[pixel_layer] (layers 1..pixel_layer get its gradient); semantics read
    # hidden_states[semantic_layer]. The tower is cut after semantic_layer (no pooling head: ours).
    pixel_layer: int = 6
    semantic_layer: int = 26

    depth: int = 8  # D: residual codes per position in each vocabulary
    sem_codebook_size: int = 16384
    sem_code_dim: int = 64
    pix_codebook_size: int = 16384
    pix_code_dim: int = 64
    ema_decay: float = 0.99
    # a code whose EMA usage (assignments per step) falls below this is restarted from a current residual
    dead_code_threshold: float = 0.03

    # Pixel decoder (tokenizer/vit.py Transformer over the tower's grid): ViT-B, as SemHiTok's default
    decoder_width: int = 768
    decoder_heads: int = 12
    decoder_layers: int = 12

    # Loss weights (paper eq. 2-4): lambda_1 recon (pixel L2; perceptual and GAN weights come from
    # tokenizer_train), lambda_2 semantic, lambda_3 commitment (both vocabularies)
    recon_weight: float = 1.0
    semantic_weight: float = 1.0
    commit_weight: float = 0.25

    def __post_init__(self) -> None:
        check_min(self, 1, "pixel_layer", "depth", "sem_codebook_size", "sem_code_dim", "pix_codebook_size",
                  "pix_code_dim", "decoder_width", "decoder_heads", "decoder_layers")
        check_min(self, 0, "dead_code_threshold", "recon_weight", "semantic_weight", "commit_weight")
        check_range(self, 0, 1, "ema_decay")
        if self.semantic_layer <= self.pixel_layer:
            raise ConfigError(f"semantic_layer={self.semantic_layer} must be deeper than pixel_layer={self.pixel_layer}")
        if self.decoder_width % self.decoder_heads:
            raise ConfigError(f"decoder_width: {self.decoder_width} is not a multiple of decoder_heads={self.decoder_heads}")
