"""Stage 0: a small SigLIP trained from scratch on (image, caption) pairs, so the tokenizers have a teacher that
knows something when no pretrained SigLIP fits (the shapes world of data_pipelines/world.py, a laptop, no hub).

    images [B, 3, S, S] in [-1, 1] --vision tower + MAP head--> [B, D] \
                                                                        cosine * exp(t) + b -> [B, B] -> sigmoid loss
    captions --byte ids [B, T]--> text tower, last position, head -> [B, D] /

The model is transformers' SiglipModel (both towers, random init from TeacherTrainConfig's vision_config and
text_config), saved with save_pretrained in the Hub layout, so every `teacher` option loads it as it loads
google/siglip-*: tokenizer.teacher / dualtoken.teacher (vision tower) and toklip.teacher (both towers, with
toklip.text_tokenizer=bytes and toklip.text_max_length = the text_max_length it was trained with).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import SiglipConfig, SiglipModel

from semhitok.common.dist import default_device
from semhitok.common.io import atomic_dir, loads_json, write_json
from semhitok.tokenizer.config import TeacherTrainConfig
from semhitok.tokenizer.data import center_crop_resize, load_rgb
from semhitok.tokenizer.text import byte_caption_ids
from semhitok.tokenizer.trainer import warmup_cosine

log = logging.getLogger("semhitok")

EVAL_FILE, CONFIG_FILE = "teacher_eval.json", "teacher_train.json"


def read_pairs(sources: list[str | Path]) -> list[tuple[Path, str]]:
    """jsonl files of {"image": path relative to the jsonl's folder, "caption": text} -> (image path, caption);
    rows without both are skipped with a warning naming them."""
    pairs: list[tuple[Path, str]] = []
    for source in map(Path, sources):
        if source.suffix != ".jsonl" or not source.is_file():
            raise FileNotFoundError(f"{source}: the teacher trains on jsonl files of image + caption")
        with open(source) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = loads_json(line, "row")  # (depth-limited: a ValueError, not a RecursionError)
                    image, caption = row["image"], row["caption"]
                except (ValueError, KeyError, TypeError) as err:
                    log.warning("%s:%d: skipped, no usable \"image\" and \"caption\" (%s)", source, lineno, err)
                    continue
                if not isinstance(caption, str) or not caption:
                    log.warning("%s:%d: skipped, empty caption", source, lineno)
                    continue
                pairs.append((source.parent / image, caption))
    return pairs


def load_pairs(sources: list[str | Path], size: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Every distinct image decoded once -> (images [M, 3, size, size] uint8, image index of each pair [P],
    caption of each pair). Pairs whose image does not decode are dropped (load_rgb warns)."""
    cache: dict[Path, int] = {}
    arrays: list[np.ndarray] = []
    index, captions = [], []
    for path, caption in read_pairs(sources):
        if path not in cache:
            img = load_rgb(path, size=size)
            if img is None:
                cache[path] = -1
            else:
                if img.size != (size, size):
                    img = center_crop_resize(img, size)
                cache[path] = len(arrays)
                arrays.append(np.asarray(img, dtype=np.uint8))
        if cache[path] >= 0:
            index.append(cache[path])
            captions.append(caption)
    if not captions:
        raise ValueError(f"no usable (image, caption) pairs in {list(map(str, sources))}")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # [M, 3, S, S] uint8
    return images, torch.tensor(index), captions


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, S, S] -> float [-1, 1] (tokenizer/data.py's to_tensor convention)"""
    return images.float() / 127.5 - 1.0


def sigmoid_loss(logits: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """SigLIP's loss: logits [B, B] (text i vs image j), positive [B, B] bool -> -sum_j log sigmoid(+-logit_ij),
    mean over i. SiglipModel's return_loss uses the identity as `positive`; here pairs with the same caption text
    or the same image are positives too (the world repeats "a red circle" many times in a batch)."""
    sign = positive.float() * 2 - 1
    return -F.logsigmoid(sign * logits.float()).sum(-1).mean()


def build_teacher(cfg: TeacherTrainConfig) -> SiglipModel:
    """A random SiglipModel of cfg's towers; logit scale exp(t') and bias b from cfg (transformers' init, t' = 0 and
    b = 0, would leave the logits in [-1, 1], a temperature a short schedule cannot learn away)."""
    model = SiglipModel(SiglipConfig(text_config=cfg.text_config, vision_config=cfg.vision_config))
    with torch.no_grad():
        model.logit_scale.fill_(math.log(cfg.init_logit_scale))
        model.logit_bias.fill_(cfg.init_logit_bias)
    return model


@torch.no_grad()
def embed(model: SiglipModel, images: torch.Tensor, ids: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """images uint8 [N, 3, S, S], byte ids [M, T] -> unit (image features [N, D], text features [M, D]) on CPU"""
    model.eval()
    device = next(model.parameters()).device
    img = torch.cat([model.get_image_features(pixel_values=to_unit_range(images[i : i + batch]).to(device)).pooler_output
                     for i in range(0, len(images), batch)])
    txt = torch.cat([model.get_text_features(input_ids=ids[i : i + batch].to(device)).pooler_output
                     for i in range(0, len(ids), batch)])
    return F.normalize(img.float(), dim=-1).cpu(), F.normalize(txt.float(), dim=-1).cpu()


def retrieval_accuracy(model: SiglipModel, images: torch.Tensor, captions: list[str], max_length: int) -> dict[str, float]:
    """Held-out retrieval over N (image, caption) pairs, image i described by caption i.

    image_to_caption: share of images whose most similar caption (among the N) has the *same text* as the
    image's own caption; caption_to_image: share of captions whose most similar image has a caption of the same
    text. A retrieval counts as correct on equal text, not equal index, because many held-out captions are the
    same string ("a red circle") and those are indistinguishable. chance = 1/N (one right answer);
    chance_text = what a uniformly random pick scores under the equal-text rule (mean share of rows sharing a
    caption's text), the baseline the two accuracies should be read against."""
    img, txt = embed(model, images, byte_caption_ids(captions, max_length))
    sim = img @ txt.t()  # [N images, N captions]
    codes = {c: k for k, c in enumerate(dict.fromkeys(captions))}
    label = torch.tensor([codes[c] for c in captions])  # [N] text id of each row
    n = len(captions)
    return {
        "image_to_caption": float((label[sim.argmax(1)] == label).float().mean()),
        "caption_to_image": float((label[sim.argmax(0)] == label).float().mean()),
        "chance": 1.0 / n,
        "chance_text": float(torch.bincount(label)[label].float().mean() / n),
        "pairs": n,
    }


def optimizer(model: SiglipModel, cfg: TeacherTrainConfig):
    """AdamW (no decay on norms, biases, logit scale and bias) with warmup + cosine -> (optimizer, scheduler)"""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.warmup, cfg.steps, cfg.min_lr_ratio))


def index_batches(n: int, batch: int, seed: int):
    """Endless batches [batch] of indices in [0, n): a seeded permutation per epoch, its remainder dropped"""
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=gen)
        for start in range(0, n - batch + 1, batch):
            yield order[start : start + batch]


def finished(out_dir: Path) -> bool:
    return all((out_dir / name).is_file() for name in ("config.json", "model.safetensors", EVAL_FILE, CONFIG_FILE))


def train_teacher(cfg: TeacherTrainConfig, out_dir: str | Path) -> dict:
    """Train the SigLIP teacher on cfg.train_data and save it to `out_dir` (atomically; Hub layout: config.json
    with model_type siglip + model.safetensors, plus teacher_eval.json and teacher_train.json, the config).
    Returns the held-out evaluation (see retrieval_accuracy) with the final train loss and the wall time.

    A finished `out_dir` made with the same config is kept and its evaluation returned; one made with another
    config is refused with one line (delete it or pick another directory)."""
    out_dir = Path(out_dir)
    record = dataclasses.asdict(cfg)
    if finished(out_dir):
        if json.loads((out_dir / CONFIG_FILE).read_text()) != record:
            raise ValueError(f"{out_dir}: holds a teacher trained with another config ({CONFIG_FILE}); delete it or "
                             "pick another directory")
        log.info("SigLIP teacher already trained at %s; skipping", out_dir)
        return json.loads((out_dir / EVAL_FILE).read_text())

    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model = build_teacher(cfg)
    size = model.config.vision_config.image_size
    images, pair_image, captions = load_pairs(cfg.train_data, size)  # [M, 3, S, S] uint8, [P], P captions
    ids = byte_caption_ids(captions, cfg.text_max_length)  # [P, T]
    codes = {c: k for k, c in enumerate(dict.fromkeys(captions))}
    pair_text = torch.tensor([codes[c] for c in captions])  # [P] text id of each pair
    held_images, held_index, held_captions = load_pairs(cfg.holdout_data, size)
    held_images = held_images[held_index]
    log.info("teacher: %d train pairs (%d images, %d distinct captions), %d held-out pairs, loaded in %.1f s",
             len(captions), len(images), len(codes), len(held_captions), time.perf_counter() - start)

    device = default_device()
    model.to(device).train()
    opt, sched = optimizer(model, cfg)
    batches = index_batches(len(captions), min(cfg.batch_size, len(captions)), cfg.seed)
    tail = max(1, min(20, cfg.steps // 10))  # the final train loss: mean of the last `tail` steps
    losses: list[torch.Tensor] = []
    curve: list[dict] = []  # held-out retrieval during training (eval_every)
    bar = tqdm(range(cfg.steps), desc="teacher", mininterval=1.0 if sys.stderr.isatty() else 30.0, dynamic_ncols=True)
    for step in bar:
        idx = next(batches)  # [B] pair indices
        img_i, txt_i = pair_image[idx], pair_text[idx]
        positive = (txt_i[:, None] == txt_i[None, :]) | (img_i[:, None] == img_i[None, :])  # [B, B]
        out = model(input_ids=ids[idx].to(device), pixel_values=to_unit_range(images[img_i]).to(device))
        loss = sigmoid_loss(out.logits_per_text, positive.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        losses.append(loss.detach())
        if (step + 1) % 10 == 0 or step + 1 == cfg.steps:
            bar.set_postfix(loss=f"{float(torch.stack(losses[-10:]).mean()):.3f}",
                            t=f"{model.logit_scale.detach().exp().item():.1f}", refresh=False)
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            acc = retrieval_accuracy(model, held_images, held_captions, cfg.text_max_length)
            model.train()
            curve.append({"step": step + 1, "image_to_caption": acc["image_to_caption"],
                          "caption_to_image": acc["caption_to_image"], "train_loss": float(torch.stack(losses[-tail:]).mean())})
            bar.write(f"teacher step {step + 1}: held-out image->caption {acc['image_to_caption']:.3f}, "
                      f"caption->image {acc['caption_to_image']:.3f}")
    bar.close()
    train_loss = float(torch.stack(losses[-tail:]).mean())
    result = {**retrieval_accuracy(model, held_images, held_captions, cfg.text_max_length),
              "train_loss": train_loss, "initial_train_loss": float(losses[0]), "steps": cfg.steps,
              "seconds": round(time.perf_counter() - start, 1), **({"curve": curve} if curve else {})}
    log.info("teacher: held-out image->caption %.3f, caption->image %.3f (chance %.3f, same-text chance %.3f), "
             "train loss %.3f, %.0f s", result["image_to_caption"], result["caption_to_image"], result["chance"],
             result["chance_text"], train_loss, result["seconds"])
    model = model.cpu().eval()
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        write_json(tmp / EVAL_FILE, result)
        write_json(tmp / CONFIG_FILE, record)
    return result
