"""SemHiTok configuration: the architecture (saved with every checkpoint) and the training job.

Defaults are the paper's 256 px setting; configs/{tiny,256,384}.yaml override what differs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from semhitok.common.config_io import ConfigError, check_min, check_positive, check_range

Fusion = Literal["concat", "pixel_only", "length", "semantic_only"]


@dataclass
class TokenizerConfig:
    # Which visual tokenizer the stack trains and consumes (tokenizer/interface.py KINDS): semhitok (the fields
    # below), or another kind configured in its own top-level section (dualtoken, toklip).
    kind: str = "semhitok"
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
    # The paper (sec. 4.1): ViT-B pixel encoder and decoder, the decoder enlarged to ViT-L (1024 wide,
    # 16 heads, 24 layers) in the last stage-2 phase (configs/recipes/*_stage2c_*.yaml).
    pix_encoder_width: int = 768
    pix_encoder_heads: int = 12
    pix_encoder_layers: int = 12
    pix_decoder_width: int = 768
    pix_decoder_heads: int = 12
    pix_decoder_layers: int = 12
    # Legacy (one width/heads for both): when set, both encoder and decoder take it; then cleared.
    pix_width: int | None = None
    pix_heads: int | None = None
    # concat: semantic and pixel codes concatenated on channels (the paper's choice);
    # pixel_only: the "w/o sem" ablation; length: the two token sets concatenated along the sequence;
    # semantic_only: no pixel codes at all, the decoder sees the semantic codes only (Table 4's SPC rows;
    # ids are then the semantic ids, m counts as 1).
    fusion: Fusion = "concat"

    def __post_init__(self) -> None:
        from semhitok.tokenizer.interface import KINDS

        if self.kind not in KINDS:
            raise ConfigError(f"kind: {self.kind!r} is not a known tokenizer kind ({', '.join(sorted(KINDS))})")
        if self.pix_width is not None:
            self.pix_encoder_width = self.pix_decoder_width = self.pix_width
        if self.pix_heads is not None:
            self.pix_encoder_heads = self.pix_decoder_heads = self.pix_heads
        self.pix_width = self.pix_heads = None
        check_min(self, 1, "sem_codebook_size", "sem_code_dim", "pix_codes_per_group", "pix_code_dim", "pix_encoder_width",
                  "pix_encoder_heads", "pix_encoder_layers", "pix_decoder_width", "pix_decoder_heads", "pix_decoder_layers")
        check_min(self, 0, "sem_decoder_layers", "sem_dead_code_threshold", "sem_kmeans_iters")
        check_range(self, 0, 1, "sem_ema_decay")
        for side in ("encoder", "decoder"):
            width, heads = getattr(self, f"pix_{side}_width"), getattr(self, f"pix_{side}_heads")
            if width % heads:
                raise ConfigError(f"pix_{side}_width: {width} is not a multiple of pix_{side}_heads={heads}")

    @property
    def codes_per_group(self) -> int:
        """m as the ids see it: 1 when there are no pixel codes."""
        return 1 if self.fusion == "semantic_only" else self.pix_codes_per_group

    @property
    def vocab_size(self) -> int:
        """Number of flattened visual ids h = sem * m + pix."""
        return self.sem_codebook_size * self.codes_per_group

    def decoder_fields(self) -> dict:
        """The fields that shape the pixel decoder side (fusion projection, decoder, pixel head)."""
        return {k: getattr(self, k) for k in ("pix_decoder_width", "pix_decoder_heads", "pix_decoder_layers", "fusion")}


@dataclass
class TokenizerTrainConfig:
    stage: int = 1
    train_data: list[str] = field(default_factory=lambda: ["data/sample/train.jsonl"])
    holdout_data: list[str] = field(default_factory=lambda: ["data/sample/holdout.jsonl"])
    # A named phase of this stage (the paper's stage 2: imagenet, coyo, then the enlarged decoder). The run
    # writes to <run_dir>/tokenizer/stage<N>_<phase>; empty: <run_dir>/tokenizer/stage<N>, what later jobs read.
    phase: str = ""
    # Stage 2 starts from this tokenizer: a directory path, or the name of another stage directory of this
    # run (no slash: "stage1", "stage2_coyo" -> <run_dir>/tokenizer/<name>/final). Empty: stage1.
    # A stage-1 tokenizer gets a new pixel branch; a stage-2 one is continued with every weight kept
    # (a pixel decoder of another size or fusion is built new, see `trains`).
    init_from: str = ""
    # Stage 2's trained parts. pixel: the whole pixel branch (semantic branch frozen, the paper's PRE);
    # decoder: fusion projection + decoder + pixel head only, the pixel encoder and codebooks frozen so every
    # id stays what it was (the decoder-enlargement phase); joint: the pixel branch and the semantic branch,
    # the latter keeping its stage-1 distillation loss (Table 4's "texture incorporated", MUSE-VL style).
    trains: Literal["pixel", "decoder", "joint"] = "pixel"
    # Stage 1: the student starts as a copy of the teacher (Table 4's "SemEnc Init"); false: random weights.
    student_from_teacher: bool = True

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
    semantic_weight: float = 1.0  # trains=joint: weight of the stage-1 loss (cosine + L1 + commitment)
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

    def __post_init__(self) -> None:
        check_range(self, 1, 2, "stage")
        check_min(self, 1, "batch_size", "max_steps", "log_every", "eval_every", "image_every", "ckpt_every",
                  "keep_checkpoints", "holdout_images")
        check_positive(self, "lr", "disc_lr", "grad_clip")  # grad_clip 0 would zero every gradient
        check_range(self, 0, 1, "min_lr_ratio")
        check_min(self, 0, "weight_decay", "warmup_steps", "commit_weight", "l1_weight", "codebook_weight",
                  "perceptual_weight", "gan_weight", "disc_start", "num_workers", "seed")
