"""Scores on the procedural shapes world (data_pipelines/world.py): what a model trained on it understands
and draws, judged against the world's ground truth.

    detect / check        the generation checker: colour segmentation against the palette (the world is flat
                          colours on a plain background, so no detector network is needed), GenEval's rules
    validate_checker      the checker's own accuracy on rendered scenes, clean and degraded, and on wrong specs
    answer_questions      understanding: the held-out questions answered greedily, exact match after
                          normalisation, per type, yes/no precision/recall/F1, held-out combinations apart
    generate_and_check    generation: an image per held-out prompt at each CFG scale, checked, with a
                          labelled grid (green: passed, red: failed)
    score_world           both, written under one folder (what `semhitok eval` runs when eval.world is set)

Held-out combinations (WorldConfig.heldout_combos) never occur in training; their scores, reported apart,
measure compositional generalisation.
"""

from __future__ import annotations

import dataclasses
import io
import json
import random
import re
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from scipy import ndimage
from tqdm import tqdm

from semhitok.common.io import atomic_path, read_json
from semhitok.common.io import read_jsonl as read_object_lines
from semhitok.common.plot import Cell, Figure, labelled_grid
from semhitok.data_pipelines.world import BACKGROUND, COLOURS, NUMBERS, WorldConfig, make_scenes, prompts, render
from semhitok.mllm.config import SamplingConfig
from semhitok.tokenizer import encode_images, load_rgb, to_pil

_NAMES = list(COLOURS)
_PALETTE = np.array([BACKGROUND, *COLOURS.values()], np.float32)  # [5, 3]: label 0 background, k: _NAMES[k - 1]
_EIGHT = np.ones((3, 3), bool)  # 8-connectivity
QUESTION_TYPES = ("colour", "shape", "count", "yes_no", "left_right")
CATEGORIES = ("single_object", "two_objects", "counting", "position")


# -- the generation checker ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Detection:
    colour: str
    shape: str
    x: float  # centroid, pixel indices of the checked image (the world's Obj.x, y)
    y: float
    area: int  # pixels

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


def classify_pixels(rgb: np.ndarray, max_dist: float = 100.0) -> tuple[np.ndarray, np.ndarray]:
    """[H, W, 3] uint8 -> (labels [H, W]: 0 background, k colour _NAMES[k - 1], -1 nothing within max_dist;
    the RGB distance to that nearest palette colour [H, W]). The nearest two palette colours, red and yellow,
    are 161 apart; a half-and-half blend of a colour and the background is about 130 from both."""
    dist = np.linalg.norm(rgb[:, :, None, :].astype(np.float32) - _PALETTE, axis=-1)  # [H, W, 5]
    labels, nearest = dist.argmin(-1), dist.min(-1)
    labels[nearest > max_dist] = -1
    return labels, nearest


def shape_features(mask: np.ndarray, legs: float = 0.25) -> dict:
    """One object's mask (cropped to its bounding box) -> fill: share of the box it covers (square 1, circle
    0.79, triangle 0.5); taper: mean width of rows at 15-40% of the height over that at 60-85% (an upward
    triangle ~0.4, circle and square 1); corners: share of the box's four corner triangles (legs a quarter of
    the side) it covers (square ~1, circle 0, triangle half: its base corners)."""
    h, w = mask.shape
    widths = mask.sum(1)
    band = lambda a, b: widths[int(a * h) : max(int(b * h), int(a * h) + 1)].mean()
    v, u = np.mgrid[0:h, 0:w]
    u, v = (u + 0.5) / w, (v + 0.5) / h
    corners = (np.minimum(u, 1 - u) + np.minimum(v, 1 - v)) < legs
    return {"fill": float(mask.mean()), "taper": float(band(0.15, 0.4) / max(band(0.6, 0.85), 1e-6)),
            "corners": float(mask[corners].mean()) if corners.any() else 0.0}


def shape_of(mask: np.ndarray) -> str:
    """circle, square or triangle from shape_features: narrower at the top than at the bottom is a triangle
    (triangles point up); else a square fills its box and its corners (fill + corners: square 2, circle 0.79;
    measured on degraded renders (`degrade`), squares >= 1.17, circles <= 1.06)."""
    f = shape_features(mask)
    if f["taper"] < 0.72:  # measured on degraded renders: triangles <= 0.65, circles and squares >= 0.78
        return "triangle"
    return "square" if f["fill"] + f["corners"] > 1.12 else "circle"


def _pieces(mask: np.ndarray, core: np.ndarray, max_depth: int, min_area: float) -> list[tuple[tuple[slice, slice], np.ndarray]]:
    """One colour's mask -> the objects in it, each (bounding-box slices, its mask within them).

    Objects of one colour that touch (blur closes the gap between neighbours) are split at their neck: the
    component's core (`core`: pixels close to the colour; a blurred gap is paler than the objects beside it)
    is eroded step by step (up to max_depth) until it falls into parts, and every pixel joins its nearest
    part. A world shape is convex, and eroding a convex shape never splits it; a split is kept only when two
    parts or more reach min_area."""
    out = []
    components, _ = ndimage.label(mask, _EIGHT)
    for k, box in enumerate(ndimage.find_objects(components), 1):
        comp = components[box] == k
        eroded, parts = comp & core[box], []
        for _ in range(max_depth + 1):
            cores, n = ndimage.label(eroded, _EIGHT)
            if n != 1:
                break
            eroded = ndimage.binary_erosion(eroded, _EIGHT)
        if n >= 2:
            _, (iy, ix) = ndimage.distance_transform_edt(cores == 0, return_indices=True)
            owner = cores[iy, ix]
            parts = [comp & (owner == c) for c in range(1, n + 1)]
        if sum(p.sum() >= min_area for p in parts) < 2:
            out.append((box, comp))
            continue
        for part in parts:
            ys, xs = np.nonzero(part)
            sub = (slice(box[0].start + ys.min(), box[0].start + ys.max() + 1),
                   slice(box[1].start + xs.min(), box[1].start + xs.max() + 1))
            out.append((sub, part[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]))
    return out


def detect(image, min_size: float = 0.25, max_dist: float = 100.0, core_dist: float = 50.0,
           min_area_share: float = 0.3) -> list[Detection]:
    """A world image (PIL or [H, W, 3] uint8, any size) -> its objects, left to right.

    Pixels take the nearest palette colour or the background (none beyond max_dist: blends and noise);
    each colour's mask is opened (speckle and one-pixel bridges go), holes are filled, touching objects
    split (_pieces); parts smaller than min_area_share of the smallest object the world draws (a triangle
    of side min_size, a share of the image side) are dropped."""
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {rgb.shape}")
    side = min(rgb.shape[:2])
    min_area = min_area_share * 0.5 * (min_size * side) ** 2
    depth = max(1, round(0.1 * side))  # (about a world object's inner radius)
    labels, dist = classify_pixels(rgb, max_dist)
    found = []
    for k, colour in enumerate(_NAMES, 1):
        mask = ndimage.binary_fill_holes(ndimage.binary_opening(labels == k, _EIGHT))
        for box, part in _pieces(mask, dist < core_dist, depth, min_area):
            area = int(part.sum())
            if area < min_area:
                continue
            cy, cx = ndimage.center_of_mass(part)
            found.append(Detection(colour, shape_of(part), round(float(box[1].start + cx), 2),
                                   round(float(box[0].start + cy), 2), area))
    return sorted(found, key=lambda d: d.x)


def check(spec: dict, objects: list[Detection]) -> tuple[bool, str]:
    """A prompt's spec ({"objects": [[colour, shape], ...], "count": n, "left_of": [i, j] optional}) against
    the detected objects, GenEval's rules: without left_of, exactly `count` objects, every named one among them
    (single_object: exactly that one; two_objects: exactly those two; counting: the number); with left_of
    (position), both named objects present (the largest of each name) and the first's centroid left of the
    second's."""
    names = [f"{c} {s}" for c, s in spec["objects"]]
    found = [d.name for d in objects]
    shown = ", ".join(found) or "nothing"
    missing = [n for n in names if n not in found]
    if missing:
        return False, f"no {missing[0]} (found {shown})"
    left_of = spec.get("left_of")
    if left_of:
        largest = {n: max((d for d in objects if d.name == n), key=lambda d: d.area) for n in names}
        a, b = largest[names[left_of[0]]], largest[names[left_of[1]]]
        if a.x >= b.x:
            return False, f"{a.name} (x={a.x:.1f}) is not left of {b.name} (x={b.x:.1f})"
        return True, "ok"
    if len(objects) != spec["count"]:
        return False, f"found {len(objects)} object(s) ({shown}), wanted {spec['count']}"
    return True, "ok"


def degrade(image: Image.Image, scale: float = 0.5, blur: float = 1.0, quality: int = 75) -> Image.Image:
    """What a generated image suffers, roughly: resized down and back up (bilinear), blurred, JPEG-compressed."""
    w, h = image.size
    small = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
    out = small.resize((w, h), Image.BILINEAR).filter(ImageFilter.GaussianBlur(blur))
    buf = io.BytesIO()
    out.save(buf, "JPEG", quality=quality)
    return Image.open(buf).convert("RGB")


def wrong_spec(spec: dict, present: set[tuple[str, str]], rng: random.Random) -> dict:
    """A spec the scene does not satisfy: a named object's colour, or its shape, changed to one absent from the
    scene (or, position, the relation reversed; counting, another count)."""
    spec = json.loads(json.dumps(spec))
    if spec.get("left_of") and rng.random() < 1 / 3:
        spec["left_of"] = spec["left_of"][::-1]
    elif not spec["objects"]:
        spec["count"] = rng.choice([n for n in (1, 2, 3, 4) if n != spec["count"]])
    else:
        i = rng.randrange(len(spec["objects"]))
        colour, shape = spec["objects"][i]
        if rng.random() < 0.5:
            options = [[c, shape] for c in COLOURS if (c, shape) not in present]
        else:
            options = [[colour, s] for s in ("circle", "square", "triangle") if (colour, s) not in present]
        spec["objects"][i] = rng.choice(options or [[c, s] for c in COLOURS for s in ("circle", "square", "triangle")
                                                    if (c, s) not in present])
    return spec


def validate_checker(n: int = 300, seed: int = 1) -> dict:
    """The checker on n held-out-like scenes (a world with this seed) and every prompt each answers: the share
    of prompts passed on clean renders and on degraded ones (`degrade`), the share of wrong specs failed (one
    per prompt), and the share of scenes whose objects are all found exactly (names and count)."""
    cfg = WorldConfig(seed=seed, holdout_scenes=n)
    rng = random.Random(f"{seed}:validate")
    tally: dict[str, list[bool]] = defaultdict(list)
    for scene in make_scenes(cfg, "holdout"):
        truth = sorted(o.name for o in scene.objects)
        present = {(o.colour, o.shape) for o in scene.objects}
        clean = render(scene)
        for kind, image in (("clean", clean), ("degraded", degrade(clean))):
            objects = detect(image, cfg.min_size)
            tally[f"scenes_{kind}"].append(sorted(d.name for d in objects) == truth)
            for p in prompts(scene, rng):
                tally[kind].append(check(p["spec"], objects)[0])
                tally[f"wrong_failed_{kind}"].append(not check(wrong_spec(p["spec"], present, rng), objects)[0])
    return {"scenes": n, "prompts": len(tally["clean"]), **{k: float(np.mean(v)) for k, v in sorted(tally.items())}}


# -- understanding --------------------------------------------------------------------------------------
_DIGITS = {str(n): word for n, word in NUMBERS.items()}


def normalize_answer(text: str) -> str:
    """A reply -> the word compared with the truth: lower case, punctuation dropped, the first word, digits
    1-3 as words ("Red." -> "red", "2 shapes" -> "two", "" -> "")."""
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    return _DIGITS.get(words[0], words[0]) if words else ""


def _accuracy(correct: list[bool]) -> dict:
    return {"accuracy": float(np.mean(correct)) if correct else None, "n": len(correct)}


def _by_combo(correct: list[bool], heldout: list[bool]) -> dict:
    """Accuracy on seen and on held-out combinations apart (heldout: each item's flag)."""
    return {"seen": _accuracy([c for c, h in zip(correct, heldout) if not h]),
            "heldout": _accuracy([c for c, h in zip(correct, heldout) if h])}


def question_metrics(rows: list[dict], replies: list[str]) -> dict:
    """Questions ({"answer", "type", "heldout_combo"}) and the model's replies -> exact-match accuracy after
    normalize_answer: overall, by type, by combination (seen / held-out), and for yes/no questions precision,
    recall, F1 (yes the positive class; an unparseable reply is a wrong one), yes_ratio (share of yes among
    the replies that are yes or no) and the number of unparseable replies (neither yes nor no)."""
    if len(rows) != len(replies) or not rows:
        raise ValueError(f"need equally many questions and replies, got {len(rows)} and {len(replies)}")
    pred = [normalize_answer(r) for r in replies]
    correct = [p == row["answer"] for p, row in zip(pred, rows)]
    by = lambda keep: [c for c, row in zip(correct, rows) if keep(row)]
    out = {"accuracy": float(np.mean(correct)), "questions": len(rows),
           "by_type": {t: _accuracy(by(lambda r, t=t: r["type"] == t)) for t in QUESTION_TYPES if any(r["type"] == t for r in rows)},
           "by_combo": _by_combo(correct, [r["heldout_combo"] for r in rows])}
    # each type on seen and on held-out combinations apart: the held-out scenes are new images either way, the
    # held-out combinations also new compositions (whose visual ids a training scene never showed)
    out["by_type_combo"] = {t: _by_combo(by(lambda r, t=t: r["type"] == t), [r["heldout_combo"] for r in rows if r["type"] == t])
                            for t in out["by_type"]}
    yes_no = [(p, row["answer"] == "yes") for p, row in zip(pred, rows) if row["type"] == "yes_no"]
    if yes_no:
        tp = sum(p == "yes" and g for p, g in yes_no)
        said_yes, truly_yes = sum(p == "yes" for p, _ in yes_no), sum(g for _, g in yes_no)
        parsed = sum(p in ("yes", "no") for p, _ in yes_no)
        precision = tp / said_yes if said_yes else 0.0
        recall = tp / truly_yes if truly_yes else 0.0
        out["yes_no"] = {"precision": precision, "recall": recall,
                         "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
                         "yes_ratio": said_yes / parsed if parsed else None, "unparseable": len(yes_no) - parsed,
                         "questions": len(yes_no)}
    return out


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (a world directory is written by data_pipelines.world.write_world)")
    return read_object_lines(path)  # depth-limited; a row that is not an object is one line naming path:line


@torch.no_grad()
def answer_batch(decoder, turns: list[list[tuple[str, str]]], image_ids: list[torch.Tensor], max_new_tokens: int = 8) -> list[str]:
    """Decoder.answer for several conversations at once, greedily: one left-padded decode, stopped when every
    row has ended its turn (the replies answer() gives, up to floating-point ties)."""
    prompts, codes = [], []
    for turn, ids in zip(turns, image_ids):
        flat = ids.flatten().cpu().numpy()
        prompts.append(decoder.builder.chat_prompt(turn, flat))
        codes.append(decoder.builder.codes_of(prompts[-1], [flat]))  # the codes beside the tokens [T, L], or None
    stop = decoder.layout.im_end
    tokens = decoder.decode(prompts, max_new_tokens, (0, len(decoder.tokenizer)), SamplingConfig(temperature=0.0),
                            stop=stop, codes=codes)
    replies = []
    for row in tokens.tolist():
        row = row[: row.index(stop)] if stop in row else row
        replies.append(decoder.tokenizer.decode(row, skip_special_tokens=True).strip())
    return replies


def answer_questions(decoder, visual, world_dir: str | Path, limit: int = 0, batch_size: int = 64,
                     max_new_tokens: int = 8) -> dict:
    """Every held-out question of the world (the first `limit`; 0: all) answered greedily about its image
    (each image encoded once, as the model's understanding_image says) -> question_metrics, seconds,
    questions_per_s, and "answers": a row per question (image, question, type, heldout_combo, truth, the
    reply, its normalised word, correct)."""
    world_dir = Path(world_dir)
    rows = read_jsonl(world_dir / "questions.jsonl")[: limit or None]
    if not rows:
        raise ValueError(f"{world_dir / 'questions.jsonl'}: no questions")
    start = time.perf_counter()
    images = sorted({r["image"] for r in rows})
    ids_of: dict[str, torch.Tensor] = {}
    for k in range(0, len(images), batch_size):
        chunk = images[k : k + batch_size]
        loaded = [load_rgb(world_dir / name) for name in chunk]
        unreadable = [name for name, img in zip(chunk, loaded) if img is None]
        if unreadable:
            raise ValueError(f"{world_dir}: {unreadable[0]} is not a readable image")
        ids_of.update(zip(chunk, encode_images(visual, loaded, decoder.seq_cfg.understanding_image).cpu()))
    replies: list[str] = []
    for k in tqdm(range(0, len(rows), batch_size), desc="world questions", unit="batch", dynamic_ncols=True):
        batch = rows[k : k + batch_size]
        replies += answer_batch(decoder, [[("user", "<image>\n" + r["question"])] for r in batch],
                                [ids_of[r["image"]] for r in batch], max_new_tokens)
    seconds = time.perf_counter() - start
    result = question_metrics(rows, replies)
    result.update(seconds=round(seconds, 2), questions_per_s=round(len(rows) / seconds, 2))
    result["answers"] = [{"image": r["image"], "question": r["question"], "type": r["type"], "heldout_combo": r["heldout_combo"],
                          "truth": r["answer"], "reply": a, "normalized": normalize_answer(a),
                          "correct": normalize_answer(a) == r["answer"]} for r, a in zip(rows, replies)]
    return result


# -- generation -----------------------------------------------------------------------------------------
def world_config(world_dir: str | Path) -> WorldConfig:
    """The config that wrote this world (its WORLD.json)."""
    path = Path(world_dir) / "WORLD.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (a world directory is written by data_pipelines.world.write_world)")
    world = read_json(path)
    if not isinstance(world, dict) or not isinstance(world.get("world"), dict):
        raise ValueError(f"{path}: must hold an object with a \"world\" object, the config that wrote the world")
    return WorldConfig(**world["world"])


def pick_prompts(rows: list[dict], limit_per_category: int = 0) -> list[tuple[int, dict]]:
    """(index in prompts.jsonl, row) of the first limit_per_category prompts of each category (0: all), in
    file order. The index keys the prompt's image, so an image does not depend on the limit."""
    seen: dict[str, int] = defaultdict(int)
    picked = []
    for i, row in enumerate(rows):
        seen[row["category"]] += 1
        if not limit_per_category or seen[row["category"]] <= limit_per_category:
            picked.append((i, row))
    return picked


def generation_metrics(results: list[dict]) -> dict:
    """Checked images ({"category", "heldout_combo", "ok"}) -> accuracy per category, overall (the mean of the
    categories, as GenEval reports it), and over the images with a seen / held-out combination."""
    by_category = {c: _accuracy([r["ok"] for r in results if r["category"] == c])
                   for c in CATEGORIES if any(r["category"] == c for r in results)}
    def by_combo(rows: list[dict]) -> dict:
        return _by_combo([r["ok"] for r in rows], [r["heldout_combo"] for r in rows])

    return {"accuracy": float(np.mean([v["accuracy"] for v in by_category.values()])) if by_category else None,
            "images": len(results), "by_category": by_category, "by_combo": by_combo(results),
            "by_category_combo": {c: by_combo([r for r in results if r["category"] == c]) for c in by_category}}


@torch.no_grad()
def generate_and_check(decoder, visual, world_dir: str | Path, sampling, out_dir: str | Path, limit_per_category: int = 0,
                       cfg_scales: tuple[float, ...] | None = None, batch_size: int = 16, grid_per_category: int = 8) -> dict:
    """For each CFG scale (default: 1, no guidance, and sampling.cfg_scale), an image per held-out prompt
    (pick_prompts), checked against its spec -> {"cfg_<scale>": generation_metrics + images_per_s + files}.

    Under out_dir/cfg_<scale>/: images/<prompt index>.png, results.jsonl (a row per image: prompt, category,
    heldout_combo, file, detected objects, ok, reason) and grid.png (a row per category, green: passed).
    Image i is keyed by (sampling.seed, i, prompt): the same whatever the batch size or limit."""
    world_dir, out_dir = Path(world_dir), Path(out_dir)
    min_size = world_config(world_dir).min_size
    picked = pick_prompts(read_jsonl(world_dir / "prompts.jsonl"), limit_per_category)
    if not picked:
        raise ValueError(f"{world_dir / 'prompts.jsonl'}: no prompts")
    scales = cfg_scales if cfg_scales is not None else tuple(dict.fromkeys((1.0, float(sampling.cfg_scale))))
    report = {}
    for scale in scales:
        folder = out_dir / f"cfg_{scale:g}"
        (folder / "images").mkdir(parents=True, exist_ok=True)
        settings = dataclasses.replace(sampling, cfg_scale=float(scale))
        results, start = [], time.perf_counter()
        for k in tqdm(range(0, len(picked), batch_size), desc=f"world prompts, cfg {scale:g}", unit="batch", dynamic_ncols=True):
            batch = picked[k : k + batch_size]
            ids = decoder.image_ids([row["prompt"] for _, row in batch], settings, samples=[i for i, _ in batch])
            for (i, row), image in zip(batch, visual.decode(ids.to(visual.device)).cpu()):
                pil = to_pil(image)
                name = f"images/{i:05d}.png"
                pil.save(folder / name)
                objects = detect(pil, min_size)
                ok, reason = check(row["spec"], objects)
                results.append({"index": i, "prompt": row["prompt"], "category": row["category"], "heldout_combo": row["heldout_combo"],
                                "file": name, "objects": [dataclasses.asdict(o) for o in objects], "ok": ok, "reason": reason})
        seconds = time.perf_counter() - start
        with atomic_path(folder / "results.jsonl") as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in results))
        rows = [[Cell(Image.open(folder / r["file"]), r["prompt"], r["ok"]) for r in results if r["category"] == c][:grid_per_category]
                for c in CATEGORIES]
        labelled_grid([row for row in rows if row], [c.replace("_", " ") for c, row in zip(CATEGORIES, rows) if row],
                      f"images for held-out prompts, CFG {scale:g}").save(folder / "grid.png")
        report[f"cfg_{scale:g}"] = {"cfg_scale": float(scale), **generation_metrics(results), "seconds": round(seconds, 2),
                                    "images_per_s": round(len(results) / seconds, 2), "results": str(folder / "results.jsonl"),
                                    "grid": str(folder / "grid.png")}
    return report


def prompt_checker(world_dir: str | Path) -> Callable[[str, Image.Image], tuple[bool, str] | None]:
    """(prompt, image) -> the checker's (passed, reason) for a prompt of the world's prompts.jsonl, None for any
    other prompt; for mllm.sample.sample_images, so the samples grid shows each image's verdict."""
    specs = {row["prompt"]: row["spec"] for row in read_jsonl(Path(world_dir) / "prompts.jsonl")}
    min_size = world_config(world_dir).min_size

    def verdict(prompt: str, image: Image.Image) -> tuple[bool, str] | None:
        spec = specs.get(prompt)
        return None if spec is None else check(spec, detect(image, min_size))

    return verdict


# -- pictures -------------------------------------------------------------------------------------------
def question_grid(world_dir: str | Path, answers: list[dict], n: int = 15, cols: int = 5) -> Figure:
    """A picture of n answered held-out questions (answer_questions' "answers"), taken in turn from each type
    (spread over the file, so over many images):
    each image with its question, the model's reply and the truth, framed green (right) or red (wrong)."""
    by_type: dict[str, list[dict]] = defaultdict(list)
    for a in answers:
        by_type[a["type"]].append(a)
    per_type = -(-n // max(len(by_type), 1))
    spread = {t: [v[round(k * len(v) / per_type)] for k in range(min(per_type, len(v)))] for t, v in by_type.items()}  # other images
    order = sorted(spread, key=lambda t: QUESTION_TYPES.index(t) if t in QUESTION_TYPES else len(QUESTION_TYPES))
    shown = [spread[t][k] for k in range(per_type) for t in order if k < len(spread[t])][:n]
    cells = [Cell(Image.open(Path(world_dir) / a["image"]), [a["question"], f"model: {a['reply'] or '(nothing)'}", f"truth: {a['truth']}"
                  + (" (held-out combo)" if a["heldout_combo"] else "")], a["correct"]) for a in shown]
    return labelled_grid([cells[k : k + cols] for k in range(0, len(cells), cols)], title="held-out questions about world images",
                         verdict_note="frame: green = the model's answer is right, red = wrong")


# -- `semhitok eval` ------------------------------------------------------------------------------------
def score_world(decoder, visual, world_dir: str | Path, out: str | Path, sampling, questions_limit: int = 0,
                prompts_limit: int = 0, batch_size: int = 16, questions_batch_size: int = 64) -> dict:
    """Both scorers on a world, written under `out`: answers.jsonl and questions.png (understanding),
    generation/cfg_<scale>/ (generate_and_check, images in batches of batch_size) -> {"world", "understanding",
    "generation"} for summary.json. Questions go in larger batches: a short answer's decode is cheap per row."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    understanding = answer_questions(decoder, visual, world_dir, questions_limit, questions_batch_size)
    answers = understanding.pop("answers")
    with atomic_path(out / "answers.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(a) + "\n" for a in answers))
    question_grid(world_dir, answers).save(out / "questions.png")
    understanding.update(answers=str(out / "answers.jsonl"), picture=str(out / "questions.png"))
    generation = generate_and_check(decoder, visual, world_dir, sampling, out / "generation", prompts_limit, batch_size=batch_size)
    return {"world": str(world_dir), "understanding": understanding, "generation": generation}


def world_table(world: dict) -> list[str]:
    """score_world's result -> markdown lines: understanding accuracy by type and by combination, yes/no
    precision/recall/F1/yes-ratio, and generation accuracy per category at each CFG scale."""
    def pct(entry: dict | None) -> str:
        if not entry or entry.get("accuracy") is None:
            return "n/a"
        return f"{100 * entry['accuracy']:.1f}% ({entry['n']})"

    if "skipped" in world:
        return ["", "## World", "", f"skipped: {world['skipped']}"]
    u, gen = world["understanding"], world["generation"]
    split = u.get("by_type_combo", {})
    lines = ["", f"## World `{world['world']}`", "", "Understanding (exact match; in brackets: questions)", "",
             "| questions | all | seen combinations | held-out combinations |", "|---|---|---|---|",
             (f"| all | {pct({'accuracy': u['accuracy'], 'n': u['questions']})} | {pct(u['by_combo']['seen'])} | "
              f"{pct(u['by_combo']['heldout'])} |")]
    lines += [f"| {t} | {pct(v)} | {pct(split.get(t, {}).get('seen'))} | {pct(split.get(t, {}).get('heldout'))} |"
              for t, v in u["by_type"].items()]
    if "yes_no" in u:
        yn = u["yes_no"]
        ratio = "n/a" if yn["yes_ratio"] is None else f"{yn['yes_ratio']:.3f}"
        lines += ["", (f"yes/no: precision {yn['precision']:.3f}, recall {yn['recall']:.3f}, F1 {yn['f1']:.3f}, "
                       f"yes-ratio {ratio}, unparseable {yn['unparseable']} of {yn['questions']}")]
    lines.append(f"({u['questions_per_s']} questions/s; picture: {u.get('picture', 'n/a')})")
    scales = list(gen.values())
    lines += ["", ("Generation (checked against the prompt; in brackets: images; seen / held-out: prompts whose scene has "
                   "no held-out / a held-out combination)"), "",
              "| prompts | " + " | ".join(f"CFG {g['cfg_scale']:g} | seen | held-out" for g in scales) + " |",
              "|---|" + "---|" * 3 * len(scales)]
    categories = [c for c in CATEGORIES if any(c in g["by_category"] for g in scales)]
    def cells(whole: str, split: dict) -> str:  # "all | seen | held-out" of one CFG scale
        return " | ".join([whole, pct(split.get("seen")), pct(split.get("heldout"))])

    for c in categories:
        lines.append(f"| {c} | " + " | ".join(cells(pct(g["by_category"].get(c)), g.get("by_category_combo", {}).get(c, {}))
                                             for g in scales) + " |")
    lines.append("| all (categories' mean; seen, held-out: of images) | " + " | ".join(
        cells("n/a" if g["accuracy"] is None else f"{100 * g['accuracy']:.1f}%", g["by_combo"]) for g in scales) + " |")
    lines += [""] + [f"CFG {g['cfg_scale']:g}: {g['images_per_s']} images/s; grid: {g['grid']}" for g in scales]
    return lines
