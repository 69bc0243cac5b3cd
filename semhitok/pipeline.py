"""The whole path as one library call; `semhitok pipeline` (cli.py) runs it on a preset and its overrides.

    world (when configured) -> SigLIP teacher (stage 0, when configured) -> tokenizer (its kind's trainer)
    -> tokenizer eval + held-out reconstructions -> pre-tokenization -> unified LLM -> samples -> eval

Each stage resumes if it was interrupted; a resume that the saved work refuses is refused before anything is
recorded. `semhitok compare` (eval/compare.py) runs it in a child process per tokenizer kind, so that one kind's
crash or memory stays there.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from semhitok.common.io import write_json
from semhitok.common.model_card import eval_dir
from semhitok.common.run_dir import record_run
from semhitok.data_pipelines.pretokenize import check_resume, run_pretokenize
from semhitok.data_pipelines.world import write_world
from semhitok.eval.recon import evaluate_reconstruction
from semhitok.eval.summary import evaluate_model
from semhitok.eval.world_eval import prompt_checker
from semhitok.mllm.sample import load_sampler, read_prompts, sample_images
from semhitok.mllm.train import check_resume as check_mllm_resume
from semhitok.mllm.train import train_mllm
from semhitok.tokenizer import list_images, load_tokenizer, reconstruct_to_dir
from semhitok.tokenizer.kinds import kind_trainer
from semhitok.tokenizer.teacher import train_teacher
from semhitok.tokenizer.semhitok.train import check_resumes as check_tokenizer_resumes

log = logging.getLogger("semhitok")

PIPELINE_SAMPLES = 64  # held-out prompts the pipeline draws (the first ones of the file)


def pipeline_prompts(cfg) -> str:
    """The file of held-out prompts the pipeline draws samples for ("": none, and no samples stage)."""
    return cfg.eval.gfid_captions or (str(cfg.world_dir / "prompts.jsonl") if cfg.world.enabled else "")


def pipeline_stages(cfg) -> list[str]:
    """The stages `semhitok pipeline` runs for this config, in order; its headers count through them."""
    stages = ["world"] if cfg.world.enabled else []
    stages += ["teacher"] if cfg.teacher_train.enabled else []
    stages += ["tokenizer", "tokenizer eval", "pretokenize", "mllm"]
    stages += ["samples"] if pipeline_prompts(cfg) else []
    return stages + ["eval"]


def pipeline_outputs(cfg) -> list[tuple[str, Path]]:
    """What a reader opens after the pipeline, in stage order: (label, path) of those that exist."""
    run, evaluation = Path(cfg.run_dir), eval_dir(cfg.mllm_dir / "final")
    outputs = [("world", cfg.world_dir),
               ("teacher retrieval", cfg.teacher_dir / "teacher_eval.json"),
               ("tokenizer", cfg.tokenizer_dir),
               ("tokenizer metrics", run / "tokenizer_eval.json"),
               ("held-out reconstructions (inputs above)", run / "reconstructions" / "grid.png"),
               ("pre-tokenized data", cfg.pretokenized_dir / "manifest.json"),
               ("model", cfg.mllm_dir / "final"),
               ("loss curves", cfg.mllm_dir / "loss_curves.png"),
               ("conditioning gaps", cfg.mllm_dir / "gaps.png"),
               ("samples", run / "samples" / "grid.png"),
               ("eval summary", evaluation / "summary.md"),
               ("world questions", evaluation / "world" / "questions.png")]
    outputs += [(f"world generation {grid.parent.name}", grid)
                for grid in sorted((evaluation / "world" / "generation").glob("cfg_*/grid.png"))]
    return [(label, path) for label, path in outputs if path.exists()]


def _stage(stages: list[str], stage: str, text: str, *text_args) -> None:
    """The header of one pipeline stage: `== stage 3/6: text`."""
    log.info("== stage %d/%d: " + text, stages.index(stage) + 1, len(stages), *text_args)


def run_pipeline(cfg, preset: str | None = None, overrides: list[str] | None = None) -> Path:
    """Every stage in order for `cfg` (a ProjectConfig); each stage resumes if it was interrupted -> the trained
    model's directory. preset, overrides: what each stage's run record (config.yaml, run.json) says it was run with."""
    stages = pipeline_stages(cfg)
    check_resume(cfg.pretokenize, cfg.pretokenize_tokenizer, cfg.pretokenized_dir)  # a refused resume records nothing
    check_mllm_resume(cfg)
    if cfg.tokenizer.kind == "semhitok":
        check_tokenizer_resumes(cfg)
    record_run(cfg.run_dir, cfg, "pipeline", preset, overrides)
    if cfg.world.enabled:
        _stage(stages, "world", "shapes world -> %s", cfg.world_dir)
        write_world(cfg.world, cfg.world_dir)
    if cfg.teacher_train.enabled:
        _stage(stages, "teacher", "SigLIP teacher (the tokenizer's stage 0) -> %s", cfg.teacher_dir)
        result = train_teacher(cfg.teacher_train, cfg.teacher_dir)
        print(json.dumps({k: v for k, v in result.items() if k != "curve"}))
    _stage(stages, "tokenizer", "%s tokenizer -> %s", cfg.tokenizer.kind, Path(cfg.run_dir) / "tokenizer")
    record_run(Path(cfg.run_dir) / "tokenizer", cfg, f"tokenizer-{cfg.tokenizer.kind}", preset, overrides)
    kind_trainer(cfg.tokenizer.kind)[0](cfg)
    model = load_tokenizer(cfg.tokenizer_dir)
    _stage(stages, "tokenizer eval", "tokenizer eval on %s", cfg.tokenizer_train.holdout_data)
    result = evaluate_reconstruction(model, cfg.tokenizer_train.holdout_data, fid=False)
    write_json(Path(cfg.run_dir) / "tokenizer_eval.json", result)
    reconstruct_to_dir(model, list_images(cfg.tokenizer_train.holdout_data), Path(cfg.run_dir) / "reconstructions")
    print(json.dumps(result))
    _stage(stages, "pretokenize", "pretokenize %s -> %s", [src.name for src in cfg.pretokenize.sources], cfg.pretokenized_dir)
    record_run(cfg.pretokenized_dir, cfg, "pretokenize", preset, overrides)
    run_pretokenize(cfg.pretokenize, cfg.pretokenize_tokenizer, cfg.pretokenized_dir)  # logs its summary
    if (cfg.mllm_dir / "final" / "semhitok_mllm.json").is_file():
        _stage(stages, "mllm", "mllm already trained at %s; skipping", cfg.mllm_dir / "final")
    else:
        _stage(stages, "mllm", "mllm training -> %s", cfg.mllm_dir)
        record_run(cfg.mllm_dir, cfg, "mllm-train", preset, overrides)
        train_mllm(cfg)
    model_dir = cfg.mllm_dir / "final"
    prompts_file = pipeline_prompts(cfg)
    if prompts_file:
        _stage(stages, "samples", "text-to-image samples for the held-out prompts of %s", prompts_file)
        decoder, visual = load_sampler(model_dir)
        captions = read_prompts(prompts_file)[:PIPELINE_SAMPLES]
        record_run(Path(cfg.run_dir) / "samples", cfg, "sample", preset, overrides)
        verdict = None
        if cfg.world.enabled:  # the samples grid frames each image by the world checker's verdict on its prompt
            verdict = prompt_checker(cfg.world_dir)
        sample_images(decoder, visual, captions, Path(cfg.run_dir) / "samples", cfg.eval.sampling, cfg.eval.batch_size,
                      verdict=verdict)

    evaluation = eval_dir(model_dir)  # where `semhitok eval --model` and eval/run_lmms.sh write too
    _stage(stages, "eval", "evaluation -> %s", evaluation)
    record_run(evaluation, cfg, "eval", preset, overrides)
    evaluate_model(model_dir, cfg.eval, evaluation)
    print((evaluation / "summary.md").read_text())
    outputs = pipeline_outputs(cfg)
    print(f"outputs of {cfg.run_dir}:")
    for label, path in outputs:
        print(f"  {label + ':':<{max(len(label) for label, _ in outputs) + 1}} {path}")
    print(f"chat with the model: semhitok chat --model {model_dir}")
    return model_dir
