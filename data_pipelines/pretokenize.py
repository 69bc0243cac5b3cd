"""Offline pre-tokenization: corpora -> sharded visual ids + text, once, resumable.

Output (`<output_dir>/`):
    shards/<source>-<unit>.npz       ids: int32 [n_images, h*w] (row-major ids of each image)
                                     meta_json: uint8 bytes of a JSON list, one entry per sample:
                                       {key, origin, kind, text | conversations, ids_row (-1: no image)}
    shards/<source>-<unit>.done.json that unit's counts, errors and the shard's sha256 (written last)
    manifest.json                    every unit, totals, tokenizer grid and vocabulary (when all are done)

A unit is done iff its .done.json exists; both files are written atomically, so a job killed anywhere and
started again redoes at most the units it was in the middle of, and writes every sample exactly once.
Units are split across jobs by index modulo --num-shards (or SLURM array / task variables).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from semhitok.common.io import atomic_path, write_json
from semhitok.data_pipelines.config import PretokenizeConfig
from semhitok.data_pipelines.readers import Record, WorkUnit, plan_units, read_unit
from semhitok.tokenizer import SemHiTok, load_tokenizer, preprocess
from semhitok.tokenizer.data import DECODE_ERRORS

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


class _DecodeImages(torch.utils.data.Dataset):
    """record -> (position, [3, S, S] in [-1, 1]) or (position, error text); runs in DataLoader workers."""

    def __init__(self, records: list[Record], size: int):
        self.records, self.size = records, size

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        r = self.records[i]
        try:
            with Image.open(io.BytesIO(r.image_bytes) if r.image_bytes is not None else r.image_path) as img:
                return i, preprocess([img.convert("RGB")], self.size)[0]
        except DECODE_ERRORS as err:
            return i, f"{type(err).__name__}: {err}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_shard(path: str | Path) -> tuple[np.ndarray, list[dict]]:
    """A pre-tokenized shard -> (ids int32 [n_images, h*w], per-sample metadata)."""
    with np.load(path, allow_pickle=False) as data:
        return data["ids"], json.loads(bytes(data["meta_json"]).decode("utf-8"))


@torch.no_grad()
def process_unit(model: SemHiTok, unit: WorkUnit, shard_dir: Path, batch_size: int, num_workers: int) -> dict:
    errors: Counter = Counter()
    records = read_unit(unit, errors)
    image_pos = [pos for pos, r in enumerate(records) if r.has_image]  # positions in `records`
    with_image = [records[pos] for pos in image_pos]
    loader = torch.utils.data.DataLoader(
        _DecodeImages(with_image, model.image_size), batch_size=batch_size, num_workers=num_workers, collate_fn=list
    )
    ids_of: dict[int, np.ndarray] = {}  # position in `records` -> ids [h*w]
    for batch in loader:
        good = []
        for i, item in batch:
            if isinstance(item, str):
                errors["corrupt_image"] += 1
                log.warning("%s: skipped, image does not decode (%s)", with_image[i].origin, item)
            else:
                good.append((i, item))
        if good:
            ids = model.encode(torch.stack([x for _, x in good]).to(model.device)).flatten(1)
            for (i, _), row in zip(good, ids.cpu().numpy().astype(np.int32)):
                ids_of[image_pos[i]] = row
    meta, rows = [], []
    for pos, r in enumerate(records):
        if r.has_image and pos not in ids_of:
            continue  # its image failed to decode: counted above
        entry = {"key": r.key, "origin": r.origin, "kind": r.kind, "ids_row": -1}
        entry.update({"text": r.text} if r.conversations is None else {"conversations": r.conversations})
        if r.has_image:
            entry["ids_row"] = len(rows)
            rows.append(ids_of[pos])
        meta.append(entry)
    ids = np.stack(rows) if rows else np.zeros((0, model.grid * model.grid), np.int32)
    shard = shard_dir / f"{unit.name}.npz"
    with atomic_path(shard) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, ids=ids, meta_json=np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8))
    done = {"unit": unit.name, "source": unit.source.name, "file": shard.name, "sha256": _sha256(shard), "samples": len(meta),
            "images": len(rows), "errors": dict(errors), "input": unit.file, "records": [unit.start, unit.stop]}
    write_json(shard_dir / f"{unit.name}.done.json", done)
    return done


def _write_manifest_if_complete(units: list[WorkUnit], out: Path, model: SemHiTok, tokenizer_dir: Path) -> bool:
    shard_dir = out / "shards"
    done_files = [shard_dir / f"{u.name}.done.json" for u in units]
    if not all(p.is_file() for p in done_files):
        return False
    entries = [json.loads(p.read_text()) for p in done_files]
    errors: Counter = Counter()
    for e in entries:
        errors.update(e["errors"])
    write_json(out / "manifest.json", {
        "tokenizer": str(tokenizer_dir), "grid": [model.grid, model.grid], "visual_vocab_size": model.vocab_size,
        "codes_per_group": model.codes_per_group, "samples": sum(e["samples"] for e in entries),
        "images": sum(e["images"] for e in entries), "errors": dict(errors), "shards": entries,
    })
    return True


def run_pretokenize(cfg: PretokenizeConfig, tokenizer_dir: Path, out: Path,
                    num_shards: int | None = None, shard_index: int | None = None, device: str | None = None) -> dict:
    num_shards, shard_index = job_split(num_shards, shard_index)
    units = plan_units(cfg.sources, cfg.records_per_shard)
    mine = [u for i, u in enumerate(units) if i % num_shards == shard_index]
    shard_dir = out / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    todo = [u for u in mine if not (shard_dir / f"{u.name}.done.json").is_file()]
    for unit in todo:  # temporaries of this job's units left by a killed run (never another job's)
        for stale in shard_dir.glob(f".{unit.name}.*.tmp"):
            stale.unlink()
    log.info("pretokenize job %d/%d: %d units, %d already done", shard_index, num_shards, len(mine), len(mine) - len(todo))
    model = load_tokenizer(tokenizer_dir, device)
    totals: Counter = Counter()
    start = time.perf_counter()
    bar = tqdm(todo, desc="pretokenize", unit="shard", dynamic_ncols=True)
    for unit in bar:
        done = process_unit(model, unit, shard_dir, cfg.batch_size, cfg.num_workers)
        totals.update({"samples": done["samples"], "images": done["images"]})
        totals.update({f"error:{k}": v for k, v in done["errors"].items()})
        bar.set_postfix(img_per_s=f"{totals['images'] / (time.perf_counter() - start):.1f}")
    bar.close()
    elapsed = time.perf_counter() - start
    summary = {"job": f"{shard_index}/{num_shards}", "units_done_now": len(todo), "units_already_done": len(mine) - len(todo),
               **dict(totals), "seconds": round(elapsed, 2),
               "images_per_s": round(totals["images"] / elapsed, 2) if elapsed > 0 else 0.0,
               "manifest_written": _write_manifest_if_complete(units, out, model, tokenizer_dir)}
    log.info("pretokenize summary: %s", json.dumps(summary))
    return summary
