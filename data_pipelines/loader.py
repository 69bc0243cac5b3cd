"""Training-time loader: a deterministic mixture of pre-tokenized sources, packed into fixed-length rows.

Order. Draw n of the global stream picks a mixture component with the configured weights (seeded by
n // 4096) and takes that component's next sample. A component walks its source epoch by epoch; each epoch
shuffles the shard order, then the samples inside windows of `shuffle_shards` shards (reads stay local).
Everything is a pure function of (seed, n, cursors), so:
  - ranks: rank r builds the documents of draws n = r (mod world) and skips the rest (the cursors still
    advance), so ranks never share a sample within a source epoch and together cover each one;
  - resume: `state_dict()` holds the next draw, the cursors and the identities of the documents waiting
    to be packed; `load_state_dict` continues with exactly the batches the uninterrupted run would give.
  - CFG dropout of draw n is seeded by (seed, n).

Trust: nothing read is used unchecked. Each shard is verified before any row of it is used (ShardReader: its
bytes against its .done.json's sha256, hashed once per process; its ids against the manifest's grid and code
vocabularies; its meta list against the manifest's counts); a bad one stops the job with one line naming it, or
with data.skip_bad_shards is skipped (logged, counted in stats). Every mixture component must make at least one
document before the first step; samples it cannot use are skipped with a warning and counted.

Packing: rows of `max_length` tokens filled first-fit from a lookahead of `pack_lookahead` documents, the
rest padded. A batch is a dict of tensors:
    input_ids    int64 [B, L]    pad = <|endoftext|>
    labels       int64 [B, L]    -100 without loss; the first token of every document is -100, so the
                                 shifted loss never crosses a document boundary
    position_ids int64 [B, L]    restart at 0 in every document (and in the padding tail)
    task_ids     int64 [B, L]    index into TASKS, -1 on padding
    cu_seqlens   int32 [D + 1]   document boundaries over the flattened B*L tokens (padding tails count as
                                 documents), for varlen attention; max_seqlen: int
    origins      list[str]       where each document came from (error reports)
    visual_codes int64 [B, L, C]  only when the visual codec carries codes beside the tokens (depth codes, C per
                                 position, tokenizer/codec.py): the visual token's codes (-1 where it is not visual)
    loader_state dict            (from batches()/iteration) the state to resume after this batch
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from semhitok.common.io import loads_json
from semhitok.data_pipelines.config import SequenceConfig, check_max_length
from semhitok.data_pipelines.readers import DataError
from semhitok.data_pipelines.sequences import IGNORE, TASKS, Document, SequenceBuilder, UnsuitableSample
from semhitok.data_pipelines.text_tokenizer import TokenLayout
from semhitok.tokenizer.interface import IdStructure

log = logging.getLogger("semhitok")
CHOICE_BLOCK = 4096  # draws whose component choices share one RNG call
MAX_UNSUITABLE_IN_A_ROW = 10_000
MAX_TOO_LONG_IN_A_ROW = 1000  # documents of one mixture component longer than max_length: then it is too short


def packing_efficiency(stats: dict) -> float:
    """Share of non-padding tokens in the rows counted by a loader's stats."""
    total = stats.get("tokens", 0) + stats.get("padding", 0)
    return stats.get("tokens", 0) / total if total else 0.0


def _one_line_errors(batches):
    """A DataError (BadShard, ...) from the background worker arrives wrapped in its traceback: keep its own line."""
    try:
        yield from batches
    except DataError as err:
        last = str(err).rstrip().splitlines()[-1]
        raise type(err)(re.sub(r"^[\w.]+\.(DataError|BadShard): ", "", last)) from None


class _Batches(torch.utils.data.IterableDataset):
    """A PackedLoader as an iterable dataset, for one background worker."""

    def __init__(self, loader: PackedLoader):
        self.loader = loader

    def __iter__(self):
        return iter(self.loader)


class BadShard(DataError):
    """A pre-tokenized shard that is not what its .done.json and the manifest say: one line naming it."""


@dataclass(frozen=True)
class ShardSpec:
    """What the manifest promises about one shard (its .done.json holds the sha256 of its bytes)."""

    path: Path  # shards/<unit>.npz
    done: Path  # shards/<unit>.done.json
    samples: int
    images: int


class ShardReader:
    """Decoded shards (the `keep` most recently used), each verified before any row of it is used: its bytes
    against the sha256 (and size, where recorded) in its .done.json, its ids against the manifest's grid and
    code vocabularies, its meta list against the manifest's counts and its own image rows. A shard is hashed
    once per process: read again (after leaving the cache) with the same size and mtime, it is not hashed
    again. Anything wrong: BadShard, one line naming the shard."""

    def __init__(self, width: int, code_vocab_sizes: list[int], keep: int):
        self.width, self.vocab, self.keep = width, np.array(code_vocab_sizes, np.int64), keep
        self._decoded: OrderedDict = OrderedDict()  # path -> (ids, meta)
        self._hashed: dict[Path, tuple[int, int]] = {}  # path -> (size, mtime_ns) when its bytes matched

    def __call__(self, spec: ShardSpec) -> tuple[np.ndarray, list[dict]]:
        if spec.path not in self._decoded:
            self._decoded[spec.path] = self._verified(spec)
            if len(self._decoded) > self.keep:
                self._decoded.popitem(last=False)
        self._decoded.move_to_end(spec.path)
        return self._decoded[spec.path]

    def _verified(self, spec: ShardSpec) -> tuple[np.ndarray, list[dict]]:
        try:
            stat = spec.path.stat()
        except OSError as err:
            raise self._bad(spec, f"cannot be read ({type(err).__name__})") from None
        signature = (stat.st_size, stat.st_mtime_ns)
        source = spec.path
        if self._hashed.get(spec.path) != signature:
            try:
                done = loads_json(spec.done.read_bytes(), spec.done.name)
                want = done["sha256"]
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise self._bad(spec, f"its {spec.done.name} is unreadable ({type(err).__name__})") from None
            data = spec.path.read_bytes()  # hashed and parsed from the same bytes
            size = done.get("size", done.get("bytes"))
            if size is not None and size != len(data):
                raise self._bad(spec, f"{len(data)} bytes, its {spec.done.name} says {size}")
            if (got := hashlib.sha256(data).hexdigest()) != want:
                raise self._bad(spec, f"sha256 {got[:12]}… is not the {str(want)[:12]}… of its {spec.done.name} "
                                      f"({len(data)} bytes: damaged or changed since pre-tokenization)")
            source = io.BytesIO(data)
        try:
            with np.load(source, allow_pickle=False) as data:
                ids, meta = data["ids"], loads_json(bytes(data["meta_json"]), "meta_json")
        except Exception as err:  # noqa: BLE001 (whatever numpy, zipfile or json raise on bad bytes)
            raise self._bad(spec, f"unreadable ({type(err).__name__}: {str(err)[:120]})") from None
        self._check(spec, ids, meta)
        self._hashed[spec.path] = signature
        return ids, meta

    def _check(self, spec: ShardSpec, ids: np.ndarray, meta) -> None:
        L = len(self.vocab)
        if ids.ndim != 2 or ids.dtype.kind not in "iu":
            raise self._bad(spec, f"ids are {ids.dtype} {list(ids.shape)}, not integer rows")
        if ids.shape[1] != self.width:
            raise self._bad(spec, f"rows of {ids.shape[1]} ids, the manifest's grid and {L} code(s) per position make {self.width}")
        if ids.shape[0] != spec.images:
            raise self._bad(spec, f"{ids.shape[0]} image rows, the manifest says {spec.images}")
        codes = ids.reshape(len(ids) * self.width // L, L)  # [images * positions, L]
        if len(ids) and ((codes.min(axis=0) < 0) | (codes.max(axis=0) >= self.vocab)).any():
            codes = codes.reshape(len(ids), self.width // L, L)
            row = int(((codes < 0) | (codes >= self.vocab)).any(axis=(1, 2)).argmax())
            raise self._bad(spec, f"image row {row} has ids outside [0, {' / '.join(map(str, self.vocab))}) "
                                  f"(min {codes[row].min()}, max {codes[row].max()})")
        if not isinstance(meta, list):
            raise self._bad(spec, f"meta_json is a JSON {type(meta).__name__}, not a list")
        if len(meta) != spec.samples:
            raise self._bad(spec, f"{len(meta)} samples in meta_json, the manifest says {spec.samples}")

        def image_row(r, lowest: int) -> bool:
            return isinstance(r, int) and not isinstance(r, bool) and lowest <= r < len(ids)

        for i, entry in enumerate(meta):
            rows = entry.get("ids_rows") if isinstance(entry, dict) else None
            if not isinstance(entry, dict) or not image_row(entry.get("ids_row"), -1) or (
                    rows is not None and not (isinstance(rows, list) and rows and all(image_row(r, 0) for r in rows))):
                raise self._bad(spec, f"sample {i}: not an object with ids_row (and ids_rows) among its {len(ids)} image rows")

    @staticmethod
    def _bad(spec: ShardSpec, why: str) -> BadShard:
        return BadShard(f"{spec.path}: bad shard, {why}; pre-tokenize its unit again (delete the shard and its "
                        f".done.json, then rerun) or set data.skip_bad_shards=true")


class SourceShards:
    """One pre-tokenized source: its shards and the per-epoch sample order, computed window by window.

    Epoch e permutes the shard order, cuts it into windows of `shuffle_shards` shards and permutes the
    samples inside each window. Only window sizes are kept per epoch and only recently used windows are
    materialised, so memory stays small for any corpus size, and several mixture components reading the
    same source at different epochs do not recompute anything large."""

    CACHE = 8  # epochs' window tables and windows kept

    def __init__(self, name: str, files: list[ShardSpec], counts: list[int], seed: int, shuffle_shards: int):
        self.name, self.files, self.counts, self.seed, self.window = name, files, np.array(counts), seed, shuffle_shards
        self.size = int(self.counts.sum())
        self._epochs: OrderedDict = OrderedDict()  # epoch -> (shard order, window start positions)
        self._windows: OrderedDict = OrderedDict()  # (epoch, window) -> [m, 2] (shard, row) in order

    @staticmethod
    def _cached(cache: OrderedDict, key, build):
        if key not in cache:
            cache[key] = build()
            if len(cache) > SourceShards.CACHE:
                cache.popitem(last=False)
        cache.move_to_end(key)
        return cache[key]

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        def build():
            order = np.random.default_rng([self.seed, epoch, *self.name.encode()]).permutation(len(self.files))
            sizes = [self.counts[order[i : i + self.window]].sum() for i in range(0, len(order), self.window)]
            return order, np.concatenate([[0], np.cumsum(sizes)])

        return self._cached(self._epochs, epoch, build)

    def _window(self, epoch: int, w: int) -> np.ndarray:
        def build():
            order, _ = self._epoch(epoch)
            block = np.concatenate([np.stack([np.full(self.counts[s], s), np.arange(self.counts[s])], 1)
                                    for s in order[w * self.window : (w + 1) * self.window]])
            return block[np.random.default_rng([self.seed, epoch, w, *self.name.encode()]).permutation(len(block))]

        return self._cached(self._windows, (epoch, w), build)

    def locate(self, cursor: int) -> tuple[int, int, int]:
        """component cursor -> (epoch, shard index, row)"""
        epoch, pos = divmod(cursor, self.size)
        _, starts = self._epoch(epoch)
        w = int(np.searchsorted(starts, pos, side="right")) - 1
        shard, row = self._window(epoch, w)[pos - starts[w]]
        return epoch, int(shard), int(row)


@dataclass
class Draw:
    n: int  # index in the global stream
    component: int
    cursor: int  # the component's cursor when drawn


class PackedLoader:
    def __init__(self, cfg: SequenceConfig, tokenizer, layout: TokenLayout, pretokenized_dir: str | Path,
                 rank: int = 0, world_size: int = 1, ids: IdStructure | None = None):
        """ids: the model's visual id structure (kind, codes per position, vocabularies); the corpus's manifest
        must agree. None: one code per position, checked by the layout's visual vocabulary only."""
        self.cfg, self.layout, self.rank, self.world, self.ids = cfg, layout, rank, world_size, ids
        weights = np.array([c.weight for c in cfg.mixture], np.float64)
        if len(weights) == 0 or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"data.mixture: weights must be >= 0 with a positive sum, got {weights.tolist()}")
        self.weights = weights / weights.sum()
        self.sources = self._open_sources(Path(pretokenized_dir))  # (sets self.shard: the verifying reader)
        self.builder = SequenceBuilder(tokenizer, layout, cfg, ids)  # (after the manifest's check: its error names the corpus)
        self.next_draw, self.cursors = 0, [0] * len(cfg.mixture)
        self.pending: list[tuple[Draw, Document]] = []
        self.stats: Counter = Counter()
        self.bad_shards: dict[Path, str] = {}  # data.skip_bad_shards: shard -> why
        self._too_long: dict[int, tuple[int, int]] = {}  # component -> (too-long documents in a row, shortest)
        self._choices: tuple[int, np.ndarray] = (-1, np.empty(0))
        self._check_components()

    def _open_sources(self, root: Path) -> dict[str, SourceShards]:
        manifest = root / "manifest.json"
        if not manifest.is_file():
            raise FileNotFoundError(f"{manifest} not found: run `semhitok pretokenize` (to completion) first")
        try:
            info = loads_json(manifest.read_bytes(), "manifest.json")
            grid, vocab, kind = [int(g) for g in info["grid"]], [int(v) for v in info["code_vocab_sizes"]], str(info["kind"])
            entries = [(str(e["source"]), e) for e in info["shards"]]
            specs = {e["unit"]: ShardSpec(root / "shards" / Path(e["file"]).name, root / "shards" / f"{Path(e['unit']).name}.done.json",
                                          int(e["samples"]), int(e["images"])) for _, e in entries}
            visual_vocab = int(info["visual_vocab_size"])
            if len(grid) != 2 or not vocab or min(grid + vocab + [visual_vocab]) < 1:
                raise ValueError(f"grid {grid}, code_vocab_sizes {vocab} and visual_vocab_size {visual_vocab} must be positive")
            if bad := next((unit for unit, spec in specs.items() if spec.samples < 0 or spec.images < 0), None):
                raise ValueError(f"unit {bad}: negative samples or images")  # (a shard of -5 samples was dropped unseen)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise DataError(f"{manifest}: unreadable ({type(err).__name__}: {str(err)[:120]}); run `semhitok pretokenize` again") from None
        self.shard = ShardReader(int(np.prod(grid)) * len(vocab), vocab, self.cfg.shard_cache)
        if visual_vocab != self.layout.visual_vocab_size:
            raise ValueError(f"{manifest}: visual_vocab_size {visual_vocab} does not match the model's "
                             f"{self.layout.visual_vocab_size} (pre-tokenized with another tokenizer?)")
        if self.ids is not None:
            found = {"kind": kind, "codes per position": len(vocab), "code_vocab_sizes": vocab, "grid": grid}
            want = {"kind": self.ids.kind, "codes per position": self.ids.codes, "code_vocab_sizes": list(self.ids.code_vocab_sizes),
                    "grid": [self.ids.grid, self.ids.grid]}
            if bad := [k for k in want if found[k] != want[k]]:
                raise ValueError(f"{manifest}: {bad[0]} {found[bad[0]]} does not match the model's {want[bad[0]]} "
                                 "(pre-tokenized with another tokenizer?)")
        check_max_length(self.cfg, grid)  # (before any shard is read: a too-short row would drop every image)
        by_source: dict[str, list[ShardSpec]] = {}
        for name, entry in sorted(entries, key=lambda e: e[1]["unit"]):
            by_source.setdefault(name, []).append(specs[entry["unit"]])
        sources = {}
        for comp in self.cfg.mixture:
            if comp.source not in by_source:
                raise ValueError(f"data.mixture: source {comp.source!r} is not in {manifest} (has {sorted(by_source)})")
            shards = [spec for spec in by_source[comp.source] if spec.samples > 0]
            sources[comp.source] = SourceShards(comp.source, shards, [spec.samples for spec in shards], self.cfg.seed,
                                                self.cfg.shuffle_shards)
        return sources

    def _check_components(self) -> None:
        """Before the first step: every mixture component makes at least one document (a text-only source asked
        for understanding would otherwise be skipped sample by sample, silently when mixed with others). Each
        component's shards are read in order up to its first usable sample; bad shards stop here already."""
        for i, comp in enumerate(self.cfg.mixture):
            if comp.weight == 0:
                continue
            source, why = self.sources[comp.source], None
            for spec in source.files:
                try:
                    ids, meta = self._read(spec)
                except BadShard:
                    if not self.cfg.skip_bad_shards:
                        raise
                    continue
                for row, entry in enumerate(meta):
                    try:
                        self._build(comp, spec, row, ids, entry, False)
                        break
                    except UnsuitableSample as err:
                        why = why or f"e.g. {spec.path.name} row {row}: {err}"
                else:
                    continue
                break
            else:
                bad = sum(spec.path in self.bad_shards for spec in source.files)
                why = why or (f"its shards are bad (data.skip_bad_shards: {bad} skipped)" if bad else "it has no samples")
                raise DataError(f"data.mixture[{i}]: source {comp.source!r} makes no {comp.task} document ({source.size} "
                                f"samples; {why}); drop the component or give it a source with such samples")

    def _read(self, spec: ShardSpec) -> tuple[np.ndarray, list[dict]]:
        """The verified shard; with data.skip_bad_shards, a bad one is logged once and remembered (BadShard)."""
        if spec.path in self.bad_shards:
            raise BadShard(self.bad_shards[spec.path])
        try:
            return self.shard(spec)
        except BadShard as err:
            if not self.cfg.skip_bad_shards:
                raise
            self.bad_shards[spec.path] = str(err)
            log.warning("skipped (data.skip_bad_shards, %d so far): %s", len(self.bad_shards), err)
            raise

    # -- the stream ----------------------------------------------------------------------------------
    def _component_of(self, n: int) -> int:
        block = n // CHOICE_BLOCK
        if self._choices[0] != block:
            rng = np.random.default_rng([self.cfg.seed, 0xC0, block])
            self._choices = (block, rng.choice(len(self.weights), CHOICE_BLOCK, p=self.weights))
        return int(self._choices[1][n % CHOICE_BLOCK])

    def _document(self, draw: Draw) -> Document:
        comp = self.cfg.mixture[draw.component]
        _, shard, row = self.sources[comp.source].locate(draw.cursor)
        spec = self.sources[comp.source].files[shard]
        ids, meta = self._read(spec)
        uncond = comp.task == "generation" and np.random.default_rng([self.cfg.seed, 0xCF, draw.n]).random() < self.cfg.cfg_dropout
        return self._build(comp, spec, row, ids, meta[row], uncond)

    def _build(self, comp, spec: ShardSpec, row: int, ids: np.ndarray, entry: dict, uncond: bool) -> Document:
        try:  # an old corpus may hold samples today's pre-tokenization would skip: name the one that fails
            rows = entry.get("ids_rows")
            image = [ids[r] for r in rows] if rows else ids[entry["ids_row"]] if entry["ids_row"] >= 0 else None
            return self.builder.build(comp.task, entry, image, uncond)
        except UnsuitableSample:
            raise
        except (TypeError, KeyError, ValueError, IndexError, AttributeError, StopIteration) as err:
            raise DataError(f"{spec.path} row {row} ({entry.get('origin', '?')}), source {comp.source!r}: cannot build a "
                            f"{comp.task} document ({type(err).__name__}: {str(err)[:200]})") from None

    def next_document(self) -> tuple[Draw, Document]:
        """The next document of this rank's share of the stream (unpacked)."""
        unsuitable = 0
        while True:
            n = self.next_draw
            comp = self._component_of(n)
            draw = Draw(n, comp, self.cursors[comp])
            self.next_draw, self.cursors[comp] = n + 1, self.cursors[comp] + 1
            if n % self.world != self.rank:
                continue
            try:
                doc = self._document(draw)
            except (BadShard, UnsuitableSample) as err:
                if isinstance(err, BadShard) and not self.cfg.skip_bad_shards:
                    raise
                unsuitable += 1  # (a bad shard: _read logged it)
                self.stats["skipped_bad_shard" if isinstance(err, BadShard) else "skipped_unsuitable"] += 1
                if isinstance(err, UnsuitableSample) and (self.stats["skipped_unsuitable"] <= 10 or self.stats["skipped_unsuitable"] % 1000 == 0):
                    log.warning("data.mixture[%d] (%s, %s): sample skipped, %s (%d so far)", comp, self.cfg.mixture[comp].source,
                                self.cfg.mixture[comp].task, err, self.stats["skipped_unsuitable"])
                if unsuitable >= MAX_UNSUITABLE_IN_A_ROW:
                    raise ValueError(f"data.mixture[{comp}] ({self.cfg.mixture[comp].source}, "
                                     f"{self.cfg.mixture[comp].task}): {unsuitable} unusable samples in a row ({err})") from None
                continue
            length, doc = len(doc), self._fit(doc)
            if doc is not None:
                self._too_long[comp] = (0, 0)
                return draw, doc
            self._refuse_if_nothing_fits(comp, length)

    def _fit(self, doc: Document) -> Document | None:
        """Text longer than max_length is cut; longer image documents are skipped (never cut an image)."""
        if len(doc) <= self.cfg.max_length:
            return doc
        if doc.task == "text":
            return Document(doc.tokens[: self.cfg.max_length], doc.labels[: self.cfg.max_length], doc.task, doc.origin)
        self.stats["skipped_too_long"] += 1
        if self.stats["skipped_too_long"] <= 10 or self.stats["skipped_too_long"] % 1000 == 0:
            log.warning("%s: %d tokens > max_length %d, skipped (%d so far)", doc.origin, len(doc), self.cfg.max_length,
                        self.stats["skipped_too_long"])
        return None

    def _refuse_if_nothing_fits(self, comp: int, length: int) -> None:
        """MAX_TOO_LONG_IN_A_ROW documents of one mixture component in a row too long for a row: max_length
        is too short for that task (training would silently drop it, or hang when it is the only one)."""
        count, shortest = self._too_long.get(comp, (0, 0))
        count, shortest = count + 1, min(shortest or length, length)
        self._too_long[comp] = (count, shortest)
        if count >= MAX_TOO_LONG_IN_A_ROW:
            c = self.cfg.mixture[comp]
            raise DataError(f"data.max_length={self.cfg.max_length} holds no {c.task} document of {c.source!r}: {count} in a "
                             f"row were longer (the shortest {shortest} tokens); set data.max_length >= {shortest} or drop "
                             f"the component from data.mixture")

    # -- packing -------------------------------------------------------------------------------------
    def _next_row(self) -> list[Document]:
        room, row = self.cfg.max_length, []
        while room > 0:
            while len(self.pending) < self.cfg.pack_lookahead:
                self.pending.append(self.next_document())
            fit = next((i for i, (_, doc) in enumerate(self.pending) if len(doc) <= room), None)
            if fit is None:
                break
            _, doc = self.pending.pop(fit)
            row.append(doc)
            room -= len(doc)
        return row

    def next_batch(self) -> dict:
        L, B = self.cfg.max_length, self.cfg.micro_batch_size
        input_ids = np.full((B, L), self.layout.eos, np.int64)
        labels = np.full((B, L), IGNORE, np.int64)
        position_ids = np.zeros((B, L), np.int64)
        task_ids = np.full((B, L), -1, np.int64)
        codes = self.builder.codec.batch_codes((B, L))  # [B, L, C] beside the tokens, or None
        cu_seqlens, origins = [0], []
        for b in range(B):
            start = 0
            for doc in self._next_row():
                end = start + len(doc)
                input_ids[b, start:end], labels[b, start:end] = doc.tokens, doc.labels
                labels[b, start] = IGNORE
                position_ids[b, start:end] = np.arange(len(doc))
                task_ids[b, start:end] = TASKS.index(doc.task)
                if codes is not None and doc.codes is not None:
                    codes[b, start:end] = doc.codes
                cu_seqlens.append(b * L + end)
                origins.append(doc.origin)
                self.stats[f"docs_{doc.task}"] += 1
                self.stats["uncond"] += doc.uncond
                start = end
            if start < L:
                position_ids[b, start:] = np.arange(L - start)
                cu_seqlens.append((b + 1) * L)
            self.stats["tokens"] += start
            self.stats["padding"] += L - start
        lengths = np.diff(cu_seqlens)
        batch = {
            "input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(position_ids), "task_ids": torch.from_numpy(task_ids),
            "cu_seqlens": torch.tensor(cu_seqlens, dtype=torch.int32), "max_seqlen": int(lengths.max()),
            "origins": origins,
        }
        if codes is not None:
            batch["visual_codes"] = torch.from_numpy(codes)
        return batch

    def __iter__(self):
        """Batches forever, each carrying "loader_state": the state_dict() right after it was built."""
        while True:
            batch = self.next_batch()
            batch["loader_state"] = self.state_dict()
            yield batch

    def batches(self, prefetch: int = 0):
        """Iterate over batches (with their "loader_state"); prefetch > 0 builds them in a background
        process, that many ahead, so tokenizing and packing overlap the training step. Resume from the
        "loader_state" of the last batch consumed, never from this object's own state."""
        if prefetch <= 0:
            return iter(self)
        return _one_line_errors(iter(torch.utils.data.DataLoader(_Batches(self), batch_size=None, num_workers=1,
                                                                 prefetch_factor=prefetch, persistent_workers=True)))

    @property
    def packing_efficiency(self) -> float:
        return packing_efficiency(self.stats)

    # -- resume --------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"next_draw": self.next_draw, "cursors": list(self.cursors), "rank": self.rank, "world_size": self.world,
                "pending": [[d.n, d.component, d.cursor] for d, _ in self.pending], "stats": dict(self.stats)}

    def load_state_dict(self, state: dict, where: str = "loader state") -> None:
        """state_dict's value back; where (its file) names it in the one-line error a state of another shape gets."""
        def counts(values) -> bool:
            return isinstance(values, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values)

        if not (isinstance(state, dict) and {"next_draw", "cursors", "rank", "world_size", "pending", "stats"} <= state.keys()
                and counts([state["next_draw"], state["rank"], state["world_size"]]) and counts(state["cursors"])
                and isinstance(state["pending"], list) and isinstance(state["stats"], dict)
                and all(counts(p) and len(p) == 3 and p[1] < len(self.cfg.mixture) for p in state["pending"])
                and all(isinstance(k, str) and counts([v]) for k, v in state["stats"].items())):
            raise ValueError(f"{where}: not a loader state (PackedLoader.state_dict: counts, cursors, pending draws, stats)")
        if (state["rank"], state["world_size"]) != (self.rank, self.world) or len(state["cursors"]) != len(self.cfg.mixture):
            raise ValueError(f"{where} is for rank {state['rank']}/{state['world_size']} with "
                             f"{len(state['cursors'])} mixture components; this loader is rank {self.rank}/{self.world} "
                             f"with {len(self.cfg.mixture)}")
        self.next_draw, self.cursors = state["next_draw"], list(state["cursors"])
        self.pending = []
        self.stats = Counter(state["stats"])
        for n, comp, cursor in state["pending"]:
            draw = Draw(n, comp, cursor)
            try:
                self.pending.append((draw, self._fit(self._document(draw))))
            except BadShard:  # a shard damaged since the checkpoint
                if not self.cfg.skip_bad_shards:
                    raise
                self.stats["skipped_bad_shard"] += 1
