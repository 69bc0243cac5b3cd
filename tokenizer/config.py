"""SemHiTok configuration: the architecture (saved with every checkpoint) and the training job.

Defaults are the paper's 256 px setting; configs/{tiny,256,384}.yaml override what differs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from semhitok.common.config_io import ConfigError, check_finite, check_min, check_positive, check_range
from semhitok.tokenizer.kinds import KINDS

Fusion = Literal["concat", "pixel_only", "length", "semantic_only"]


@dataclass
class TokenizerConfig:
    RETIRED: ClassVar[dict[str, str]] = {"pix_width": "set pix_encoder_width and pix_decoder_width",
                                         "pix_heads": "set pix_encoder_heads and pix_decoder_heads"}
    # Which visual tokenizer the stack trains and consumes (tokenizer/kinds.py KINDS): semhitok (the fields
    # below), or another kind configured in its own top-level section (dualtoken, toklip).
    kind: str = "semhitok"
    # Semantic teacher: a SigLIP vision tower by HF name or local path. The student starts as a copy of it.
    teacher: str = "google/siglip-large-patch16-256"
    # The teacher features stage 1 distils (and semantic_alignment reports): last = the last layer after the
    # tower's final LayerNorm (last_hidden_state; the paper does not say which); penultimate = hidden_states[-2],
    # the second-to-last layer's output before any norm (TokenFlow's choice with the same SigLIP teachers).
    distill_layer: Literal["last", "penultimate"] = "last"
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
    # The pixel branch's patch in canvas px (vit.pixel_geometry). 0: the smallest that covers the image on the
    # teacher's grid (16 at 256; 15 at 384 under so400m/14's 27x27 grid, a 405 px canvas); 16 at 384: TokenFlow's
    # 16 px patches on a 432 px canvas (27 x 16), the image resized onto it and the output back.
    pix_patch: int = 0
    pix_code_dim: int = 8
    # Restart pixel codes no patch uses (quantizers.HierarchicalCodebook; the shapes preset turns it on: without
    # it each group there collapses onto a code or two and shapes come back as blocks of patches). Off by default:
    # the paper does not say, and the 256/384 recipes keep what they were run with.
    pix_restart_dead: bool = False
    # hierarchical: a patch is quantized in its semantic id's sub-codebook, the id is semantic * m + pixel (the
    # paper's SGHC). shared: the K * m codes form one codebook searched whole, the id is the code's index and
    # carries no semantic id (Table 5's "w/o sem" taken strictly; needs fusion=pixel_only, since the decoder could
    # not recover the semantic codes from such an id).
    pix_codebook: Literal["hierarchical", "shared"] = "hierarchical"
    # The paper (sec. 4.1): ViT-B pixel encoder and decoder, the decoder enlarged to ViT-L (1024 wide,
    # 16 heads, 24 layers) in the last stage-2 phase (configs/recipes/*_stage2c_*.yaml).
    pix_encoder_width: int = 768
    pix_encoder_heads: int = 12
    pix_encoder_layers: int = 12
    pix_decoder_width: int = 768
    pix_decoder_heads: int = 12
    pix_decoder_layers: int = 12
    # concat: semantic and pixel codes concatenated on channels (the paper's choice);
    # pixel_only: the "w/o sem" ablation; length: the two token sets concatenated along the sequence;
    # semantic_only: no pixel codes at all, the decoder sees the semantic codes only (Table 4's SPC rows;
    # ids are then the semantic ids, m counts as 1).
    fusion: Fusion = "concat"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"kind: {self.kind!r} is not a known tokenizer kind ({', '.join(sorted(KINDS))})")
        check_min(self, 1, "sem_codebook_size", "sem_code_dim", "pix_codes_per_group", "pix_code_dim", "pix_encoder_width",
                  "pix_encoder_heads", "pix_encoder_layers", "pix_decoder_width", "pix_decoder_heads", "pix_decoder_layers")
        check_min(self, 0, "sem_decoder_layers", "sem_dead_code_threshold", "sem_kmeans_iters", "pix_patch")
        check_range(self, 0, 1, "sem_ema_decay")
        for side in ("encoder", "decoder"):
            width, heads = getattr(self, f"pix_{side}_width"), getattr(self, f"pix_{side}_heads")
            if width % heads:
                raise ConfigError(f"pix_{side}_width: {width} is not a multiple of pix_{side}_heads={heads}")
        if self.pix_codebook == "shared" and self.fusion != "pixel_only":
            raise ConfigError(f"pix_codebook: 'shared' ids carry no semantic id, so they need fusion=pixel_only, not {self.fusion!r}")

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
    # Stage 1: the student's SigLIP encoder trains (trained, at lr) or stays the teacher's copy (frozen: only the
    # code projection, codebook and semantic decoder learn). The paper contradicts itself: eq. (1) calls the
    # semantic encoder E_sem "a frozen text-aligned image encoder", while Table 4's "SemEnc Init" row (initialising
    # it from SigLIP, against a randomly initialised one) only makes sense for an encoder that trains.
    semantic_encoder: Literal["trained", "frozen"] = "trained"

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
    # perceptual=semantic reads the hidden states of this tokenizer's frozen semantic encoder (student) or of the
    # frozen teacher (teacher: one fixed network, whatever each student became; the ablations' choice, so that no
    # row's perceptual term looks through another encoder). trains=joint always reads the teacher's.
    perceptual_network: Literal["student", "teacher"] = "student"
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
                  "semantic_weight", "perceptual_weight", "gan_weight", "disc_start", "num_workers", "seed")
        if self.semantic_encoder == "frozen" and not self.student_from_teacher:
            raise ConfigError("semantic_encoder=frozen with student_from_teacher=false would distil through a frozen "
                              "random encoder; set one of them back")


def _tiny_vision() -> dict:
    return {"hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 3, "num_attention_heads": 4,
            "image_size": 64, "patch_size": 8}


def _tiny_text() -> dict:
    return {"vocab_size": 259, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 72, "projection_size": 96,
            "pad_token_id": 256, "bos_token_id": 257, "eos_token_id": 258}


@dataclass
class TeacherTrainConfig:
    """Stage 0 (tokenizer/teacher.py): a small SigLIP (both towers) trained from scratch with the sigmoid loss on
    (image, caption) pairs, the teacher the tokenizers distil when no pretrained SigLIP fits (the shapes world).
    Captions go through the byte tokenizer (tokenizer/text.py), so text_config's vocab_size must be >= 259."""

    enabled: bool = False  # `semhitok pipeline` trains it into <run_dir>/teacher before the visual tokenizer
    # SiglipVisionConfig fields: the tiny preset's tower (configs/tiny.yaml tokenizer.siglip_config)
    vision_config: dict = field(default_factory=_tiny_vision)
    # SiglipTextConfig fields; projection_size = the vision width (the two towers' pooled features are compared)
    text_config: dict = field(default_factory=_tiny_text)
    # Captions are padded to this many byte tokens (<= max_position_embeddings). The world's longest caption is
    # 69 bytes + BOS/EOS, so 72 truncates none. A user of the teacher's text tower must pad to the same length
    # (TokLIP: toklip.text_max_length): SigLIP's text tower pools the last position.
    text_max_length: int = 72
    train_data: list[str] = field(default_factory=lambda: ["data/sample/train.jsonl"])  # jsonl of image + caption
    holdout_data: list[str] = field(default_factory=lambda: ["data/sample/holdout.jsonl"])
    # Schedule, measured on the 2-core CPU (AMD EPYC, OMP_NUM_THREADS=1) on the default world (3000 train.jsonl
    # pairs, 300 held-out): 220 steps of 64 take 44 s in train_teacher (49 s for the whole process, 31 s with two
    # threads) and reach held-out retrieval 16% image->caption, 24% caption->image (chance 0.3%, same-text chance
    # 0.8%; an oracle that knows each scene's objects but not its caption's wording gets ~77%). Longer helps:
    # 1000 steps reach 34% / 42% (~200 s). Image->caption at 250 steps with b = -10: lr 5e-4 16%, 1e-3 15-20%
    # (three runs), 2e-3 15%, 5e-3 8%; batch 32 for 500 steps 16-19%. The numbers move a few points with the seed.
    batch_size: int = 64
    steps: int = 220
    lr: float = 1e-3
    warmup: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    # The sigmoid loss's starting temperature exp(t') and bias b (both learnable; Adam moves each by about lr a
    # step, so they stay near their start in a short schedule). The SigLIP paper's b = -10 is about -log(batch) at
    # its 32k batch (one positive among 32k pairs); at 64 pairs, -5. Measured at 240-250 steps on the default
    # world: 16% / 15% (image->caption / caption->image) with b = -10, 16% / 22% with b = -5; on the 400-scene
    # world of the tests (150 steps, seeds 0-2, mean of both directions) 7%, 21%, 19% with b = -10 against 17%,
    # 15%, 18% with b = -5: steadier.
    init_logit_scale: float = 10.0
    init_logit_bias: float = -5.0
    seed: int = 0
    eval_every: int = 0  # held-out retrieval every this many steps too (0: only at the end), logged and kept

    def __post_init__(self) -> None:
        check_min(self, 2, "text_max_length", "batch_size")  # batch 1 has no negatives
        check_min(self, 1, "steps")
        check_min(self, 0, "warmup", "weight_decay", "seed", "eval_every")
        check_positive(self, "lr", "grad_clip", "init_logit_scale")
        check_finite(self, "init_logit_bias")
        check_range(self, 0, 1, "min_lr_ratio")
        if not self.train_data or not self.holdout_data:
            raise ConfigError("train_data and holdout_data: at least one jsonl of image + caption each")
        vision, text = self.vision_config, self.text_config
        width = vision.get("hidden_size", 768)  # SiglipVisionConfig's default
        if text.get("projection_size", text.get("hidden_size", 768)) != width:
            raise ConfigError(f"text_config.projection_size: must equal vision_config.hidden_size={width} "
                              f"(the pooled image and text features are compared), got {text.get('projection_size')}")
        if text.get("vocab_size", 32000) < 259:
            raise ConfigError(f"text_config.vocab_size: must be >= 259 for the byte tokenizer, got {text['vocab_size']}")
        if self.text_max_length > text.get("max_position_embeddings", 64):
            raise ConfigError(f"text_max_length: {self.text_max_length} is above text_config.max_position_embeddings="
                              f"{text.get('max_position_embeddings', 64)}")
