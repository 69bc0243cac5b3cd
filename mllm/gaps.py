"""Conditioning gaps: does the model use the image to describe it, and the caption to draw it?

On held-out (image, caption) pairs, the mean per-sample loss of the same targets under different conditions:

    understanding   target: the caption (and <|im_end|>) after "<image> + caption prompt"
                    true image | images shuffled among the pairs (a derangement) | no image
    generation      target: the image's visual ids after the caption's generation prompt
                    true caption | captions shuffled among the pairs | the unconditional prompt (what CFG mixes)

gap = loss(condition) - loss(true), per sample; reported as the mean with a 95% interval (mean +- 1.96 SE
of the per-sample differences). A model that reads the image / caption has clearly positive gaps; one
whose adapter reads the wrong codes, or whose generation ignores the caption, sits at zero. Teacher-forced
token accuracy (argmax = target) is reported beside the losses, for true and shuffled conditions.

Works on a plain model and under DeepSpeed ZeRO-3 (every rank must call it: the forward gathers weights).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from semhitok.common.io import loads_json
from semhitok.data_pipelines.sequences import SequenceBuilder
from semhitok.tokenizer import encode_paths
from semhitok.tokenizer.interface import VisualTokenizer

CONDITIONS = {"understanding": ("true", "shuffled", "no_image"), "generation": ("true", "shuffled", "uncond")}


@dataclass
class HeldoutPairs:
    captions: list[str]
    ids: torch.Tensor  # [N, h, w] (or [N, h, w, L]) visual ids as the tokenizer encodes them, CPU


def load_pairs(path: str | Path, visual: VisualTokenizer, limit: int = 0) -> HeldoutPairs:
    """jsonl rows {"image" (relative to the file's folder), "caption"} -> captions and the images' visual ids."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"held-out pairs {path} not found")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            row = loads_json(line, f"{path}:{n}")  # (depth-limited: one line, not a RecursionError)
            if not isinstance(row, dict) or not isinstance(row.get("image"), str) or not isinstance(row.get("caption"), str):
                raise ValueError(f"{path}:{n}: expected a row with 'image' and 'caption' strings")
            rows.append(row)
    rows = rows[: limit or None]
    kept, ids = encode_paths(visual, [path.parent / r["image"] for r in rows])
    if len(kept) < 2:
        raise ValueError(f"{path}: {len(kept)} readable image(s); the gaps need at least 2 pairs to shuffle")
    caption_of = {path.parent / r["image"]: r["caption"] for r in rows}
    return HeldoutPairs([caption_of[p] for p in kept], ids.cpu())


def derangement(n: int) -> list[int]:
    """i -> i+1 (mod n): every sample gets another sample's image / caption."""
    return [(i + 1) % n for i in range(n)]


def documents(builder: SequenceBuilder, pairs: HeldoutPairs, task: str, condition: str) -> list[tuple[list[int], list[int], np.ndarray | None]]:
    """(prompt tokens, target tokens, the codes beside the row's tokens [T, L] or None) per pair for one task and condition."""
    n = len(pairs.captions)
    other = derangement(n)
    docs = []
    for i in range(n):
        if task == "understanding":
            ids = {"true": pairs.ids[i], "shuffled": pairs.ids[other[i]], "no_image": None}[condition]
            text = builder.cfg.caption_prompt if ids is None else f"<image>\n{builder.cfg.caption_prompt}"
            image = None if ids is None else ids.flatten().numpy()
            prompt = builder.chat_prompt([("user", text)], image)
            target = builder.encode_text(pairs.captions[i]) + [builder.layout.im_end]
        else:
            caption = {"true": pairs.captions[i], "shuffled": pairs.captions[other[i]], "uncond": builder.cfg.uncond_prompt}[condition]
            prompt = builder.generation_prompt(caption)
            image = pairs.ids[i].flatten().numpy()
            target = builder.visual_tokens(image)
        docs.append((prompt, target, builder.codes_of(prompt + target, [] if image is None else [image])))
    return docs


@torch.no_grad()
def score(model, docs: list[tuple[list[int], list[int], np.ndarray | None]], batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(prompt, target, codes) rows -> per-sample mean target loss [N] and teacher-forced token accuracy [N].

    A target's loss and hit are the model's (its visual codec's: depth codes add the codes' NLL, and a hit
    needs every code right), as in training. Rows are right-padded: causal attention never lets a real token
    see the padding behind it."""
    losses, accs = [], []
    for start in range(0, len(docs), batch_size):
        batch = docs[start : start + batch_size]
        rows = [p + t for p, t, _ in batch]
        ids = torch.full((len(rows), max(map(len, rows))), model.layout.eos, dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, : len(row)] = torch.tensor(row)
        codes = torch.full((*ids.shape, model.codec.L), -1, dtype=torch.long)  # each row's side codes, -1 elsewhere
        for r, (_, _, c) in enumerate(batch):
            if c is not None:
                codes[r, : len(c)] = torch.from_numpy(c)
        codes = codes.to(model.device)
        hidden = model.hidden_states(ids.to(model.device), visual_codes=codes).last_hidden_state  # [B, T, d]
        for r, (prompt, target, _) in enumerate(batch):
            at = slice(len(prompt) - 1, len(prompt) + len(target) - 1)  # the positions predicting the target
            h, side = hidden[r, at], codes[r, at.start + 1 : at.stop + 1]  # [t, d], the targets' codes [t, L]
            wanted = torch.tensor(target, device=h.device)
            loss = model.target_losses(h, wanted, side)  # [t] chunked CE, no [t, V] logits kept
            hits = model.target_hits(h, wanted, side)
            losses.append(loss.float().mean().item())
            accs.append(hits.float().mean().item())
    return np.array(losses), np.array(accs)


def interval(diff: np.ndarray) -> tuple[float, float, float]:
    """per-sample differences -> (mean, low, high): mean +- 1.96 standard errors."""
    mean = float(diff.mean())
    half = 1.96 * float(diff.std(ddof=1)) / math.sqrt(len(diff)) if len(diff) > 1 else float("nan")
    return mean, mean - half, mean + half


def conditioning_gaps(model, builder: SequenceBuilder, pairs: HeldoutPairs, batch_size: int = 8) -> dict:
    """-> {"understanding": {...}, "generation": {...}, "pairs": N}: per task the mean loss and accuracy per
    condition and each gap (condition - true) with its 95% interval."""
    was_training = model.training
    model.eval()
    result: dict = {"pairs": len(pairs.captions)}
    try:
        for task, conditions in CONDITIONS.items():
            scores = {c: score(model, documents(builder, pairs, task, c), batch_size) for c in conditions}
            out = {}
            for c, (loss, acc) in scores.items():
                out[f"loss_{c}"], out[f"acc_{c}"] = float(loss.mean()), float(acc.mean())
            for c in conditions[1:]:
                mean, lo, hi = interval(scores[c][0] - scores["true"][0])
                out[f"gap_{c}"], out[f"gap_{c}_ci95"] = mean, [lo, hi]
            result[task] = out
    finally:
        model.train(was_training)
    return result


def flat_metrics(gaps: dict) -> dict[str, float]:
    """conditioning_gaps' result -> scalars for metrics.jsonl: gap_<task>_<condition> (+ _lo/_hi), acc_<task>_<condition>."""
    flat = {}
    for task in CONDITIONS:
        for key, value in gaps[task].items():
            if key.endswith("_ci95"):
                flat[f"{task}_{key[:-5]}_lo"], flat[f"{task}_{key[:-5]}_hi"] = value
            elif key.startswith(("gap_", "acc_")):
                flat[f"{task}_{key}"] = value
    return flat


def plot_training(metrics_jsonl: str | Path, out_dir: str | Path) -> list[Path]:
    """loss_curves.png (training losses) and gaps.png (the gaps with their 95% bands) over steps."""
    from semhitok.common.plot import plot_metrics

    gap_keys = [f"{task}_gap_{c}" for task, conditions in CONDITIONS.items() for c in conditions[1:]]
    drawn = [plot_metrics(metrics_jsonl, Path(out_dir) / "loss_curves.png", ["loss", "loss_understanding", "loss_generation", "loss_text"],
                          "training loss", ylabel="cross-entropy (nats per token)"),
             plot_metrics(metrics_jsonl, Path(out_dir) / "gaps.png", gap_keys, "conditioning gaps (held-out pairs)",
                          ylabel="loss without the condition - loss with it (nats/token)",
                          zero_line="0: the condition is not used; above 0: it is")]
    return [p for p in drawn if p is not None]
