"""Text-to-image evaluation: GenEval images (+ its detector-based scorer when installed) and gFID.

GenEval layout (what its evaluation/evaluate_images.py reads), one folder per metadata line:
    <out>/00000/metadata.jsonl     that prompt's metadata line
    <out>/00000/samples/0000.png   samples_per_prompt images
    <out>/00000/grid.png
Folders are written atomically and skipped when complete, so an interrupted run resumes.

gFID: images generated from captions against the real images, through the rFID code (eval/fid.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from semhitok.common.io import atomic_dir, loads_json
from semhitok.eval.fid import FIDUnavailable, GaussianStats, InceptionFeatures, frechet_distance
from semhitok.tokenizer import image_grid, iter_image_batches, list_images, to_pil

log = logging.getLogger("semhitok")
GRID_SAMPLES = 64  # the first samples of a prompt shown in its grid.png
GENEVAL_SETUP = ("GenEval's scorer is not set up: `git clone https://github.com/djghosh13/geneval`, install its "
                 "requirements (mmdet 2.x, mmcv-full, open_clip, clip-benchmark) in this Python, run "
                 "`bash evaluation/download_models.sh MODELS`, then set GENEVAL_DIR=<clone> and GENEVAL_MODELS=MODELS")


class GenEvalUnavailable(RuntimeError):
    pass


def read_rows(path: str | Path, text_field: str) -> list[dict]:
    """jsonl rows, each an object with a string `text_field` (read with the JSON depth limit); a bad row is one
    line naming path:line."""
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            row = loads_json(line, f"{path}:{n}")
            if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                raise ValueError(f"{path}:{n}: expected an object with a '{text_field}' string")
            rows.append(row)
    return rows


def read_metadata(path: str | Path) -> list[dict]:
    """GenEval's evaluation_metadata.jsonl (eval.geneval_metadata) -> its rows"""
    return read_rows(path, "prompt")


def read_captions(path: str | Path) -> list[str]:
    """jsonl rows {"image", "caption"} (eval.gfid_captions) -> the captions"""
    return [row["caption"] for row in read_rows(path, "caption")]


def generate_geneval(decoder, visual, metadata: list[dict], out: str | Path, sampling, samples_per_prompt: int = 4,
                     batch_size: int = 16) -> int:
    """Generate every prompt's samples into GenEval's layout, batch_size images at a time (sample j keyed by j, as
    in one batch); returns how many folders were written now."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = 0
    for i, meta in enumerate(tqdm(metadata, desc="geneval", unit="prompt", dynamic_ncols=True)):
        folder = out / f"{i:05d}"
        if len(list(folder.glob("samples/*.png"))) == samples_per_prompt and (folder / "metadata.jsonl").is_file():
            continue
        seeded, shown = dataclasses.replace(sampling, seed=sampling.seed + i), []
        with atomic_dir(folder) as tmp:
            (tmp / "samples").mkdir()
            for start in range(0, samples_per_prompt, batch_size):  # (held batch by batch, never all at once)
                samples = list(range(start, min(start + batch_size, samples_per_prompt)))
                images = visual.decode(decoder.image_ids([meta["prompt"]] * len(samples), seeded, samples=samples)
                                       .to(visual.device)).cpu()
                for j, image in zip(samples, images, strict=True):
                    to_pil(image).save(tmp / "samples" / f"{j:04d}.png")
                shown += list(images[: GRID_SAMPLES - len(shown)])
            image_grid([torch.stack(shown)]).save(tmp / "grid.png")
            (tmp / "metadata.jsonl").write_text(json.dumps(meta) + "\n")
        written += 1
    return written


def summarize_geneval(results_jsonl: str | Path) -> dict:
    """GenEval's results.jsonl (one row per image: tag, correct) -> accuracy per tag and overall (mean of tags)."""
    by_tag: dict[str, list[bool]] = defaultdict(list)
    for line in Path(results_jsonl).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            by_tag[row["tag"]].append(bool(row["correct"]))
    if not by_tag:
        raise ValueError(f"{results_jsonl}: no results")
    scores = {tag: float(np.mean(v)) for tag, v in sorted(by_tag.items())}
    return {"overall": float(np.mean(list(scores.values()))), **scores}


def score_geneval(image_dir: str | Path, out: str | Path) -> dict:
    """Run GenEval's detector-based scorer (GENEVAL_DIR, GENEVAL_MODELS) -> summarize_geneval of its results."""
    root, models = os.environ.get("GENEVAL_DIR"), os.environ.get("GENEVAL_MODELS")
    script = Path(root or "") / "evaluation" / "evaluate_images.py"
    if not root or not models or not script.is_file():
        raise GenEvalUnavailable(GENEVAL_SETUP)
    probe = subprocess.run([sys.executable, "-c", "import mmdet, open_clip, clip_benchmark"], capture_output=True, text=True)
    if probe.returncode != 0:
        raise GenEvalUnavailable(f"{GENEVAL_SETUP} ({probe.stderr.strip().splitlines()[-1]})")
    results = Path(out) / "geneval_results.jsonl"
    subprocess.run([sys.executable, str(script), str(image_dir), "--outfile", str(results), "--model-path", models],
                   check=True, cwd=root)
    return summarize_geneval(results)


@torch.no_grad()
def generation_fid(decoder, visual, captions: list[str], real_sources: list[str | Path], out: str | Path, sampling,
                   batch_size: int = 16, features=None) -> dict:
    """Generate one image per caption (saved under out/), then FID against the real images.

    features: images [B, 3, H, W] in [-1, 1] -> [B, D] numpy; default the rFID Inception network."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"gfid": None, "images": len(captions)}
    generated = []
    for start in tqdm(range(0, len(captions), batch_size), desc="gfid", unit="batch", dynamic_ncols=True):
        batch = captions[start : start + batch_size]  # image i keyed by (seed, i, caption): independent of batch_size
        ids = decoder.image_ids(batch, sampling, samples=list(range(start, start + len(batch))))
        for k, image in enumerate(visual.decode(ids.to(visual.device)).cpu()):
            to_pil(image).save(out / f"{start + k:05d}.png")
            generated.append(image)
    if features is None:
        try:
            features = InceptionFeatures(visual.device)
        except FIDUnavailable as err:
            result["gfid_error"] = str(err)
            return result
    real_batches = (images for _, images in iter_image_batches(list_images(real_sources), visual.image_size, batch_size))
    real_stats = _feature_stats(real_batches, features, visual.device)
    if real_stats is None:
        raise ValueError(f"no readable real images in {list(map(str, real_sources))}")
    fake = torch.stack(generated)
    fake_stats = _feature_stats((fake[i : i + batch_size] for i in range(0, len(fake), batch_size)), features, visual.device)
    result["gfid"] = frechet_distance(*real_stats.mean_cov(), *fake_stats.mean_cov())
    return result


def _feature_stats(batches, features, device) -> GaussianStats | None:
    """image batches [B, 3, H, W] -> running statistics of their features (None when there are none)."""
    stats = None
    for images in batches:
        feats = features(images.to(device))
        stats = stats or GaussianStats(feats.shape[1])
        stats.update(feats)
    return stats
