"""The paper's tokenizer ablations (Tables 4 and 5) as runnable variants, with their published numbers.

    semhitok ablate --table 5 --config tiny           # every variant at equal budget -> <out>/table5.md

Each table trains its stage-1 runs once (shared by the variants that need the same one), then a stage 2 per
variant with the same steps, batch and learning rate, and measures on the held-out images: rFID (when the
Inception weights load, else '-'), PSNR, SSIM, codebook usage and the teacher cosine of the semantic branch
(our stand-in for the understanding scores of Table 4). A variant whose metrics.json exists is skipped, an
interrupted one resumes from its checkpoints, so the command can simply be run again.

Lives in eval/ (not tokenizer/) because rFID does: nothing in tokenizer/ may import eval.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from semhitok.common.config_io import deep_merge, from_dict, parse_overrides
from semhitok.common.io import write_json
from semhitok.eval.recon import evaluate_reconstruction
from semhitok.tokenizer import SemHiTok, TokenizerConfig, TokenizerTrainConfig, iter_image_batches, list_images
from semhitok.tokenizer.data import ImageDataset, collate_images
from semhitok.tokenizer.losses import distill_loss
from semhitok.tokenizer.model import load_teacher
from semhitok.tokenizer.train import train_tokenizer

log = logging.getLogger("semhitok")


@dataclass
class Variant:
    name: str  # directory name
    cells: list[str]  # the row's leading cells, in the paper's layout
    overrides: list[str] = field(default_factory=list)  # tokenizer.* / tokenizer_train.* for stage 2
    stage1: str = "teacher_init"  # key into STAGE1
    paper: list[str] = field(default_factory=list)  # the published numbers, in Table.paper_columns order


@dataclass
class Table:
    number: int
    title: str
    columns: list[str]  # the paper's leading columns
    paper_columns: list[str]
    variants: list[Variant]
    note: str = ""


# Stage-1 runs the variants share: stage-1 overrides by key.
STAGE1 = {"teacher_init": [], "random_init": ["tokenizer_train.student_from_teacher=false"]}

Y = "✓"
TABLES = {
    4: Table(
        4, "Impact of key design choices", ["SemEnc Init", "Texture Incorp.", "SGHC"], ["rFID", "GQA", "POPE", "SEEDB"],
        [
            # No pixel codes: the pixel decoder reconstructs from the semantic codes alone.
            Variant("spc_random_init", ["", "", ""], ["tokenizer.fusion=semantic_only"], "random_init", ["3.10", "56.7", "80.4", "54.1"]),
            Variant("spc_teacher_init", [Y, "", ""], ["tokenizer.fusion=semantic_only"], "teacher_init", ["2.73", "58.2", "83.1", "57.4"]),
            # Texture incorporated into the semantic tokenizer by joint training (MUSE-VL): stage 2 also
            # updates the semantic branch, which keeps its distillation loss.
            Variant("spc_joint", [Y, Y, ""], ["tokenizer.fusion=semantic_only", "tokenizer_train.trains=joint"], "teacher_init",
                    ["2.10", "58.0", "77.3", "56.7"]),
            Variant("sghc", [Y, "", Y], [], "teacher_init", ["1.24", "58.8", "83.2", "58.7"]),
        ],
        "The extracted paper text loses the check marks' columns; rows follow its prose: baseline with a randomly "
        "initialised semantic encoder, + teacher init, + joint texture training, SGHC (teacher init).",
    ),
    5: Table(
        5, "Impact of fusion type and sub-codebook size", ["Fusion", "Subc Size"], ["rFID", "Usage"],
        [
            Variant("wo_sem_m12", ["w/o sem", "12"], ["tokenizer.fusion=pixel_only", "tokenizer.pix_codes_per_group=12"],
                    paper=["1.99", "98.4%"]),
            Variant("len_m12", ["Len", "12"], ["tokenizer.fusion=length", "tokenizer.pix_codes_per_group=12"], paper=["1.45", "97.1%"]),
            Variant("dim_m8", ["Dim", "8"], ["tokenizer.fusion=concat", "tokenizer.pix_codes_per_group=8"], paper=["1.42", "96.4%"]),
            Variant("dim_m12", ["Dim", "12"], ["tokenizer.fusion=concat", "tokenizer.pix_codes_per_group=12"], paper=["1.26", "93.7%"]),
            Variant("dim_m16", ["Dim", "16"], ["tokenizer.fusion=concat", "tokenizer.pix_codes_per_group=16"], paper=["1.19", "79.3%"]),
        ],
        "Paper: trained and evaluated on ImageNet only.",
    ),
}

OUR_COLUMNS = ["rFID", "PSNR", "SSIM", "Sem usage", "Sub-code usage", "Teacher cos"]


def _apply(tok: TokenizerConfig, train: TokenizerTrainConfig, overrides: list[str]):
    """Copies of the two configs with `tokenizer.x=..` / `tokenizer_train.x=..` overrides applied."""
    tree = parse_overrides(overrides)
    unknown = sorted(set(tree) - {"tokenizer", "tokenizer_train"})
    if unknown:
        raise ValueError(f"ablation overrides may only touch tokenizer and tokenizer_train, got {unknown}")
    tok = from_dict(TokenizerConfig, deep_merge(dataclasses.asdict(tok), tree.get("tokenizer", {})), "tokenizer")
    train = from_dict(TokenizerTrainConfig, deep_merge(dataclasses.asdict(train), tree.get("tokenizer_train", {})), "tokenizer_train")
    return tok, train


@torch.no_grad()
def measure(model: SemHiTok, tok: TokenizerConfig, train: TokenizerTrainConfig, fid: bool = True) -> dict:
    """Held-out reconstruction metrics, codebook usage over every sample image (train + held-out) and the
    held-out teacher cosine of the semantic branch (teacher: as stage 1 built it from `tok`)."""
    model.eval()
    result = evaluate_reconstruction(model, train.holdout_data, fid=fid)
    # Usage over all sample images: the held-out set alone is too small to fill K * m ids. Sub-code usage
    # normalises by the groups that occur (distinct ids / (m * distinct semantic ids)): at a scale where most
    # of the K groups never occur it is the comparable figure to the paper's usage.
    sem_used, ids_used = set(), set()
    for _, images in iter_image_batches(list_images(train.train_data + train.holdout_data), model.image_size, 32):
        ids = model.encode(images.to(model.device)).flatten()
        ids_used.update(ids.tolist())
        sem_used.update(model.split_ids(ids)[0].tolist())
    m = model.codes_per_group
    result["semantic_usage"] = len(sem_used) / model.config.sem_codebook_size
    result["subcode_usage"] = None if m == 1 else len(ids_used) / (m * len(sem_used))
    torch.manual_seed(train.seed)  # then built from the run's config, as stage 1 did: a random teacher comes out the same
    teacher = load_teacher(tok).to(model.device)
    holdout = ImageDataset(train.holdout_data, model.image_size)
    images = collate_images([holdout[i] for i in range(len(holdout))])[0].to(model.device)
    cosine, _ = distill_loss(model.semantic(images)[0], teacher(pixel_values=images).last_hidden_state)
    result["teacher_cosine"] = 1 - float(cosine)
    return result


def _fmt(value, kind: str) -> str:
    if value is None:
        return "-"
    return {"pct": f"{100 * value:.1f}%", "db": f"{value:.2f}", "3": f"{value:.3f}", "2": f"{value:.2f}"}[kind]


def render(table: Table, results: dict[str, dict], budget: str) -> str:
    """The markdown table: the paper's leading columns, ours, then the published numbers."""
    head = table.columns + [f"{c} (ours)" for c in OUR_COLUMNS] + [f"{c} (paper)" for c in table.paper_columns]
    lines = [f"Table {table.number}: {table.title}. {budget}", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for v in table.variants:
        r = results.get(v.name)
        ours = ["(not run)"] + [""] * (len(OUR_COLUMNS) - 1) if r is None else [
            _fmt(r.get("rfid"), "2"), _fmt(r["psnr"], "db"), _fmt(r["ssim"], "3"), _fmt(r["semantic_usage"], "pct"),
            _fmt(r["subcode_usage"], "pct"), _fmt(r["teacher_cosine"], "3")]
        lines.append("| " + " | ".join(v.cells + ours + v.paper) + " |")
    if table.note:
        lines += ["", table.note]
    return "\n".join(lines) + "\n"


def run_table(number: int, tok: TokenizerConfig, train: TokenizerTrainConfig, out: Path, stage1_steps: int,
              steps: int, only: list[str] | None = None, fid: bool = True) -> Path:
    """Train and measure every variant of table `number` (or those named in `only`); write <out>/table<N>.md."""
    if number not in TABLES:
        raise ValueError(f"--table must be one of {sorted(TABLES)}, got {number}")
    table = TABLES[number]
    variants = [v for v in table.variants if only is None or v.name in only]
    if only is not None and len(variants) != len(only):
        raise ValueError(f"unknown variant(s) {sorted(set(only) - {v.name for v in variants})}; "
                         f"table {number} has {[v.name for v in table.variants]}")
    out.mkdir(parents=True, exist_ok=True)
    budget = (f"Each variant: stage 1 {stage1_steps} steps (shared), stage 2 {steps} steps, batch {train.batch_size}, "
              f"lr {train.lr}; metrics on {len(list_images(train.holdout_data))} held-out images.")
    path = out / f"table{number}.md"

    def finished() -> dict[str, dict]:
        return {v.name: json.loads(f.read_text()) for v in table.variants if (f := out / v.name / "metrics.json").is_file()}

    for v in variants:
        done = out / v.name / "metrics.json"
        if done.is_file():
            log.info("ablation %s: done already (%s)", v.name, done)
            old = json.loads(done.read_text())
            if (old.get("stage1_steps"), old.get("steps"), old.get("batch_size")) != (stage1_steps, steps, train.batch_size):
                log.warning("ablation %s was trained at another budget (stage 1 %s, stage 2 %s steps, batch %s): delete "
                            "%s to retrain it", v.name, old.get("stage1_steps"), old.get("steps"), old.get("batch_size"), done.parent)
            continue
        start = time.time()
        tok1, train1 = _apply(tok, train, STAGE1[v.stage1])
        stage1 = out / f"stage1_{v.stage1}"
        if not (stage1 / "final" / "config.json").is_file():
            log.info("ablation: stage 1 (%s) -> %s", v.stage1, stage1)
            train_tokenizer(tok1, dataclasses.replace(train1, stage=1, max_steps=stage1_steps), stage1)
        tok2, train2 = _apply(tok, train, STAGE1[v.stage1] + v.overrides)
        log.info("ablation %s: stage 2 %s", v.name, v.overrides)
        model = train_tokenizer(tok2, dataclasses.replace(train2, stage=2, max_steps=steps), out / v.name, stage1 / "final")
        result = {**measure(model, tok2, train2, fid), "variant": v.name, "overrides": v.overrides,
                  "stage1_steps": stage1_steps, "steps": steps, "batch_size": train.batch_size, "lr": train.lr,
                  "seconds": round(time.time() - start, 1)}
        write_json(done, result)
        path.write_text(render(table, finished(), budget))  # after every variant: a partial table to read
    path.write_text(render(table, finished(), budget))
    return path
