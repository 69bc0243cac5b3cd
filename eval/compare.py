"""`semhitok compare`: every visual tokenizer kind through the same pipeline at equal budget, side by side.

    semhitok compare --config tiny                             # every kind in tokenizer/kinds.py KINDS
    semhitok compare --config tiny --kinds semhitok,toklip tokenizer_train.max_steps=300

Each kind runs `semhitok pipeline` in a child process (its log: <out>/<kind>/pipeline.log) with the same
config and overrides plus run_dir=<out>/<kind> and tokenizer.kind=<kind>: the same data, tokenizer_train
steps, batch and learning rate, the same MLLM trainer and steps, the same eval. Then, in one pass over the
held-out images (tokenizer_train.holdout_data), compare measures the kind's tokenizer: PSNR, SSIM, rFID (when
the Inception weights load), codebook usage per code group, the teacher-feature cosine (semantic_alignment,
when the kind has it) and the ids per image; from the pipeline's eval (<out>/<kind>/mllm/eval/summary.json) it
reads the MLLM's held-out loss per task (the conditioning gaps' true-condition losses), POPE accuracy and gFID,
and, when the eval scored the shapes world (eval.world), the MLLM's accuracy on its held-out questions and
prompts (world_scores).

With a preset whose world and stage-0 teacher live under "{run_dir}" (shapes), each kind makes its own copies
in <out>/<kind>: both are deterministic, so every kind trains on the same world and distils the same teacher
(the teacher's training time is paid once per kind).

Writes <out>/compare.md, compare.json and compare.png (the same held-out images reconstructed by each kind).
A finished kind (<out>/<kind>/compare_row.json) is not rerun; a kind that fails shows its error in its row
(what it did measure stays) and is retried by the next run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from semhitok.common.io import atomic_path, write_json
from semhitok.common.model_card import eval_dir
from semhitok.config import load_project_config
from semhitok.eval.recon import evaluate_reconstruction
from semhitok.tokenizer import image_grid, iter_image_batches, list_images
from semhitok.tokenizer.api import pick_device
from semhitok.tokenizer.interface import load_visual_tokenizer
from semhitok.tokenizer.kinds import KINDS

log = logging.getLogger("semhitok")
ROW_FILE = "compare_row.json"  # a kind's finished row
STRIP_FILE = "compare_recon.png"  # a kind's reconstructions of the figure's held-out images
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class KindFailed(RuntimeError):
    pass


def group_usage(slot_usage: list[float], sizes: tuple[int, ...], groups: tuple[int, ...]) -> list[float]:
    """Per code group: the share of the group's codebook entries (all its slots' codes) that occurred, from
    each slot's share (evaluate_reconstruction's code_usage)."""
    out, start = [], 0
    for depth in groups:
        slots = range(start, start + depth)
        out.append(sum(slot_usage[s] * sizes[s] for s in slots) / sum(sizes[s] for s in slots))
        start += depth
    return out


class TokenizerProbe:
    """What compare measures beside evaluate_reconstruction, on the same batches: the teacher-feature cosine
    (when the tokenizer has semantic_alignment) and the reconstructions of the first `keep` images (the figure)."""

    def __init__(self, tok, keep: int, seed: int = 0):
        self.tok, self.keep, self.seed = tok, keep, seed
        self.cos_sum, self.cos_n, self.align_error = 0.0, 0, None
        self.recons: list[torch.Tensor] = []

    def __call__(self, images: torch.Tensor, ids: torch.Tensor, recon: torch.Tensor) -> None:
        if hasattr(self.tok, "semantic_alignment") and self.align_error is None:
            try:
                pred, target = self._alignment(images)  # [B, N', c'] each
                cos = F.cosine_similarity(pred.float(), target.float(), dim=-1)
                self.cos_sum, self.cos_n = self.cos_sum + float(cos.sum()), self.cos_n + cos.numel()
            except Exception as err:  # noqa: BLE001 (e.g. a teacher whose weights are not on this machine)
                self.align_error = f"{type(err).__name__}: {err}".splitlines()[0]
        taken = sum(len(r) for r in self.recons)
        if taken < self.keep:
            self.recons.append(recon[: self.keep - taken].float().cpu())

    def _alignment(self, images: torch.Tensor):
        return self.tok.semantic_alignment(images, seed=self.seed)  # seed: a random (tiny) teacher rebuilt, not saved

    def teacher_cosine(self) -> float | None:
        return self.cos_sum / self.cos_n if self.cos_n else None


def measure_tokenizer(tok_dir: Path, holdout: list[str], fid: bool, keep: int, seed: int = 0) -> tuple[dict, torch.Tensor]:
    """A saved tokenizer on the held-out images -> (its row's tokenizer fields, the first `keep` reconstructions
    [k, 3, H, W] in [-1, 1])."""
    tok = load_visual_tokenizer(tok_dir, pick_device())
    probe = TokenizerProbe(tok, keep, seed)
    recon = evaluate_reconstruction(tok, holdout, fid=fid, observe=probe)
    sizes, groups = tuple(tok.code_vocab_sizes), tuple(tok.code_groups)
    row = {
        "psnr": recon["psnr"], "ssim": recon["ssim"], "rfid": recon.get("rfid"), "held_out_images": recon["images"],
        "codebook_usage": group_usage(recon.get("code_usage") or [recon["visual_id_usage"]], sizes, groups),
        "code_groups": list(groups), "code_vocab_sizes": list(sizes), "teacher_cosine": probe.teacher_cosine(), "positions": tok.grid * tok.grid, "codes_per_position": len(sizes),
        "image_size": tok.image_size,
        "tokenizer_params": sum(p.numel() for p in tok.parameters()) if isinstance(tok, torch.nn.Module) else None,
    }
    if recon.get("rfid_error"):
        row["rfid_error"] = recon["rfid_error"]
    if probe.align_error:
        row["teacher_cosine_error"] = probe.align_error
    return row, torch.cat(probe.recons)


def mllm_scores(summary: dict, cfg_scale: float | None = None) -> dict:
    """The pipeline's eval summary -> held-out loss per task (gaps, true condition), POPE accuracy, gFID and,
    when the world was scored, world_scores."""
    gaps = summary.get("gaps") or {}
    return {"understanding_loss": (gaps.get("understanding") or {}).get("loss_true"),
            "generation_loss": (gaps.get("generation") or {}).get("loss_true"),
            "pope_accuracy": (summary.get("pope") or {}).get("accuracy"),
            "gfid": (summary.get("gfid") or {}).get("gfid"), **world_scores(summary.get("world"), cfg_scale)}


UNDERSTANDING_TYPES = ("colour", "shape")  # the question types with a column of their own


def world_scores(world: dict | None, cfg_scale: float | None = None) -> dict:
    """The shapes world's scores (eval/world_eval.py score_world, summary.json's "world") -> the tables' world
    columns: held-out question accuracy (overall, colour and shape questions), and prompt-checker accuracy
    (overall: the mean of the categories; single_object) at CFG `cfg_scale` (None, or a scale not scored: the
    last one scored, which is the sampling default). {} when the world was not scored (absent or skipped)."""
    if not world or "understanding" not in world:
        return {}
    und, gens = world["understanding"], world.get("generation") or {}
    gen = gens.get(f"cfg_{cfg_scale:g}") if cfg_scale is not None else None
    gen = gen or (list(gens.values())[-1] if gens else {})
    by_type, by_category = und.get("by_type") or {}, gen.get("by_category") or {}
    return {"world_understanding": und.get("accuracy"),
            **{f"world_understanding_{t}": (by_type.get(t) or {}).get("accuracy") for t in UNDERSTANDING_TYPES},
            "world_generation": gen.get("accuracy"),
            "world_generation_single_object": (by_category.get("single_object") or {}).get("accuracy"),
            "world_cfg_scale": gen.get("cfg_scale")}


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


WORLD_COLUMNS = ["world und. (colour / shape)", "world gen. (single obj.)"]


def world_cells(scores: dict) -> list[str]:
    """world_scores -> the WORLD_COLUMNS cells, "62.5% (80.0% / 50.0%)" and "25.0% (50.0%)"; "-" when absent."""
    if "world_understanding" not in scores:
        return ["-", "-"]
    und = _pct(scores["world_understanding"]) + " (" + " / ".join(
        _pct(scores.get(f"world_understanding_{t}")) for t in UNDERSTANDING_TYPES) + ")"
    return [und, f"{_pct(scores.get('world_generation'))} ({_pct(scores.get('world_generation_single_object'))})"]


# Kinds whose stages take their step counts from their own config section: compare sets those to
# tokenizer_train.max_steps (before the user's overrides, which still win), so every stage of every kind trains
# that many steps at tokenizer_train.batch_size.
STAGE_STEPS = {"toklip": ("toklip.vqgan_steps", "toklip.encoder_steps")}


def kind_overrides(config: str, overrides: list[str], kind: str, out: Path) -> list[str]:
    """The equal-budget steps, the user's overrides, then this kind's run directory and tokenizer.kind. Each
    kind samples at its own paper's CFG scale unless the config or an override sets one (load_project_config)."""
    steps = load_project_config(config, overrides).tokenizer_train.max_steps
    return [*(f"{key}={steps}" for key in STAGE_STEPS.get(kind, ())), *overrides,
            f"run_dir={out / kind}", f"tokenizer.kind={kind}"]


def trained_stages(run_dir: Path) -> dict[str, int]:
    """The tokenizer stages a run trained (<run_dir>/tokenizer/<stage>/metrics.jsonl) -> their last step, in
    the order they finished."""
    stages = []
    for metrics in (Path(run_dir) / "tokenizer").glob("*/metrics.jsonl"):
        steps = [json.loads(line).get("step", 0) for line in metrics.read_text().splitlines() if line.strip()]
        done = metrics.parent / "final" / "config.json"
        stages.append((done.stat().st_mtime if done.is_file() else math.inf, metrics.parent.name, max(steps, default=0)))
    return {name: step for _, name, step in sorted(stages)}


def run_pipeline(config: str, overrides: list[str], log_file: Path) -> None:
    """`semhitok pipeline --config CONFIG OVERRIDES` in a child process (a crash, or its memory, stays there)."""
    cmd = [sys.executable, "-m", "semhitok.cli", "pipeline", "--config", config, *overrides]
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}  # the child sets up its own one-process group
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        lines = [ln.strip() for ln in log_file.read_text(errors="replace").splitlines() if ln.strip()]
        raise KindFailed(f"`semhitok pipeline` exited {code}: {lines[-1] if lines else 'no output'} (log: {log_file})")


def compare_kind(kind: str, config: str, overrides: list[str], out: Path, fid: bool, keep: int) -> dict:
    """Run (or resume) one kind's pipeline and measure it -> its row; written to <out>/<kind>/compare_row.json
    when nothing failed. Failures land in row["errors"]."""
    row: dict = {"kind": kind, "overrides": overrides, "errors": []}
    try:
        kind_args = kind_overrides(config, overrides, kind, out)
        cfg = load_project_config(config, kind_args)
    except Exception as err:  # noqa: BLE001 (the row shows it)
        row["errors"].append(f"config: {err}")
        return row
    t, m = cfg.tokenizer_train, cfg.mllm_train
    row["budget"] = {"tokenizer_steps": t.max_steps, "tokenizer_batch": t.batch_size, "tokenizer_lr": t.lr,
                     "mllm_steps": m.max_steps, "mllm_micro_batch": cfg.data.micro_batch_size, "mllm_lr": m.lr}
    start = time.time()
    try:
        log.info("== compare %s: semhitok pipeline -> %s", kind, cfg.run_dir)
        run_pipeline(config, kind_args, out / kind / "pipeline.log")
    except KindFailed as err:
        row["errors"].append(f"pipeline: {err}")
    row["pipeline_seconds"] = round(time.time() - start, 1)
    row["tokenizer_stages"] = trained_stages(Path(cfg.run_dir))  # stage -> steps trained
    try:
        log.info("== compare %s: tokenizer on %s", kind, t.holdout_data)
        fields, recons = measure_tokenizer(cfg.tokenizer_dir, t.holdout_data, fid, keep, t.seed)
        row.update(fields)
        image_grid([recons]).save(out / kind / STRIP_FILE)
    except Exception as err:  # noqa: BLE001
        row["errors"].append(f"tokenizer: {type(err).__name__}: {err}".splitlines()[0])
    summary = eval_dir(cfg.mllm_dir / "final") / "summary.json"
    if summary.is_file():
        row.update(mllm_scores(json.loads(summary.read_text()), cfg.eval.sampling.cfg_scale))
    elif not row["errors"]:
        row["errors"].append(f"mllm: {summary} not written")
    if not row["errors"]:
        write_json(out / kind / ROW_FILE, row)
    return row


def run_comparison(config: str, overrides: list[str], out: Path, kinds: list[str] | None = None, fid: bool = True,
                   figure_images: int = 8) -> dict:
    """Every kind (default: all of KINDS) -> <out>/compare.{md,json,png}; returns compare.json's content."""
    kinds = list(KINDS) if kinds is None else kinds
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"--kinds: unknown kind(s) {unknown}; known: {', '.join(KINDS)}")
    out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for kind in kinds:
        done = out / kind / ROW_FILE
        if done.is_file():
            rows[kind] = json.loads(done.read_text())
            log.info("== compare %s: finished already (%s); delete it to rerun", kind, done)
            if rows[kind].get("overrides") != overrides:
                log.warning("compare %s was run with overrides %s, not %s", kind, rows[kind].get("overrides"), overrides)
        else:
            rows[kind] = compare_kind(kind, config, overrides, out, fid, figure_images)
        write_report(out, config, overrides, rows, figure_images)  # after every kind: a partial table to read
    return json.loads((out / "compare.json").read_text())


def write_report(out: Path, config: str, overrides: list[str], rows: dict[str, dict], figure_images: int) -> None:
    report = {"config": config, "overrides": overrides, "kinds": rows}
    write_json(out / "compare.json", report)
    with atomic_path(out / "compare.md") as tmp:
        tmp.write_text(render(report))
    holdout = next((load_project_config(config, kind_overrides(config, overrides, k, out)).tokenizer_train.holdout_data
                    for k, r in rows.items() if "budget" in r), None)
    if holdout is not None:
        figure(out, rows, holdout, figure_images)


def _f(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def uniform_loss(row: dict) -> float | None:
    """The generation loss of a uniform guess: sum over a position's codes of ln V_l (nats per position)."""
    sizes = row.get("code_vocab_sizes")
    return sum(math.log(v) for v in sizes) if sizes else None


COLUMNS = ["kind", "tok. steps", "ids / image (N x L)", "tokenizer params", "PSNR", "SSIM", "rFID", "codebook usage", "teacher cos",
           "und. loss", "gen. loss (uniform)", "POPE acc", "gFID", "status"]


def render(report: dict) -> str:
    """compare.json -> the markdown table, with the budget every kind trained at."""
    rows = report["kinds"]
    world = any("world_understanding" in r for r in rows.values())  # the world's columns only when it was scored
    scales = sorted({r["world_cfg_scale"] for r in rows.values() if r.get("world_cfg_scale") is not None})
    columns = COLUMNS[:-1] + (WORLD_COLUMNS if world else []) + COLUMNS[-1:]
    budgets = {json.dumps(r.get("budget"), sort_keys=True) for r in rows.values() if r.get("budget")}
    lines = ["# Tokenizer comparison at equal budget", "",
             f"`semhitok compare --config {report['config']}" + "".join(f" {o}" for o in report["overrides"]) + "`", ""]
    for b in map(json.loads, sorted(budgets)):
        lines.append(f"Budget: tokenizer {b['tokenizer_steps']} steps per stage (tok. steps: per stage trained), batch {b['tokenizer_batch']}, lr "
                     f"{b['tokenizer_lr']}; MLLM {b['mllm_steps']} steps, micro-batch {b['mllm_micro_batch']}, lr {b['mllm_lr']}.")
    if len(budgets) > 1:
        lines.append("**The kinds were not trained at one budget** (rows from runs with other overrides).")
    lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for kind, r in rows.items():
        usage = r.get("codebook_usage")
        n, L = r.get("positions"), r.get("codes_per_position")
        gen, uni = r.get("generation_loss"), uniform_loss(r)
        status = "ok" if not r.get("errors") else "FAILED: " + "; ".join(r["errors"]).replace("|", "\\|").replace("\n", " ")
        stages = r.get("tokenizer_stages")
        cells = [kind, "+".join(map(str, stages.values())) if stages else "-", "-" if n is None else f"{n} x {L} = {n * L}",
                 "-" if r.get("tokenizer_params") is None else f"{r['tokenizer_params'] / 1e6:.2f}M",
                 _f(r.get("psnr"), ".2f"), _f(r.get("ssim"), ".3f"), _f(r.get("rfid"), ".2f"),
                 "-" if not usage else " / ".join(f"{100 * u:.1f}%" for u in usage), _f(r.get("teacher_cosine"), ".3f"),
                 _f(r.get("understanding_loss"), ".3f"), "-" if gen is None else f"{gen:.3f} ({uni:.2f})",
                 _f(r.get("pope_accuracy"), ".3f"), _f(r.get("gfid"), ".1f"), *(world_cells(r) if world else []), status]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Held-out images: tokenizer_train.holdout_data. Codebook usage: share of the codebook entries that occur "
              "in the held-out ids, per code group (semantic / pixel when there are two). Teacher cos: cosine between the "
              "tokenizer's prediction of its teacher's features from the ids and the teacher's features (the kinds have "
              "different teachers). und./gen. loss: the MLLM's held-out loss of the caption given the image, and of the "
              "image's codes given the caption (nats per token / per image position; in brackets a uniform guess's loss, "
              "which differs between kinds with different vocabularies)."
              + (" world und.: the MLLM's exact-match accuracy on the shapes world's held-out questions (in brackets: "
                 "colour and shape questions); world gen.: the share of its images for the held-out prompts that pass "
                 "the checker, the mean over the prompt categories (in brackets: single objects), at CFG "
                 + " / ".join(f"{c:g}" for c in scales) + "." if world else "") + " '-': not available (see compare.json).", ""]
    return "\n".join(lines)


def figure(out: Path, rows: dict[str, dict], holdout: list[str], n: int, label_width: int = 96) -> Path | None:
    """compare.png: the first n held-out images (top row), then each kind's reconstructions of them."""
    sizes = [r["image_size"] for r in rows.values() if r.get("image_size")]
    if not sizes:
        return None
    batch = next(iter_image_batches(list_images(holdout)[:n], max(sizes), n), None)
    if batch is None:
        return None
    strips = [("held-out", image_grid([batch[1]]))]
    for kind in rows:
        path = out / kind / STRIP_FILE
        strip = Image.open(path).convert("RGB").resize(strips[0][1].size) if path.is_file() else None
        strips.append((kind, strip or Image.new("RGB", strips[0][1].size, (235, 235, 235))))
    w, h = strips[0][1].size
    canvas = Image.new("RGB", (label_width + w, h * len(strips)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (label, strip) in enumerate(strips):
        canvas.paste(strip, (label_width, i * h))
        failed = label in rows and (rows[label].get("errors") or not (out / label / STRIP_FILE).is_file())
        draw.text((4, i * h + h // 2 - 6), label + (" (failed)" if failed else ""), fill=(0, 0, 0))
    canvas.save(out / "compare.png")
    return out / "compare.png"
