"""Configuration of the offline pre-tokenization job."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from semhitok.common.config_io import ConfigError, check_min, check_range

MAX_LENGTH = 1_048_576  # data.max_length's bound: a row of 2^20 tokens is already past any model's context
MAX_ROW_TOKENS = 4 * MAX_LENGTH  # data.max_length * data.micro_batch_size: tokens a rank builds and trains per micro-step

SourceKind = Literal["wds", "caption_jsonl", "llava_json", "text_jsonl"]
Task = Literal["understanding", "generation", "text"]
TASKS: tuple[str, ...] = get_args(Task)  # a task's id is its index here (the loader's task_ids)


@dataclass
class SourceConfig:
    name: str  # names the output shards: <name>-<unit>.npz (letters, digits, _ . -; unique)
    # wds: webdataset tars (img2dataset/COYO layout: <key>.jpg + <key>.txt or .json), path is a local glob,
    # a brace pattern (part-{0000..0099}.tar), a URL or a `pipe:` command, several joined by "::";
    # caption_jsonl: rows {"image": ..., "caption": ...}; llava_json: a LLaVA list with "conversations"
    # and an optional "image" (a path, or a list of paths, one per <image> tag); text_jsonl: rows
    # {"text": ...}, passed through.
    kind: SourceKind
    path: str
    image_root: str = ""  # images are relative to this folder; empty: the folder of `path`
    # How images become the tokenizer's square input: pad (to a square of the vision processor's mean, as LLaVA-1.5
    # does for understanding) or crop (centre crop, for generation targets); auto: pad for llava_json
    # (understanding data), crop for caption and wds sources (generation data).
    image_mode: Literal["auto", "pad", "crop"] = "auto"


@dataclass
class PretokenizeConfig:
    sources: list[SourceConfig] = field(default_factory=lambda: [
        SourceConfig("coco_captions", "caption_jsonl", "data/sample/train.jsonl"),
        SourceConfig("coco_llava", "llava_json", "data/sample/llava.json"),
        SourceConfig("coco_text", "text_jsonl", "data/sample/text.jsonl"),
    ])
    tokenizer: str = ""  # tokenizer directory; empty: the run's (tokenizer.kind's final_dir, SemHiTok: <run_dir>/tokenizer/stage2/final)
    output_dir: str = ""  # empty: <run_dir>/pretokenized
    records_per_shard: int = 1000  # jsonl/json sources are cut into units of this many records; a tar is one unit
    batch_size: int = 64
    num_workers: int = 4
    max_image_pixels: int = 36_000_000  # larger images are skipped (counted), checked before decoding
    max_aspect_ratio: float = 20.0  # images with longer / shorter side above this are skipped (counted)
    # captions and conversations longer than this many text tokens are skipped (counted as text_too_long): no
    # packed row could hold them, and the loader would tokenize them again on every draw
    max_text_tokens: int = 16384

    def __post_init__(self) -> None:
        check_range(self, 1, 10_000_000, "records_per_shard")
        check_range(self, 1, 4096, "batch_size")
        check_range(self, 1, MAX_LENGTH, "max_text_tokens")
        check_range(self, 0, 256, "num_workers")
        check_range(self, 1, 2**31 - 1, "max_image_pixels")  # (0 or less would skip every image)
        check_range(self, 1, 10_000, "max_aspect_ratio")  # (NaN would pass every comparison: no check at all)


@dataclass
class MixtureComponent:
    source: str  # a pre-tokenized source name
    # understanding: chat with the image where <image> stands (caption rows become "describe" turns);
    # generation: caption -> image ids; text: plain text
    task: Task
    weight: float = 1.0  # relative share of documents drawn

    def __post_init__(self) -> None:
        check_min(self, 0, "weight")


@dataclass
class SequenceConfig:
    pretokenized: str = ""  # pre-tokenized output directory; empty: <run_dir>/pretokenized
    mixture: list[MixtureComponent] = field(default_factory=lambda: [
        MixtureComponent("coco_captions", "generation", 1.0),
        MixtureComponent("coco_llava", "understanding", 1.0),
        MixtureComponent("coco_captions", "understanding", 0.5),
        MixtureComponent("coco_text", "text", 0.5),
    ])
    max_length: int = 4096  # tokens per packed row
    micro_batch_size: int = 1  # packed rows per step per rank
    cfg_dropout: float = 0.1  # share of generation captions replaced by uncond_prompt
    uncond_prompt: str = ""  # the unconditional prompt (also what CFG sampling uses)
    # Chat format: auto = the text tokenizer's family (ChatML tokenizers: qwen2.5, or qwen2 when their template
    # says so; others: vicuna_v1, LLaVA-1.5's); or one of qwen2.5, qwen2, vicuna_v1.
    chat_format: str = "auto"
    system_prompt: str | None = None  # None: the format's default (Qwen2.5-Instruct's, Vicuna's); "": no system turn
    # Understanding images at eval, chat and lmms-eval: pad to square (LLaVA-1.5) or centre crop (see
    # SourceConfig.image_mode for pre-tokenization); generation always uses the centre crop.
    understanding_image: Literal["pad", "crop"] = "pad"
    caption_prompt: str = "Describe this image briefly."  # the user turn of captions used for understanding
    seed: int = 0
    shuffle_shards: int = 4  # each epoch shuffles shard order, then samples within windows of this many shards
    pack_lookahead: int = 64  # documents considered when filling a row (first fit)
    shard_cache: int = 16  # decoded shards kept in memory
    prefetch: int = 4  # batches built ahead in a background process during training (0: in the training process)
    # A shard that does not match its .done.json (sha256) or the manifest (grid, code ranges, counts) stops training
    # with one line naming it; true: it is skipped instead (logged, counted in the loader's stats)
    skip_bad_shards: bool = False

    def __post_init__(self) -> None:
        # (that max_length holds an image span of every visual task is checked by the loader, which knows the grid:
        # check_max_length; that it holds a whole document, on the first documents)
        check_range(self, 1, MAX_LENGTH, "max_length")
        check_range(self, 1, 4096, "micro_batch_size")
        if self.max_length * self.micro_batch_size > MAX_ROW_TOKENS:
            raise ConfigError(f"micro_batch_size: {self.micro_batch_size} rows of max_length {self.max_length} tokens is "
                              f"{self.max_length * self.micro_batch_size:,} tokens per micro-step, above {MAX_ROW_TOKENS:,}")
        check_range(self, 1, 1_000_000, "shuffle_shards", "pack_lookahead")
        check_range(self, 1, 100_000, "shard_cache")
        check_range(self, 0, 1024, "prefetch")
        check_min(self, 0, "seed")
        check_range(self, 0, 1, "cfg_dropout")


def check_max_length(cfg: SequenceConfig, grid: tuple[int, int] | list[int]) -> None:
    """data.max_length must exceed one image span (grid positions + <|vision_start|>, <|vision_end|>) for every
    visual task the mixture draws; otherwise every image document is skipped and training runs text-only."""
    span = int(grid[0]) * int(grid[1]) + 2
    for i, comp in enumerate(cfg.mixture):
        if comp.weight > 0 and comp.task in ("understanding", "generation") and cfg.max_length <= span:
            raise ConfigError(f"data.max_length={cfg.max_length} holds no {comp.task} document of data.mixture[{i}] "
                              f"({comp.source!r}): one image is {span} tokens ({grid[0]}x{grid[1]} ids + 2 markers); "
                              f"set data.max_length >= {span + 1}")
