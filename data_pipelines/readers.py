"""Corpus readers: split sources into work units and read a unit's records.

A work unit is one webdataset tar (streamed with the `webdataset` library: local files, URLs, `pipe:`
commands), or `records_per_shard` consecutive records of a jsonl/json file. Units are the grain of
resumption and of splitting across jobs. Every field is checked when it is read (types, UTF-8, empty
text, roles, one image per <image> tag); a bad sample is counted by kind and logged with its origin
(file:line, file[index] or tar:key) and never stops the job.
"""

from __future__ import annotations

import functools
import glob
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import webdataset as wds

from semhitok.data_pipelines.config import SourceConfig
from semhitok.data_pipelines.sequences import ROLES

log = logging.getLogger("semhitok")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
IMAGE_TAG = "<image>"
SOURCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
URL = re.compile(r"^(pipe:|[A-Za-z][A-Za-z0-9+.-]*://)")  # streamed as is; anything else is a local glob


class DataError(ValueError):
    """Data that cannot be used as a whole (a source, a file, a finished unit): one line naming it."""


@dataclass(frozen=True)
class WorkUnit:
    source: SourceConfig
    index: int
    file: str  # a path, or a URL / pipe: command for tars
    start: int = 0  # record range [start, stop) for jsonl/json sources
    stop: int = 0
    records_per_shard: int = 0  # what cut the range (0 for a tar)

    @property
    def name(self) -> str:
        return f"{self.source.name}-{self.index:05d}"

    def identity(self) -> dict:
        """What the unit's samples depend on (besides the tokenizer): a finished unit is reused only if equal."""
        return {"source": self.source.name, "kind": self.source.kind, "input": self.file, "records": [self.start, self.stop],
                "records_per_shard": self.records_per_shard, "image_root": self.source.image_root}


@dataclass
class Record:
    key: str
    origin: str
    kind: str  # caption | conversation | text
    text: str | None = None
    conversations: list | None = None
    images: list[str | bytes] = field(default_factory=list)  # file paths or encoded bytes, one per <image>

    @property
    def has_image(self) -> bool:
        return bool(self.images)


def skip(errors: Counter, kind: str, origin: str, why: str) -> None:
    """Count a skipped sample under `kind` and log it with its origin."""
    errors[kind] += 1
    log.warning("%s: skipped, %s", origin, why)


def text_problem(value) -> str | None:
    """Why `value` cannot be a text field (None: it can)."""
    if not isinstance(value, str):
        return "missing" if value is None else f"a {type(value).__name__}, not a string"
    if not value.strip():
        return "empty"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "not encodable as UTF-8 (a lone surrogate)"
    return None


def check_sources(sources: list[SourceConfig]) -> None:
    seen = set()
    for i, s in enumerate(sources):
        if not isinstance(s.name, str) or not SOURCE_NAME.fullmatch(s.name) or ".." in s.name:
            raise DataError(f"pretokenize.sources[{i}].name {s.name!r}: use letters, digits, '_', '.', '-' "
                            "(no path separators, no '..', not starting with '.' or '-')")
        if s.name in seen:
            raise DataError(f"pretokenize.sources[{i}].name {s.name!r}: two sources have this name")
        seen.add(s.name)


@functools.lru_cache(maxsize=1)
def _json_list(path: str) -> list:
    """A LLaVA json file, parsed once for all the units a process reads from it in a row."""
    try:
        data = json.loads(Path(path).read_bytes())
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise DataError(f"{path}: not a JSON file ({type(err).__name__}: {str(err)[:200]})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: must hold a JSON list of conversations, not a {type(data).__name__}")
    return data


def _count_records(source: SourceConfig) -> int:
    path = Path(source.path)
    if not path.is_file():
        raise FileNotFoundError(f"source {source.name!r}: {path} not found")
    if source.kind == "llava_json":
        return len(_json_list(str(path)))
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def _tar_urls(source: SourceConfig) -> list[str]:
    """A wds path -> its tars: "::"-separated parts, braces expanded (webdataset's rules), local globs sorted."""
    urls = []
    for part in wds.shardlists.expand_urls(source.path):
        if URL.match(part):
            urls.append(part)
        elif not (matches := sorted(glob.glob(part))):
            raise FileNotFoundError(f"source {source.name!r}: no tar matches {part}")
        else:
            urls += matches
    return urls


def plan_units(sources: list[SourceConfig], records_per_shard: int) -> list[WorkUnit]:
    """Every unit of every source, in a fixed order (the same in every job of an array)."""
    check_sources(sources)
    if not isinstance(records_per_shard, int) or records_per_shard < 1:
        raise DataError(f"pretokenize.records_per_shard must be an integer >= 1, got {records_per_shard!r}")
    units: list[WorkUnit] = []
    for source in sources:
        if source.kind == "wds":
            units += [WorkUnit(source, i, url) for i, url in enumerate(_tar_urls(source))]
        else:
            n = _count_records(source)
            units += [
                WorkUnit(source, i, source.path, start, min(start + records_per_shard, n), records_per_shard)
                for i, start in enumerate(range(0, n, records_per_shard))
            ]
    return units


def _image_root(unit: WorkUnit) -> Path:
    return Path(unit.source.image_root) if unit.source.image_root else Path(unit.file).parent


def _image_list(value, many: bool) -> list[str] | None:
    """The "image" field -> paths ([] without one); None if it is not a path (or, if `many`, a list of them)."""
    if value is None or value == "" or (many and value == []):
        return []
    if isinstance(value, str):
        return [value]
    if many and isinstance(value, list) and all(isinstance(v, str) and v for v in value):
        return list(value)
    return None


def _turns_problem(conv) -> tuple[str, str] | None:
    """(error kind, why) when "conversations" is not a usable list of turns."""
    if not isinstance(conv, list) or not conv:
        return "bad_json", "\"conversations\" is not a non-empty list of turns"
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict):
            return "bad_json", f"turn {i} is not an object"
        role = turn.get("from", turn.get("role"))
        if not isinstance(role, str) or role not in ROLES:
            return "bad_json", f"turn {i} has role {role!r} (one of {sorted(ROLES)})"
        if why := text_problem(turn.get("value", turn.get("content"))):
            return "bad_text", f"turn {i}'s text is {why}"
    return None


def _tags_match(conv: list, n_images: int) -> bool:
    """One image per <image> tag in the user turns, where the sequence builder places images (a lone image
    may have no tag: it goes before the first user turn, so there must be one)."""
    roles = [ROLES[t.get("from", t.get("role"))] for t in conv]
    tags = sum(t.get("value", t.get("content")).count(IMAGE_TAG) for t, role in zip(conv, roles) if role == "user")
    return tags == n_images or (n_images == 1 and tags == 0 and "user" in roles)


def _from_row(unit: WorkUnit, row, origin: str, errors: Counter) -> Record | None:
    kind = unit.source.kind
    if not isinstance(row, dict):
        return skip(errors, "bad_json", origin, "not a JSON object")
    ident = row.get("id")
    key = f"{unit.source.name}/{ident if isinstance(ident, (str, int)) and not isinstance(ident, bool) else origin.rsplit(':', 1)[-1]}"
    if kind == "text_jsonl":
        if why := text_problem(row.get("text")):
            return skip(errors, "bad_text", origin, f"\"text\" is {why}")
        return Record(key, origin, "text", text=row["text"])
    images = _image_list(row.get("image"), many=kind == "llava_json")
    if images is None:
        return skip(errors, "bad_json", origin, "\"image\" is not a path" + (" or a list of paths" if kind == "llava_json" else ""))
    if kind == "caption_jsonl":
        if not images:
            return skip(errors, "bad_json", origin, "needs \"image\" and \"caption\"")
        if why := text_problem(row.get("caption")):
            return skip(errors, "bad_text", origin, f"\"caption\" is {why}")
        record = Record(key, origin, "caption", text=row["caption"])
    else:  # llava_json
        conv = row.get("conversations")
        if problem := _turns_problem(conv):
            return skip(errors, problem[0], origin, problem[1])
        if not _tags_match(conv, len(images)):
            return skip(errors, "image_tag_mismatch", origin, f"{len(images)} image(s) for the {IMAGE_TAG} tags of its user turns")
        record = Record(key, origin, "conversation", conversations=conv)
    record.images = [str(_image_root(unit) / image) for image in images]
    for path in record.images:
        if not Path(path).is_file():
            return skip(errors, "missing_file", origin, f"image {path} not found")
    return record


def read_unit(unit: WorkUnit, errors: Counter) -> Iterator[Record]:
    """The unit's usable records, streamed; problems go to `errors` (and the log) by kind."""
    kind = unit.source.kind
    if kind == "wds":
        yield from _read_tar(unit, errors)
    elif kind == "llava_json":
        for i, row in enumerate(_json_list(unit.file)[unit.start : unit.stop], unit.start):
            if (record := _from_row(unit, row, f"{unit.file}[{i}]", errors)) is not None:
                yield record
    else:
        with open(unit.file, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if lineno <= unit.start:
                    continue
                if lineno > unit.stop:
                    break
                if not line.strip():
                    continue
                origin = f"{unit.file}:{lineno}"
                try:
                    row = json.loads(line)
                except (ValueError, RecursionError) as err:  # bad JSON, not UTF-8, too deep, huge integers
                    skip(errors, "bad_json", origin, f"bad JSON ({type(err).__name__}: {str(err)[:100]})")
                    continue
                if (record := _from_row(unit, row, origin, errors)) is not None:
                    yield record


def _tar_caption(sample: dict, origin: str, errors: Counter) -> str | None:
    """A tar sample's caption: <key>.txt (stripped), else "caption" (or "text") of <key>.json; None if skipped."""
    if "txt" in sample:
        try:
            text = sample["txt"].decode("utf-8").strip()
        except UnicodeDecodeError:
            return skip(errors, "bad_text", origin, ".txt caption is not UTF-8")
        if text:
            return text
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except (ValueError, RecursionError) as err:
            return skip(errors, "bad_json", origin, f".json is not JSON ({type(err).__name__})")
        if not isinstance(meta, dict):
            return skip(errors, "bad_json", origin, ".json is not an object")
        caption = meta.get("caption", meta.get("text"))
        if caption is not None or "txt" not in sample:
            if why := text_problem(caption):
                return skip(errors, "bad_text" if caption is not None else "incomplete_sample", origin, f".json caption is {why}")
            return caption
    if "txt" in sample:
        return skip(errors, "bad_text", origin, ".txt caption is empty")
    return skip(errors, "incomplete_sample", origin, f"needs an image and a caption (has {sorted(k for k in sample if not k.startswith('__'))})")


def _read_tar(unit: WorkUnit, errors: Counter) -> Iterator[Record]:
    """img2dataset layout: members <key>.<img ext> with <key>.txt (caption) and/or <key>.json, streamed
    member by member (never the whole tar in memory)."""

    def handler(err: Exception) -> bool:  # webdataset reports stream errors here, then moves on
        why = str(err.args[0]) if err.args else type(err).__name__
        skip(errors, "bad_tar", unit.file, f"what could not be read ({type(err).__name__}: {why[:200]}); the samples before it are kept")
        return True

    for sample in wds.tariterators.tarfile_samples([{"url": unit.file}], handler=handler):
        key = sample["__key__"]
        origin = f"{unit.file}:{key}"
        image = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
        if image is None:
            skip(errors, "incomplete_sample", origin, f"needs an image and a caption (has {sorted(k for k in sample if not k.startswith('__'))})")
            continue
        if (caption := _tar_caption(sample, origin, errors)) is not None:
            yield Record(f"{unit.source.name}/{Path(key).name}", origin, "caption", text=caption, images=[image])
