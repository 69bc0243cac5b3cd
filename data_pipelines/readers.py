"""Corpus readers: split sources into work units and read a unit's records.

A work unit is one webdataset tar (streamed with the `webdataset` library: local files, URLs, `pipe:`
commands), or `records_per_shard` consecutive records of a jsonl/json file. Units are the grain of
resumption and of splitting across jobs. Every field is checked when it is read (types, UTF-8, empty
text, roles, one image per <image> tag, captions and conversations at most max_text_tokens tokens); a bad
sample is counted by kind and logged with its origin (file:line, file[index] or tar:key) and never stops
the job.

Reading a unit also says what it read of its input (`InputRead`): the byte count and sha256 of the whole
file (jsonl/json, local tar) or of the whole stream (URL, `pipe:`), and whether it got to the end without
an error. A stream is read to its end (after the tar's last member too) and closed, so a command's exit
status and a download's failure are seen; a tar whose bytes all arrived but whose content is broken is a
counted `bad_tar`, the unit still complete. A local input's identity is its content, never its spelling:
`data/x.jsonl`, `/abs/data/x.jsonl` and a copy elsewhere are the same input (`local_input`).
"""

from __future__ import annotations

import functools
import glob
import hashlib
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import webdataset as wds

from semhitok.common.io import loads_json, sha256_file_cached
from semhitok.data_pipelines.config import SourceConfig
from semhitok.data_pipelines.sequences import ROLES
from semhitok.data_pipelines.text_tokenizer import SPECIAL_TOKENS

log = logging.getLogger("semhitok")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
IMAGE_TAG = "<image>"
SOURCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
URL = re.compile(r"^(pipe:|[A-Za-z][A-Za-z0-9+.-]*://)")  # streamed as is; anything else is a local glob
# A lower bound of a text's token count in every supported text tokenizer: byte-level BPE (Qwen, GPT-style
# pre-tokenization) and sentencepiece (LLaMA) never join two whitespace-separated words into one token, and no
# token is longer than this many UTF-8 bytes (Qwen2.5's longest is 128; LLaMA's pieces are at most 16 characters).
MAX_TOKEN_BYTES = 128


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
    max_text_tokens: int = 0  # longer captions and conversations are skipped as text_too_long (0: no bound)

    @property
    def name(self) -> str:
        return f"{self.source.name}-{self.index:05d}"

    @property
    def is_stream(self) -> bool:
        return bool(URL.match(self.file))

    def identity(self) -> dict:
        """What the unit's samples depend on besides its input's content and the tokenizer: a finished unit is
        reused only if equal. Folders by where they are (resolved), not by how they are spelled."""
        root = os.path.realpath(self.source.image_root) if self.source.image_root else ""
        return {"source": self.source.name, "kind": self.source.kind, "records": [self.start, self.stop],
                "records_per_shard": self.records_per_shard, "image_root": root, "max_text_tokens": self.max_text_tokens}


@dataclass
class InputRead:
    """What reading a unit saw of its input: the content (byte count and sha256) of the whole file or stream, the
    file's stat when it is local, and why it could not be read to the end without an error (then the unit is
    not done: it is retried, never sealed)."""
    bytes: int = 0
    sha256: str = ""
    stat: dict | None = None  # {"path": resolved, "size", "mtime_ns"} of a local input
    failure: str | None = None

    def content(self) -> dict:
        return {"bytes": self.bytes, "sha256": self.sha256}


def file_stat(path: str) -> dict:
    st = os.stat(path)
    return {"path": os.path.realpath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def local_input(path: str) -> InputRead:
    """A local file's content and stat, hashed once per process while the file is unchanged (size, mtime)."""
    stat = file_stat(path)
    return InputRead(bytes=stat["size"], sha256=sha256_file_cached(stat["path"], stat["size"], stat["mtime_ns"]), stat=stat)


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
    # the chat format's control tokens: written in a text they would tokenize as the token, not as the characters
    if found := next((token for token in SPECIAL_TOKENS if token in value), None):
        return f"contains the control token {found} of the chat format"
    return None


def fewest_tokens(text: str) -> int:
    """A lower bound of `text`'s token count in every supported text tokenizer (see MAX_TOKEN_BYTES)."""
    return max(len(text.split()), -(-len(text.encode("utf-8")) // MAX_TOKEN_BYTES))


def too_long(unit: WorkUnit, texts: list[str]) -> str | None:
    """Why texts (a caption, a conversation's turns) could never be trained on (None: they might)."""
    bound = unit.max_text_tokens
    if not bound or sum(len(t) for t in texts) <= bound:  # a token is at least one character
        return None
    if (n := sum(fewest_tokens(t) for t in texts)) > bound:
        return f"its text has at least {n} tokens (pretokenize.max_text_tokens={bound})"
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
        data = loads_json(Path(path).read_bytes(), str(path))  # depth-limited
    except ValueError as err:  # invalid, not UTF-8, or nested deeper than MAX_JSON_DEPTH
        raise DataError(f"{path}: not a JSON file ({str(err).removeprefix(f'{path}: ')})") from None
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


def plan_units(sources: list[SourceConfig], records_per_shard: int, max_text_tokens: int = 0) -> list[WorkUnit]:
    """Every unit of every source, in a fixed order (the same in every job of an array)."""
    check_sources(sources)
    if not isinstance(records_per_shard, int) or records_per_shard < 1:
        raise DataError(f"pretokenize.records_per_shard must be an integer >= 1, got {records_per_shard!r}")
    units: list[WorkUnit] = []
    for source in sources:
        if source.kind == "wds":
            units += [WorkUnit(source, i, url, max_text_tokens=max_text_tokens) for i, url in enumerate(_tar_urls(source))]
        else:
            n = _count_records(source)
            units += [
                WorkUnit(source, i, source.path, start, min(start + records_per_shard, n), records_per_shard, max_text_tokens)
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
        if why := too_long(unit, [row["caption"]]):
            return skip(errors, "text_too_long", origin, why)
        record = Record(key, origin, "caption", text=row["caption"])
    else:  # llava_json
        conv = row.get("conversations")
        if problem := _turns_problem(conv):
            return skip(errors, problem[0], origin, problem[1])
        if not _tags_match(conv, len(images)):
            return skip(errors, "image_tag_mismatch", origin, f"{len(images)} image(s) for the {IMAGE_TAG} tags of its user turns")
        if why := too_long(unit, [t.get("value", t.get("content")) for t in conv]):
            return skip(errors, "text_too_long", origin, why)
        record = Record(key, origin, "conversation", conversations=conv)
    record.images = [str(_image_root(unit) / image) for image in images]
    for path in record.images:
        if not Path(path).is_file():
            return skip(errors, "missing_file", origin, f"image {path} not found")
    return record


def read_unit(unit: WorkUnit, errors: Counter, got: InputRead | None = None) -> Iterator[Record]:
    """The unit's usable records, streamed; problems go to `errors` (and the log) by kind. `got` (if given) is
    filled with what was read of the input: its content, and a failure if it could not be read to the end."""
    got = InputRead() if got is None else got
    if unit.source.kind == "wds":
        yield from _read_tar(unit, errors, got)
        return
    try:
        before = local_input(unit.file)
        yield from _read_rows(unit, errors)
        after = file_stat(unit.file)
    except OSError as err:
        got.failure = f"{unit.file}: {type(err).__name__}: {err}"
        return
    got.bytes, got.sha256, got.stat = before.bytes, before.sha256, before.stat
    if after != before.stat:
        got.failure = f"{unit.file} changed while it was read"


def _read_rows(unit: WorkUnit, errors: Counter) -> Iterator[Record]:
    if unit.source.kind == "llava_json":
        for i, row in enumerate(_json_list(unit.file)[unit.start : unit.stop], unit.start):
            if (record := _from_row(unit, row, f"{unit.file}[{i}]", errors)) is not None:
                yield record
        return
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
                row = loads_json(line, "row")
            except ValueError as err:  # bad JSON, not UTF-8, nested deeper than MAX_JSON_DEPTH, huge integers
                skip(errors, "bad_json", origin, f"bad JSON ({str(err)[:100]})")
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
            meta = loads_json(sample["json"], ".json")
        except ValueError as err:
            return skip(errors, "bad_json", origin, str(err)[:200])
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


class _HashingStream:
    """A read-only stream that counts and hashes what passes through it, and remembers a read that failed
    (a `pipe:` command's exit status, a dropped download: webdataset's Pipe raises them from read)."""

    def __init__(self, stream):
        self.stream, self.sha, self.bytes, self.failure = stream, hashlib.sha256(), 0, None

    def read(self, *args) -> bytes:
        try:
            data = self.stream.read(*args)
        except Exception as err:
            self.failure = self.failure or f"{type(err).__name__}: {str(err)[:200]}"
            raise
        self.sha.update(data)
        self.bytes += len(data)
        return data

    def finish(self) -> None:
        """Read to the end (what follows the tar's last member too) and close: a stream's exit status is known
        only then."""
        try:
            while self.failure is None and self.read(1 << 20):
                pass
        except Exception:  # noqa: BLE001, S110 (read has recorded it as the failure)
            pass
        try:
            self.stream.close()
        except Exception as err:  # noqa: BLE001 (Pipe.close raises on a non-zero exit status)
            self.failure = self.failure or f"{type(err).__name__}: {str(err)[:200]}"


def _read_tar(unit: WorkUnit, errors: Counter, got: InputRead) -> Iterator[Record]:
    """img2dataset layout: members <key>.<img ext> with <key>.txt (caption) and/or <key>.json, streamed
    member by member (never the whole tar in memory)."""
    try:
        stat = None if unit.is_stream else file_stat(unit.file)
        stream = _HashingStream(wds.gopen(unit.file))
    except Exception as err:  # noqa: BLE001 (a file gone, a scheme gopen cannot open)
        got.failure = f"{unit.file}: {type(err).__name__}: {str(err)[:200]}"
        return

    def handler(err: Exception) -> bool:  # webdataset reports stream errors here, then moves on
        if stream.failure is None:  # the bytes came, the tar in them is broken: counted, the unit complete
            why = str(err.args[0]) if err.args else type(err).__name__
            skip(errors, "bad_tar", unit.file, f"what could not be read ({type(err).__name__}: {why[:200]}); the samples before it are kept")
        return True

    files = wds.tariterators.tar_file_expander([{"url": unit.file, "stream": stream}], handler=handler)
    try:
        for sample in wds.tariterators.group_by_keys(files, handler=handler):
            key = sample["__key__"]
            origin = f"{unit.file}:{key}"
            image = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
            if image is None:
                skip(errors, "incomplete_sample", origin, f"needs an image and a caption (has {sorted(k for k in sample if not k.startswith('__'))})")
                continue
            if (caption := _tar_caption(sample, origin, errors)) is not None:
                if why := too_long(unit, [caption]):
                    skip(errors, "text_too_long", origin, why)
                    continue
                yield Record(f"{unit.source.name}/{Path(key).name}", origin, "caption", text=caption, images=[image])
    finally:
        stream.finish()
        got.bytes, got.sha256, got.stat = stream.bytes, stream.sha.hexdigest(), stat
        if stream.failure:
            got.failure = f"{unit.file}: {stream.failure} after {stream.bytes} bytes"
        elif stat is not None and file_stat(unit.file) != stat:
            got.failure = f"{unit.file} changed while it was read"
