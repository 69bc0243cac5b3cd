"""Offline pre-tokenization: corpora -> sharded visual ids + text, once, resumable.

Output (`<output_dir>/`):
    shards/<source>-<unit>.npz       ids: int32 [n_images, h*w*L] (each image's positions row-major, the L codes
                                       of a position consecutive: position-major, code-minor; L = 1: h*w ids)
                                     meta_json: uint8 bytes of a JSON list, one entry per sample:
                                       {key, origin, kind, text | conversations, ids_row (-1: no image),
                                        ids_rows (only with several images: one row per <image>, in order)}
    shards/<source>-<unit>.done.json that unit's counts, errors, the shard's sha256 and its identity
                                     (the input's content, record range, records_per_shard, kind, image mode
                                     and root, max_text_tokens, tokenizer), written last
    manifest.json                    every unit, totals and the tokenizer's identity, kind, grid, code_vocab_sizes (L
                                     entries), code_groups and visual_vocab_size (the LLM's visual rows, as the
                                     visual codec lays them out: tokenizer/codec.py) (when all are done)

A unit is done iff its .done.json exists and describes the same unit; both files are written atomically, so
a job killed anywhere and started again redoes at most the units it was in the middle of, and writes every
sample exactly once. A unit is sealed only when its input was read to the end without an error (a `pipe:`
command that exits non-zero, a download that fails, a file that changes while it is read): such a unit is
left not done, the job ends with one line naming it, and a rerun retries it. A finished unit made
differently (another input content, records_per_shard, kind, image mode or tokenizer) is refused, never
mixed in; `check_resume` says so before a command records anything. An input is known by its content
(byte count and sha256; readers.InputRead), so the same file spelled another way, or an identical copy
elsewhere (a checkout's data/ and an installed wheel's), resumes; a local file whose path, size and mtime
are as recorded is not hashed again. A stream (URL, `pipe:`) is known by its spelling: it is not read again
to be checked. Images are bounded before they are decoded (max_image_pixels, max_aspect_ratio), texts by
max_text_tokens. Units are split across jobs by index modulo --num-shards (or SLURM array / task variables).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from semhitok.common.io import atomic_path, check_output_dir, loads_json, sha256_file, write_json
from semhitok.data_pipelines.config import PretokenizeConfig, SourceConfig
from semhitok.data_pipelines.readers import (DataError, InputRead, Record, WorkUnit, file_stat, local_input, plan_units,
                                             read_unit)
from semhitok.tokenizer import load_tokenizer, preprocess
from semhitok.tokenizer.data import ImageLimits, ImageRejected, open_rgb
from semhitok.tokenizer.interface import IdStructure, VisualTokenizer, positions_and_codes

log = logging.getLogger("semhitok")


def job_split(num_shards: int | None = None, shard_index: int | None = None) -> tuple[int, int]:
    """(number of jobs, this job's index): explicit values, else a SLURM array, else SLURM tasks, else (1, 0)."""
    if num_shards is None:
        env = os.environ
        if "SLURM_ARRAY_TASK_COUNT" in env:
            num_shards, shard_index = int(env["SLURM_ARRAY_TASK_COUNT"]), int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        elif "SLURM_NTASKS" in env:
            num_shards, shard_index = int(env["SLURM_NTASKS"]), int(env["SLURM_PROCID"])
        else:
            num_shards, shard_index = 1, 0
    shard_index = 0 if shard_index is None else shard_index
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard index {shard_index} is outside [0, {num_shards})")
    return num_shards, shard_index


class _UnitStream(torch.utils.data.IterableDataset):
    """Reads and decodes whole units in DataLoader workers (worker w takes units w, w + W, ...).

    Yields, per record of a unit in order, (unit index, entry, images) where entry is the record's metadata
    and images a list of [3, S, S] tensors in [-1, 1] (empty: no image) or (error kind, reason) when one
    of them is unusable; then (unit index, None, (errors, InputRead)) once the unit is read. The workers stay
    alive across units."""

    def __init__(self, units: list[WorkUnit], size: int, limits: ImageLimits):
        self.units, self.size, self.limits = units, size, limits

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for u in range(worker, len(self.units), workers):
            errors: Counter = Counter()
            got = InputRead()
            for r in read_unit(self.units[u], errors, got):
                entry = {"key": r.key, "origin": r.origin, "kind": r.kind}
                entry.update({"text": r.text} if r.conversations is None else {"conversations": r.conversations})
                yield u, entry, self._decode(r, image_mode(self.units[u].source))
            yield u, None, (dict(errors), got)

    def _decode(self, r: Record, mode: str) -> list[torch.Tensor] | tuple[str, str]:
        images = []
        for i, source in enumerate(r.images):
            try:
                images.append(preprocess([open_rgb(source, self.limits, self.size)], self.size, mode)[0])
            except ImageRejected as err:
                return err.kind, f"{source if isinstance(source, str) else f'image {i}'}: {err}"
        return images


def image_mode(source: SourceConfig) -> str:
    """auto: pad to square for LLaVA conversations (understanding), centre crop for captions (generation)."""
    return source.image_mode if source.image_mode != "auto" else "pad" if source.kind == "llava_json" else "crop"


def load_shard(path: str | Path) -> tuple[np.ndarray, list[dict]]:
    """A pre-tokenized shard -> (ids int32 [n_images, h*w*L], per-sample metadata)."""
    with np.load(path, allow_pickle=False) as data:
        return data["ids"], loads_json(bytes(data["meta_json"]), f"{path}: meta_json")


def tokenizer_identity(tokenizer_dir: str | Path) -> str:
    """sha256 over the tokenizer's config.json and model.safetensors: ids from two tokenizers never mix."""
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        path = Path(tokenizer_dir) / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: pass a directory written by a tokenizer's save_pretrained")
        h.update(sha256_file(path).encode())
    return h.hexdigest()


def unit_identity(unit: WorkUnit, tokenizer_id: str | None) -> dict:
    """What a unit's samples depend on, besides its input's content (InputRead.content, stored as "input")."""
    return {**unit.identity(), "image_mode": image_mode(unit.source), "tokenizer": tokenizer_id}


def _input_differs(unit: WorkUnit, done: dict) -> str | None:
    """Why the unit's input is not the one the finished unit read (None: it is): a stream by its spelling; a
    local file by its content, hashed again only when its resolved path, size or mtime are not as recorded."""
    found = done["identity"]["input"]
    if unit.is_stream:
        return None if found.get("url") == unit.file else f"input was the stream {found.get('url')!r}, now {unit.file!r}"
    try:
        if done.get("input_stat") == file_stat(unit.file):
            return None
        now = local_input(unit.file).content()
    except OSError as err:
        return f"input {unit.file} cannot be read ({type(err).__name__})"
    if now == {k: found.get(k) for k in now}:
        return None
    return (f"input {unit.file} has other content: {now['bytes']} bytes, sha256 {now['sha256'][:12]}, was {found.get('bytes')} "
            f"bytes, sha256 {str(found.get('sha256'))[:12]}")


def check_done(unit: WorkUnit, done: dict, expected: dict, path: Path) -> None:
    """Refuse a finished unit that another configuration or another input made (mixing would duplicate, drop or
    relabel samples). expected["tokenizer"] None: the tokenizer is not compared (not trained yet)."""
    found = done.get("identity")
    if not isinstance(found, dict) or not isinstance(found.get("input"), dict):
        what = "it records no input content (written by an older version)"
    else:
        differs = [f"{k} was {found.get(k)!r}, now {v!r}" for k, v in expected.items()
                   if found.get(k) != v and not (k == "tokenizer" and v is None)]
        what = "; ".join(differs) or _input_differs(unit, done)
        if not what:
            return
    raise DataError(f"{path}: unit {unit.name} was pre-tokenized differently ({what}); write to another output_dir "
                    f"or delete {path.parent} to start over")


def write_unit(unit: WorkUnit, shard_dir: Path, entries: list[dict], rows: list[np.ndarray], row_width: int, errors: dict,
               identity: dict, got: InputRead | None = None) -> dict:
    """One unit's shard (atomically), then its .done.json (which marks the unit done). rows: [h*w*L] each;
    got: what was read of the input (its content joins the identity)."""
    ids = np.stack(rows) if rows else np.zeros((0, row_width), np.int32)
    shard = shard_dir / f"{unit.name}.npz"
    with atomic_path(shard) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, ids=ids, meta_json=np.frombuffer(json.dumps(entries).encode("utf-8"), dtype=np.uint8))
    got = got or InputRead()
    content = {**got.content(), **({"url": unit.file} if unit.is_stream else {})}
    done = {"unit": unit.name, "source": unit.source.name, "file": shard.name, "sha256": sha256_file(shard), "samples": len(entries),
            "images": len(rows), "errors": errors, "input": unit.file, "input_stat": got.stat, "records": [unit.start, unit.stop],
            "identity": {**identity, "input": content}}
    write_json(shard_dir / f"{unit.name}.done.json", done)
    return done


@torch.no_grad()
def process_units(model: VisualTokenizer, units: list[WorkUnit], shard_dir: Path, batch_size: int, num_workers: int,
                  identities: list[dict], limits: ImageLimits = ImageLimits()):
    """Encode every unit's images in batches and write each unit as soon as it is complete; yields .done dicts,
    or {"unit", "failed"} for a unit whose input could not be read to the end (nothing of it is written)."""
    loader = torch.utils.data.DataLoader(_UnitStream(units, model.image_size, limits), batch_size=batch_size,
                                         num_workers=num_workers, collate_fn=list)
    open_units: dict[int, dict] = {}  # unit -> {"entries", "rows" (ids [h*w*L] each), "skipped" (Counter)}
    row_width = np.prod(positions_and_codes(model)).item()
    for batch in loader:  # a batch holds items of one worker, in its order
        images = []
        for u, entry, item in batch:
            state = open_units.setdefault(u, {"entries": [], "rows": [], "skipped": Counter()})
            if entry is None:
                continue
            if isinstance(item, tuple):
                state["skipped"][item[0]] += 1
                log.warning("%s: skipped, %s (%s)", entry["origin"], item[0], item[1])
                continue
            entry["ids_row"] = -1
            state["entries"].append(entry)
            images += [(state, entry, x) for x in item]
        if images:
            ids = encode_distinct(model, [x for _, _, x in images])  # [B, h*w*L]
            for (state, entry, _), row in zip(images, ids.cpu().numpy().astype(np.int32)):
                if entry["ids_row"] < 0:
                    entry["ids_row"] = len(state["rows"])
                else:  # a further image of a multi-image sample (its rows are consecutive)
                    entry.setdefault("ids_rows", [entry["ids_row"]]).append(len(state["rows"]))
                state["rows"].append(row)
        for u, entry, end in batch:
            if entry is None:  # the unit's last item: everything before it is encoded
                state = open_units.pop(u)
                errors, got = end
                if got.failure:
                    log.warning("unit %s: not done, its input was not read to the end (%s); a rerun retries it", units[u].name, got.failure)
                    yield {"unit": units[u].name, "failed": got.failure}
                    continue
                errors = dict(Counter(errors) + state["skipped"])
                yield write_unit(units[u], shard_dir, state["entries"], state["rows"], row_width, errors, identities[u], got)


def encode_distinct(model: VisualTokenizer, images: list[torch.Tensor]) -> torch.Tensor:
    """[3, S, S] tensors -> their ids [B, h*w*L], each distinct picture encoded once: a LLaVA image with several
    conversations comes in consecutive rows of one batch (the shapes world has ~5 rows per image). Pictures are
    matched by their preprocessed pixels, so two paths to one file and one file read twice both count."""
    keys = [hashlib.blake2b(x.numpy().tobytes(), digest_size=16).digest() for x in images]
    slot, distinct = {}, []  # key -> its row in distinct
    for x, k in zip(images, keys):
        if k not in slot:
            slot[k] = len(distinct)
            distinct.append(x)
    return model.encode(torch.stack(distinct).to(model.device)).flatten(1)[[slot[k] for k in keys]]


def _read_done(path: Path) -> dict:
    try:
        return loads_json(path.read_bytes(), str(path))
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: unreadable ({type(err).__name__}); delete it to redo that unit") from None


def visual_manifest(ids: IdStructure) -> dict:
    """The manifest's description of the ids (what the loader checks against the model)."""
    return {**ids.to_dict(), "grid": [ids.grid, ids.grid], "visual_vocab_size": ids.visual_vocab_size}


def _write_manifest_if_complete(units: list[WorkUnit], out: Path, model: VisualTokenizer, tokenizer_dir: Path,
                                tokenizer_id: str, records_per_shard: int) -> bool:
    shard_dir = out / "shards"
    done_files = [shard_dir / f"{u.name}.done.json" for u in units]
    if not all(p.is_file() for p in done_files):
        return False
    entries = [_read_done(p) for p in done_files]
    for unit, entry, path in zip(units, entries, done_files):  # other jobs' units too
        check_done(unit, entry, unit_identity(unit, tokenizer_id), path)
    errors: Counter = Counter()
    for e in entries:
        errors.update(e["errors"])
    write_json(out / "manifest.json", {
        "tokenizer": str(tokenizer_dir), "tokenizer_id": tokenizer_id, "records_per_shard": records_per_shard,
        **visual_manifest(IdStructure.of(model)), "samples": sum(e["samples"] for e in entries),
        "images": sum(e["images"] for e in entries), "errors": dict(errors), "shards": entries,
    })
    return True


def _plan(cfg: PretokenizeConfig, shard_dir: Path, tokenizer_id: str | None,
          num_shards: int = 1, shard_index: int = 0) -> tuple[list[WorkUnit], list[WorkUnit], list[WorkUnit]]:
    """(every unit, this job's units, this job's units not done yet); a finished unit made differently is refused."""
    units = plan_units(cfg.sources, cfg.records_per_shard, cfg.max_text_tokens)
    mine = [u for i, u in enumerate(units) if i % num_shards == shard_index]
    todo = []
    for unit in mine:
        done = shard_dir / f"{unit.name}.done.json"
        if done.is_file():
            check_done(unit, _read_done(done), unit_identity(unit, tokenizer_id), done)
        else:
            todo.append(unit)
    return units, mine, todo


def check_resume(cfg: PretokenizeConfig, tokenizer_dir: Path, out: Path) -> None:
    """Refuse (DataError, one line) an output_dir whose finished units another configuration or input made, before
    a command records or writes anything; every job's units are checked. A tokenizer not trained yet is not
    compared."""
    check_output_dir(out, "pretokenize.output_dir")
    shard_dir = Path(out) / "shards"
    if not any(shard_dir.glob("*.done.json")):
        return
    tokenizer_id = tokenizer_identity(tokenizer_dir) if (Path(tokenizer_dir) / "model.safetensors").is_file() else None
    _plan(cfg, shard_dir, tokenizer_id)


def run_pretokenize(cfg: PretokenizeConfig, tokenizer_dir: Path, out: Path,
                    num_shards: int | None = None, shard_index: int | None = None, device: str | None = None) -> dict:
    """Pre-tokenize this job's units that are not done. A unit whose input could not be read to the end is left
    not done and, once every other unit is written, the job stops with a DataError naming it (a rerun retries it)."""
    num_shards, shard_index = job_split(num_shards, shard_index)
    shard_dir = out / "shards"
    tokenizer_id = tokenizer_identity(tokenizer_dir)
    units, mine, todo = _plan(cfg, shard_dir, tokenizer_id, num_shards, shard_index)
    shard_dir.mkdir(parents=True, exist_ok=True)
    for unit in todo:  # temporaries of this job's units left by a killed run (never another job's)
        for stale in shard_dir.glob(f".{unit.name}.*.tmp"):
            stale.unlink()
    log.info("pretokenize job %d/%d: %d units, %d already done", shard_index, num_shards, len(mine), len(mine) - len(todo))
    model = load_tokenizer(tokenizer_dir, device)
    totals: Counter = Counter()
    failed: list[dict] = []
    start = time.perf_counter()
    records = [u.stop - u.start for u in todo]  # samples per unit (0: a tar, counted once read)
    bar = tqdm(total=sum(records) if all(records) else None, desc="pretokenize", unit="sample", dynamic_ncols=True)
    limits = ImageLimits(cfg.max_image_pixels, cfg.max_aspect_ratio)
    identities = [unit_identity(u, tokenizer_id) for u in todo]
    for done in process_units(model, todo, shard_dir, cfg.batch_size, cfg.num_workers, identities, limits):
        if "failed" in done:
            failed.append(done)
            continue
        totals.update({"samples": done["samples"], "images": done["images"]})
        totals.update({f"error:{k}": v for k, v in done["errors"].items()})
        bar.update(done["records"][1] - done["records"][0] or done["samples"])
        bar.set_postfix(img_per_s=f"{totals['images'] / (time.perf_counter() - start):.1f}")
    bar.close()
    elapsed = time.perf_counter() - start
    summary = {"job": f"{shard_index}/{num_shards}", "units_done_now": len(todo) - len(failed), "units_already_done": len(mine) - len(todo),
               "units_failed": len(failed), **dict(totals), "seconds": round(elapsed, 2),
               "images_per_s": round(totals["images"] / elapsed, 2) if elapsed > 0 else 0.0,
               "manifest_written": _write_manifest_if_complete(units, out, model, tokenizer_dir, tokenizer_id, cfg.records_per_shard)}
    log.info("pretokenize summary: %s", json.dumps(summary))
    if failed:
        first = failed[0]
        raise DataError(f"pretokenize: {len(failed)} unit(s) not done, their input was not read to the end (unit {first['unit']}: "
                        f"{first['failed']}); run again to retry them")
    return summary
