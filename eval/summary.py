"""`semhitok eval`: every score of one model into <out>/summary.json and a markdown table <out>/summary.md.

A benchmark whose scorer is missing is listed with the reason instead of a number. A benchmark whose data
is missing raises BenchmarkUnavailable (exit 1) unless eval.allow_skip=true, which lists it as skipped with a
warning; an empty path (e.g. eval.pope_questions=) turns a benchmark off. lmms-eval results written under
<out>/lmms_eval (`bash eval/run_lmms.sh MODEL TASKS <out>/lmms_eval`) join the table. eval.world=<a directory
written by data_pipelines.world.write_world> adds the world's scores (eval/world_eval.py), written under
<out>/world, with their own section after the table.

The default <out> is the model's one eval folder (semhitok.common.model_card.eval_dir: <run>/mllm/final ->
<run>/mllm/eval), where the pipeline and eval/run_lmms.sh write too; an eval there rewrites the export's
model card (README.md) with the new scores.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from semhitok.common.io import atomic_path, write_json
from semhitok.common.model_card import eval_dir
from semhitok.eval.config import EvalConfig
from semhitok.eval.fid import FIDUnavailable
from semhitok.eval.generation import (GenEvalUnavailable, generate_geneval, generation_fid, read_captions, read_metadata,
                                      score_geneval)
from semhitok.eval.pope import load_pope, run_pope
from semhitok.eval.recon import evaluate_reconstruction
from semhitok.eval.world_eval import score_world, world_table
from semhitok.mllm.gaps import conditioning_gaps, load_pairs
from semhitok.mllm.sample import load_sampler

log = logging.getLogger("semhitok")


class BenchmarkUnavailable(FileNotFoundError):
    """A requested benchmark cannot run (its data is missing) and eval.allow_skip is false (the CLI exits non-zero)."""


# benchmark -> its config field (and, for a directory, the file in it that must exist)
BENCHMARK_DATA = {"pope": "pope_questions", "geneval": "geneval_metadata", "gaps": "gaps_data", "world": "world",
                  "gfid": "gfid_captions"}
DATA_FILE = {"world": "questions.jsonl"}


def runnable(cfg: EvalConfig, summary: dict) -> set[str]:
    """The benchmarks to run: those with a data path that exists. An empty path turns one off; a missing file
    raises BenchmarkUnavailable, or with eval.allow_skip=true warns and records `skipped` in the summary."""
    run, missing = set(), []
    for name, field in BENCHMARK_DATA.items():
        path = getattr(cfg, field)
        if path and (Path(path) / DATA_FILE.get(name, "")).is_file():
            run.add(name)
        elif path:
            holds = f" (or holds no {DATA_FILE[name]})" if name in DATA_FILE else ""
            missing.append(f"{name}: eval.{field}={path} not found{holds}")
            summary[name] = {"skipped": f"{path} not found"}
    if missing and not cfg.allow_skip:
        raise BenchmarkUnavailable("; ".join(missing) + " (fix the path, turn the benchmark off with an empty path, "
                                   "or pass eval.allow_skip=true)")
    for line in missing:
        log.warning("skipped %s", line)
    return run


def evaluate_model(model_dir: str | Path, cfg: EvalConfig, out: str | Path, device: str | None = None) -> dict:
    summary: dict = {"model": str(model_dir)}
    todo = runnable(cfg, summary)  # before loading anything: a missing file fails fast
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    decoder, visual = load_sampler(model_dir, device, cfg.compile)

    if "pope" in todo:
        log.info("== POPE: %s", cfg.pope_questions)
        pope = run_pope(decoder, visual, load_pope(cfg.pope_questions, cfg.pope_image_root))
        write_json(out / "pope_answers.json", pope.pop("answers"))
        summary["pope"] = pope

    if "geneval" in todo:
        metadata = read_metadata(cfg.geneval_metadata)[: cfg.geneval_limit or None]
        log.info("== GenEval: %d prompts x %d samples", len(metadata), cfg.geneval_samples)
        generate_geneval(decoder, visual, metadata, out / "geneval", cfg.sampling, cfg.geneval_samples, cfg.batch_size)
        summary["geneval"] = {"prompts": len(metadata), "images": str(out / "geneval")}
        try:
            summary["geneval"].update(score_geneval(out / "geneval", out))
        except GenEvalUnavailable as err:
            summary["geneval"]["not_scored"] = str(err)

    if "gaps" in todo:
        log.info("== conditioning gaps: %s", cfg.gaps_data)
        summary["gaps"] = conditioning_gaps(decoder.model, decoder.builder, load_pairs(cfg.gaps_data, visual, cfg.gaps_limit), cfg.batch_size)

    if "world" in todo:
        log.info("== world: %s", cfg.world)
        summary["world"] = score_world(decoder, visual, cfg.world, out / "world", cfg.sampling, cfg.world_questions_limit,
                                       cfg.world_prompts_limit, cfg.batch_size)

    if "gfid" in todo:
        log.info("== gFID: %s", cfg.gfid_captions)
        summary["gfid"] = generation_fid(decoder, visual, read_captions(cfg.gfid_captions), [cfg.gfid_captions],
                                         out / "gfid_images", cfg.sampling, cfg.batch_size)

    log.info("== tokenizer reconstruction: %s", cfg.recon_images)
    try:
        summary["tokenizer"] = evaluate_reconstruction(visual, cfg.recon_images, cfg.batch_size)
    except FIDUnavailable as err:
        summary["tokenizer"] = {"error": str(err)}

    lmms = collect_lmms_results(out / "lmms_eval", model_dir)
    if lmms:
        summary["lmms_eval"] = lmms
    write_json(out / "summary.json", summary)
    with atomic_path(out / "summary.md") as tmp:
        tmp.write_text(markdown_table(summary))
    refresh_card(model_dir, out)
    return summary


def refresh_card(model_dir: str | Path, out: Path) -> Path | None:
    """Rewrite the model card of a local MLLM export whose eval folder `out` is (eval_dir), so it shows these
    scores; an eval written elsewhere (--out) leaves the card alone."""
    model_dir = Path(model_dir)
    if not (model_dir / "semhitok_mllm.json").is_file() or eval_dir(model_dir.resolve()) != out.resolve():
        return None
    from semhitok.mllm.hf_export import write_mllm_card

    card = write_mllm_card(model_dir, model_dir)
    log.info("model card with these scores: %s", card)
    return card


def _evaluated_model(results: dict) -> Path | None:
    """The `pretrained=` directory an lmms-eval results JSON was written for, when it says."""
    args = (results.get("config") or {}).get("model_args") or ""
    args = ",".join(f"{k}={v}" for k, v in args.items()) if isinstance(args, dict) else str(args)
    for part in args.split(","):
        if part.startswith("pretrained="):
            return Path(part.removeprefix("pretrained=")).resolve()
    return None


def collect_lmms_results(root: Path, model_dir: str | Path | None = None) -> dict:
    """Scores of earlier `eval/run_lmms.sh MODEL TASKS <out>/lmms_eval` runs: the newest result per task.
    With model_dir, results that name another model (lmms-eval's model_args pretrained=) are left out."""
    scores: dict = {}
    for results_file in sorted(root.rglob("*results*.json"), key=lambda p: p.stat().st_mtime):
        results = json.loads(results_file.read_text())
        other = _evaluated_model(results)
        if model_dir is not None and other is not None and other != Path(model_dir).resolve():
            log.warning("%s: results of %s, not of %s; left out", results_file, other, model_dir)
            continue
        for task, metrics in results.get("results", {}).items():
            scores[task] = {k.split(",")[0]: v for k, v in metrics.items() if isinstance(v, (int, float)) and "stderr" not in k}
    return scores


def markdown_table(summary: dict) -> str:
    """summary -> a markdown table: benchmark | metric | value (or why it is missing)."""
    lines = [f"# Evaluation of `{summary['model']}`", "", "| benchmark | metric | value |", "|---|---|---|"]
    for bench in ("gaps", "pope", "geneval", "gfid", "tokenizer", "lmms_eval"):
        for key, value in summary.get(bench, {}).items():
            if isinstance(value, dict):  # per-category / per-task results
                for sub, v in value.items():
                    if sub.endswith("_ci95"):
                        continue
                    ci = value.get(f"{sub}_ci95")
                    shown = f"{_fmt(v)} [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else _fmt(v)
                    lines.append(f"| {bench} | {key}.{sub} | {shown} |")
            else:
                lines.append(f"| {bench} | {key} | {_fmt(value)} |")
    if "gaps" in summary:
        lines += ["", "gaps: loss(shuffled / no image / unconditional) - loss(true) per held-out pair, mean [95% interval];",
                  "clearly positive = the model uses the image (understanding) and the caption (generation)."]
    if "world" in summary:
        lines += world_table(summary["world"])
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value).replace("|", "\\|")
