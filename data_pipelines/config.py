"""Configuration of the offline pre-tokenization job."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

SourceKind = Literal["wds", "caption_jsonl", "llava_json", "text_jsonl"]


@dataclass
class SourceConfig:
    name: str  # names the output shards: <name>-<unit>.npz
    # wds: webdataset tars (img2dataset/COYO layout: <key>.jpg + <key>.txt or .json), path is a glob;
    # caption_jsonl: rows {"image": ..., "caption": ...}; llava_json: a LLaVA list with "conversations"
    # and an optional "image"; text_jsonl: rows {"text": ...}, passed through.
    kind: SourceKind
    path: str
    image_root: str = ""  # images are relative to this folder; empty: the folder of `path`


@dataclass
class PretokenizeConfig:
    sources: list[SourceConfig] = field(default_factory=lambda: [
        SourceConfig("coco_captions", "caption_jsonl", "data/sample/train.jsonl"),
        SourceConfig("coco_llava", "llava_json", "data/sample/llava.json"),
    ])
    tokenizer: str = ""  # tokenizer directory; empty: <run_dir>/tokenizer/stage2/final
    output_dir: str = ""  # empty: <run_dir>/pretokenized
    records_per_shard: int = 1000  # jsonl/json sources are cut into units of this many records; a tar is one unit
    batch_size: int = 64
    num_workers: int = 4
