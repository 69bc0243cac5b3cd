"""Configuration of `semhitok eval`: which benchmarks run on which data, and how images are sampled.

Defaults point at the data shipped in the repository (data/eval, data/sample; see data/eval/ATTRIBUTION.md),
resolved from the repository whatever the current directory."""

from __future__ import annotations

from dataclasses import dataclass, field

from semhitok.common.config_io import check_min, check_range
from semhitok.common.resources import shipped
from semhitok.mllm.config import MAX_SAMPLES_PER_PROMPT, SamplingConfig


@dataclass
class EvalConfig:
    # POPE (image understanding): POPE jsonl rows; images relative to pope_image_root. Shipped: the 18 POPE
    # questions about a shipped photo; the real benchmark: POPE's coco_pope_*.json over COCO val2014.
    pope_questions: str = field(default_factory=lambda: shipped("data/eval/pope.jsonl"))
    pope_image_root: str = field(default_factory=lambda: shipped("data/sample"))
    # GenEval (text-to-image): its evaluation_metadata.jsonl (shipped, MIT); limit 0 = every prompt.
    geneval_metadata: str = field(default_factory=lambda: shipped("data/eval/geneval_evaluation_metadata.jsonl"))
    geneval_limit: int = 0
    geneval_samples: int = 4
    # gFID: generate from these captions, compare with their images (jsonl rows {"image", "caption"}).
    gfid_captions: str = field(default_factory=lambda: shipped("data/sample/holdout.jsonl"))
    # Tokenizer reconstruction (PSNR, SSIM, usage, rFID) of the model's visual tokenizer on these images.
    recon_images: list[str] = field(default_factory=lambda: [shipped("data/sample/holdout.jsonl")])
    # Conditioning gaps (semhitok.mllm.gaps) on these held-out {"image", "caption"} pairs; limit 0 = all.
    gaps_data: str = field(default_factory=lambda: shipped("data/sample/holdout.jsonl"))
    gaps_limit: int = 0
    # The procedural shapes world (a directory written by data_pipelines.world.write_world; empty: off): its
    # held-out questions answered and prompts drawn and checked (eval/world_eval.py); limits 0 = all
    # (questions: the first N; prompts: the first N of each category).
    world: str = ""
    world_questions_limit: int = 0
    world_prompts_limit: int = 0
    # A requested benchmark whose data is missing fails the command (exit 1) unless this is true; then it is
    # listed as skipped, with a warning.
    allow_skip: bool = False
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    batch_size: int = 16
    compile: bool = False  # compile the decoding step (CUDA graphs on GPUs); see mllm/sample.py Decoder

    def __post_init__(self) -> None:
        check_min(self, 0, "geneval_limit", "gaps_limit", "world_questions_limit", "world_prompts_limit")
        # (semhitok sample --samples-per-prompt's bound; GenEval draws them batch_size at a time)
        check_range(self, 1, MAX_SAMPLES_PER_PROMPT, "geneval_samples")
        check_range(self, 1, 4096, "batch_size")  # images generated or reconstructed together
