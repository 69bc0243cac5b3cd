"""Corpus readers: split sources into work units and read a unit's records.

A work unit is one webdataset tar, or `records_per_shard` consecutive records of a jsonl/json file. Units
are the grain of resumption and of splitting across jobs. Bad rows are counted by kind and logged with
their origin (file:line, or tar:member); they never stop the job.
"""

from __future__ import annotations

import functools
import glob
import json
import logging
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from semhitok.data_pipelines.config import SourceConfig

log = logging.getLogger("semhitok")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class WorkUnit:
    source: SourceConfig
    index: int
    file: str
    start: int = 0  # record range [start, stop) for jsonl/json sources
    stop: int = 0

    @property
    def name(self) -> str:
        return f"{self.source.name}-{self.index:05d}"


@dataclass
class Record:
    key: str
    origin: str
    kind: str  # caption | conversation | text
    text: str | None = None
    conversations: list | None = None
    image_path: str | None = None
    image_bytes: bytes | None = None

    @property
    def has_image(self) -> bool:
        return self.image_path is not None or self.image_bytes is not None


def _count_records(source: SourceConfig) -> int:
    path = Path(source.path)
    if not path.is_file():
        raise FileNotFoundError(f"source {source.name!r}: {path} not found")
    if source.kind == "llava_json":
        data = json.loads(path.read_text())
        if not isinstance(data, list):
            raise ValueError(f"source {source.name!r}: {path} must hold a JSON list of conversations")
        return len(data)
    with open(path) as f:
        return sum(1 for _ in f)


def plan_units(sources: list[SourceConfig], records_per_shard: int) -> list[WorkUnit]:
    """Every unit of every source, in a fixed order (the same in every job of an array)."""
    units: list[WorkUnit] = []
    for source in sources:
        if source.kind == "wds":
            tars = sorted(glob.glob(source.path))
            if not tars:
                raise FileNotFoundError(f"source {source.name!r}: no tar matches {source.path}")
            units += [WorkUnit(source, i, tar) for i, tar in enumerate(tars)]
        else:
            n = _count_records(source)
            units += [
                WorkUnit(source, i, source.path, start, min(start + records_per_shard, n))
                for i, start in enumerate(range(0, n, records_per_shard))
            ]
    return units


def _image_root(unit: WorkUnit) -> Path:
    return Path(unit.source.image_root) if unit.source.image_root else Path(unit.file).parent


def _from_row(unit: WorkUnit, row, origin: str, errors: Counter) -> Record | None:
    kind = unit.source.kind
    if not isinstance(row, dict):
        errors["bad_json"] += 1
        log.warning("%s: skipped, not a JSON object", origin)
        return None
    key = f"{unit.source.name}/{row.get('id', origin.rsplit(':', 1)[-1])}"
    image = row.get("image")
    image_path = str(_image_root(unit) / image) if image else None
    if kind == "text_jsonl":
        if not isinstance(row.get("text"), str):
            errors["bad_json"] += 1
            log.warning("%s: skipped, no \"text\" string", origin)
            return None
        return Record(key, origin, "text", text=row["text"])
    if kind == "caption_jsonl":
        if not isinstance(row.get("caption"), str) or not image:
            errors["bad_json"] += 1
            log.warning("%s: skipped, needs \"image\" and \"caption\"", origin)
            return None
        record = Record(key, origin, "caption", text=row["caption"], image_path=image_path)
    else:  # llava_json
        conv = row.get("conversations")
        if not isinstance(conv, list) or not conv or not all(isinstance(t, dict) and "value" in t for t in conv):
            errors["bad_json"] += 1
            log.warning("%s: skipped, \"conversations\" is not a list of turns", origin)
            return None
        record = Record(key, origin, "conversation", conversations=conv, image_path=image_path)
    if image_path is not None and not Path(image_path).is_file():
        errors["missing_file"] += 1
        log.warning("%s: skipped, image %s not found", origin, image_path)
        return None
    return record


@functools.lru_cache(maxsize=1)
def _json_list(path: str) -> list:
    """A LLaVA json file, parsed once for all the units a process reads from it in a row."""
    return json.loads(Path(path).read_text())


def read_unit(unit: WorkUnit, errors: Counter) -> list[Record]:
    """The unit's usable records; problems go to `errors` (and the log) by kind."""
    kind = unit.source.kind
    if kind == "wds":
        return _read_tar(unit, errors)
    if kind == "llava_json":
        rows = _json_list(unit.file)[unit.start : unit.stop]
        return [r for i, row in enumerate(rows, unit.start) if (r := _from_row(unit, row, f"{unit.file}[{i}]", errors))]
    records = []
    with open(unit.file) as f:
        for lineno, line in enumerate(f, 1):
            if lineno <= unit.start:
                continue
            if lineno > unit.stop:
                break
            origin = f"{unit.file}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                errors["bad_json"] += 1
                log.warning("%s: skipped, bad JSON (%s)", origin, err.msg)
                continue
            if (record := _from_row(unit, row, origin, errors)) is not None:
                records.append(record)
    return records


def _read_tar(unit: WorkUnit, errors: Counter) -> list[Record]:
    """img2dataset layout: members <key>.<img ext> with <key>.txt (caption) and/or <key>.json."""
    groups: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(unit.file) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.rpartition(".")
                groups.setdefault(key, {})[ext.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError) as err:
        errors["bad_tar"] += 1
        log.warning("%s: tar unreadable from here on (%s); kept the %d samples before it", unit.file, err, len(groups))
    records = []
    for key, parts in groups.items():
        origin = f"{unit.file}:{key}"
        image = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
        caption = parts["txt"].decode("utf-8", "replace").strip() if "txt" in parts else None
        if caption is None and "json" in parts:
            try:
                meta = json.loads(parts["json"])
                caption = meta.get("caption") or meta.get("text")
            except (json.JSONDecodeError, AttributeError):
                errors["bad_json"] += 1
                log.warning("%s.json: bad JSON", origin)
        if image is None or not caption:
            errors["incomplete_sample"] += 1
            log.warning("%s: skipped, needs an image and a caption (has %s)", origin, sorted(parts))
            continue
        records.append(Record(f"{unit.source.name}/{Path(key).name}", origin, "caption", text=caption, image_bytes=image))
    return records
