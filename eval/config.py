"""Configuration of `semhitok eval`: which benchmarks run on which data, and how images are sampled."""

from __future__ import annotations

from dataclasses import dataclass, field

from semhitok.common.config_io import check_min
from semhitok.mllm.sample import SamplingConfig


@dataclass
class EvalConfig:
    # POPE (image understanding); skipped with a note when the file is missing.
    pope_questions: str = "../shared/data/llava_instruct/pope_on_shipped_images.jsonl"
    pope_image_root: str = "../shared/data/images_captions"
    # GenEval (text-to-image): its evaluation_metadata.jsonl; limit 0 = every prompt.
    geneval_metadata: str = "../shared/data/prompts/geneval/geneval_evaluation_metadata.jsonl"
    geneval_limit: int = 0
    geneval_samples: int = 4
    # gFID: generate from these captions, compare with their images (jsonl rows {"image", "caption"}).
    gfid_captions: str = "data/sample/holdout.jsonl"
    # Tokenizer reconstruction (PSNR, SSIM, usage, rFID) of the model's visual tokenizer on these images.
    recon_images: list[str] = field(default_factory=lambda: ["data/sample/holdout.jsonl"])
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    batch_size: int = 16
    compile: bool = False  # compile the decoding step (CUDA graphs on GPUs); see mllm/sample.py Decoder

    def __post_init__(self) -> None:
        check_min(self, 0, "geneval_limit")
        check_min(self, 1, "geneval_samples", "batch_size")
