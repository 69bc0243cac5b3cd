"""SemHiTok configuration: the architecture (saved with every checkpoint) and the training job.

Defaults are the paper's 256 px setting; configs/{tiny,256,384}.yaml override what differs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Fusion = Literal["concat", "pixel_only", "length"]


@dataclass
class TokenizerConfig:
    # Semantic teacher: a SigLIP vision tower by HF name or local path. The student starts as a copy of it.
    teacher: str = "google/siglip-large-patch16-256"
    # When set, the teacher is a randomly initialised SiglipVisionModel of this SiglipVisionConfig
    # (tiny preset and tests: nothing to download). Filled in from the loaded teacher at build time and
    # saved, so from_pretrained rebuilds the student with no hub access.
    siglip_config: dict | None = None

    # Stage 1, semantic-priority codebook (VQKD-style, l2-normalised, EMA-updated).
    sem_codebook_size: int = 16384  # K
    sem_code_dim: int = 32
    sem_decoder_layers: int = 3
    sem_ema_decay: float = 0.99
    sem_dead_code_threshold: float = 0.03  # EMA assignments per step below which a code is restarted
    sem_kmeans_iters: int = 10
    # k-means initialisation pools features over the first batches (and all ranks) until it has this many;
    # 0 or anything below K means K. Until then the features pass through unquantized.
    sem_kmeans_features: int = 0

    # Stage 2, semantic-guided hierarchical codebook: K sub-codebooks of m pixel codes.
    pix_codes_per_group: int = 12  # m: 8, 12 or 16 in the paper's ablation
    pix_code_dim: int = 8
    pix_width: int = 768
    pix_heads: int = 12
    pix_encoder_layers: int = 12
    pix_decoder_layers: int = 12
    # concat: semantic and pixel codes concatenated on channels (the paper's choice);
    # pixel_only: the "w/o sem" ablation; length: the two token sets concatenated along the sequence.
    fusion: Fusion = "concat"

    @property
    def vocab_size(self) -> int:
        """Number of flattened visual ids h = sem * m + pix."""
        return self.sem_codebook_size * self.pix_codes_per_group


@dataclass
class TokenizerTrainConfig:
    stage: int = 1
    train_data: list[str] = field(default_factory=lambda: ["data/sample/train.jsonl"])
    holdout_data: list[str] = field(default_factory=lambda: ["data/sample/holdout.jsonl"])
    # Stage 2 starts from this stage-1 directory; empty means <run_dir>/tokenizer/stage1/final.
    init_from: str = ""

    batch_size: int = 32  # per process
    max_steps: int = 100_000
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.05
    warmup_steps: int = 1000
    grad_clip: float = 1.0

    commit_weight: float = 0.25
    l1_weight: float = 1.0
    codebook_weight: float = 1.0
    # auto / lpips: LPIPS (the `lpips` package and its VGG weights); if it cannot load, training stops with
    # the fix named (never a silent switch). semantic: distances between the frozen semantic encoder's hidden
    # states (the tiny preset's choice). The term that ran is recorded in <stage dir>/run_config.json.
    perceptual: Literal["auto", "lpips", "semantic", "none"] = "auto"
    perceptual_weight: float = 1.0
    gan_weight: float = 0.1
    disc_start: int = 20_000
    disc_lr: float = 1e-4

    log_every: int = 50
    eval_every: int = 1000
    image_every: int = 1000
    ckpt_every: int = 1000
    keep_checkpoints: int = 3
    holdout_images: int = 8
    random_flip: bool = True
    num_workers: int = 4
    seed: int = 0
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    log_backends: list[str] = field(default_factory=lambda: ["jsonl", "tensorboard"])
