"""The CLI surface: help text and defaults on every flag, --version, `semhitok config`, preset names vs
paths, shipped paths from any directory, run-directory records and the eval config found from them."""

import argparse
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import semhitok
from semhitok.cli import build_parser, main
from semhitok.common import config_io
from semhitok.common.config_io import ConfigError, resolve_preset
from semhitok.common.run_dir import find_run_config, record_run
from semhitok.config import load_project_config
from tests.conftest import REPO


def _parsers(parser: argparse.ArgumentParser, name: str = "semhitok"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def test_every_flag_has_help_and_shows_its_default():
    parsers = dict(_parsers(build_parser()))
    assert {"semhitok config", "semhitok tokenizer eval", "semhitok sample", "semhitok eval"} <= set(parsers)
    for name, parser in parsers.items():
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            if action.help == argparse.SUPPRESS:
                continue
            assert action.help, f"{name} {action.dest}: no help text"
            if action.option_strings and not action.required and action.default not in (None, []):
                assert "default" in parser._get_formatter()._get_help_string(action), f"{name} {action.dest}"
    sample = parsers["semhitok sample"].format_help()
    assert "--batch-size BATCH_SIZE" in sample and "(default: 8)" in sample and "SamplingConfig.temperature" in sample



def test_help_shows_a_default_only_where_there_is_one_and_once():
    parsers = dict(_parsers(build_parser()))
    for name, parser in parsers.items():  # required flags, None (the help says what None means) and [] show none
        text = " ".join(parser.format_help().split())
        assert "(default: None)" not in text and "(default: [])" not in text, name
    stage = " ".join(parsers["semhitok tokenizer train"].format_help().split())
    stage = stage[stage.index("--stage {1,2} SemHiTok's"):stage.index("--config CONFIG preset")]
    assert stage.count("default") == 1 and "(default: every stage of tokenizer.kind)" in stage
    ablate = parsers["semhitok ablate"]
    assert ablate.description and "table<N>.md" in ablate.format_help() and "(default: False)" in ablate.format_help()


@pytest.mark.parametrize("argv", [
    ["sample", "--model", "{model}", "--prompt", "a red bus", "--out", "{out}"],
    ["eval", "--model", "{model}", "--out", "{out}"],
    ["chat", "--model", "{model}"],
    ["ask", "--model", "{model}", "What color is the circle?"],
    ["pretokenize", "--config", "tiny", "run_dir={out}"],
    ["tokenizer", "encode", "--model", "{model}", "--out", "{out}/ids.npz", "{model}"],
], ids=["sample", "eval", "chat", "ask", "pretokenize", "tokenizer-encode"])
def test_device_cuda_without_cuda_is_one_line_before_anything_is_written(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only torch, on any machine
    model = tmp_path / "model"
    model.mkdir()
    assert main([a.format(model=model, out=tmp_path / "out") for a in argv] + ["--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--device cuda" in err and "pass --device cpu" in err, err
    assert [p.name for p in tmp_path.iterdir()] == ["model"] and not list(model.iterdir())
    assert main(["sample", "--model", str(model), "--prompt", "x", "--out", str(tmp_path / "out"), "--device", "gpu"]) == 2
    assert "--device gpu: not a torch device" in capsys.readouterr().err and not (tmp_path / "out").exists()

def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"semhitok {semhitok.__version__}"


def test_config_prints_the_resolved_preset_plus_overrides(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()  # a folder named like the preset does not hide it
    assert main(["config", "--config", "tiny", "mllm_train.lr=0.25", "run_dir=/x"]) == 0
    header, body = capsys.readouterr().out.split("\n", 1)
    assert header == f"# {semhitok.CONFIG_DIR / 'tiny.yaml'} + mllm_train.lr=0.25 run_dir=/x"
    printed = yaml.safe_load(body)
    assert printed["mllm_train"]["lr"] == 0.25 and printed["run_dir"] == "/x"
    assert printed["tokenizer"]["teacher"] == "random"  # tiny's own values
    (tmp_path / "printed.yaml").write_text(body)  # what it prints loads back as the same config
    assert yaml.safe_load(body) == yaml.safe_load(yaml.safe_dump(
        json.loads(json.dumps(__import__("dataclasses").asdict(load_project_config("printed.yaml"))))))
    assert main(["config", "--list"]) == 0
    listed = capsys.readouterr().out.split(": ", 1)[1].strip().split(", ")
    assert {"256", "384", "tiny"} <= set(listed) and listed == sorted(listed)


def test_bare_names_are_presets_and_paths_need_a_suffix_or_a_slash(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()
    assert resolve_preset("tiny") == semhitok.CONFIG_DIR / "tiny.yaml"
    with pytest.raises(ConfigError, match="config file not found: ./tiny"):
        resolve_preset("./tiny")
    with pytest.raises(ConfigError, match=r"unknown config preset 'tinyy'.*'tiny'"):
        resolve_preset("tinyy")
    (tmp_path / "mine.yaml").write_text("run_dir: here\n")
    assert resolve_preset("mine.yaml").resolve() == tmp_path / "mine.yaml"
    recipes = tmp_path / "configs"
    (recipes / "recipes").mkdir(parents=True)
    (recipes / "recipes" / "sft.yaml").write_text("run_dir: runs/sft\n")
    monkeypatch.setattr(config_io, "CONFIG_DIR", recipes)
    assert resolve_preset("recipes/sft") == recipes / "recipes" / "sft.yaml"  # presets in subfolders
    assert config_io.list_presets() == ["recipes/sft"]


def test_shipped_paths_resolve_from_any_directory_and_the_cwd_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_project_config("tiny")
    assert cfg.tokenizer_train.train_data == [str(REPO / "data/sample/train.jsonl")]
    assert cfg.mllm_train.deepspeed_config == str(REPO / "configs/deepspeed/zero3.json")
    assert [s.path for s in cfg.pretokenize.sources][0] == str(REPO / "data/sample/train.jsonl")
    assert cfg.run_dir == "runs/tiny"  # outputs stay relative to the cwd
    (tmp_path / "data" / "sample").mkdir(parents=True)
    (tmp_path / "data" / "sample" / "train.jsonl").write_text("")
    assert load_project_config("tiny").tokenizer_train.train_data == ["data/sample/train.jsonl"]


def test_run_dirs_record_config_overrides_revision_and_warn_on_a_changed_resume(tmp_path, caplog):
    cfg = load_project_config("tiny", [f"run_dir={tmp_path}"])
    job = tmp_path / "mllm"
    record_run(job, cfg, "mllm-train", "tiny", [f"run_dir={tmp_path}"])
    info = json.loads((job / "run.json").read_text())
    assert info["job"] == "mllm-train" and info["preset"] == "tiny" and info["overrides"] == [f"run_dir={tmp_path}"]
    assert info["revision"] and info["version"] == semhitok.__version__
    assert load_project_config(job / "config.yaml") == cfg  # the record loads back as the same config
    cfg.mllm_train.max_steps += 5
    with caplog.at_level(logging.WARNING, logger="semhitok"):
        record_run(job, cfg, "mllm-train", "tiny", [])
    assert "changed: mllm_train.max_steps" in caplog.text
    starts = [json.loads(line) for line in (job / "runs.jsonl").read_text().splitlines()]
    assert [s["changed"] for s in starts] == [[], ["mllm_train.max_steps"]]
    assert yaml.safe_load((job / "config.previous.yaml").read_text())["mllm_train"]["max_steps"] == cfg.mllm_train.max_steps - 5
    (job / "final").mkdir()
    assert find_run_config(job / "final") == (job / "config.yaml").resolve()
    assert find_run_config(tmp_path / "elsewhere") is None


def test_eval_reads_the_config_recorded_beside_the_model(tmp_path, monkeypatch, capsys, tiny_mllm_dir):
    seen = {}

    def fake_evaluate(model_dir, eval_cfg, out, device=None):  # the scores are tested elsewhere; here: which config
        seen["cfg"] = eval_cfg
        (out / "summary.md").write_text("| bench |\n")

    monkeypatch.setattr("semhitok.eval.summary.evaluate_model", fake_evaluate)
    cfg = load_project_config("tiny", [f"run_dir={tmp_path}", "eval.geneval_limit=3"])
    record_run(tmp_path / "mllm", cfg, "mllm-train", "tiny", ["eval.geneval_limit=3"])
    (tmp_path / "mllm" / "final").mkdir()
    shutil.copy(tiny_mllm_dir / "semhitok_mllm.json", tmp_path / "mllm" / "final")  # the model's kind: semhitok
    assert main(["eval", "--model", str(tmp_path / "mllm" / "final")]) == 0
    assert seen["cfg"].geneval_limit == 3  # not tiny's 8
    assert seen["cfg"].sampling.cfg_scale == 2.0  # SemHiTok's paper's
    assert json.loads((tmp_path / "mllm" / "eval" / "run.json").read_text())["preset"] == str((tmp_path / "mllm" / "config.yaml").resolve())
    assert main(["eval", "--model", str(tmp_path / "mllm" / "final"), "eval.geneval_limit=5"]) == 0
    assert seen["cfg"].geneval_limit == 5  # overrides apply over the recorded config


def test_run_lmms_writes_each_model_to_its_own_folder_where_eval_reads_it(tmp_path):
    import os
    import subprocess

    from semhitok.common.model_card import eval_dir as default_eval_dir
    from semhitok.eval.summary import collect_lmms_results

    # a stand-in for `python -m lmms_eval`: writes a results JSON the way lmms-eval does, naming its model
    fake = tmp_path / "fake_python"
    fake.write_text('#!/usr/bin/env bash\nout=""; args=""\nwhile [ $# -gt 0 ]; do case $1 in --output_path) out=$2;; '
                    '--model_args) args=$2;; esac; shift; done\nmkdir -p "$out/m"\n'
                    'printf \'{"config": {"model_args": "%s"}, "results": {"mme": {"score,none": 1.5}}}\' "$args" '
                    '> "$out/m/20260101_results.json"\n')
    fake.chmod(0o755)
    models = [tmp_path / "a" / "mllm" / "final", tmp_path / "b" / "mllm" / "final", tmp_path / "zoo" / "c"]
    for model in models:
        model.mkdir(parents=True)
        (model / "semhitok_mllm.json").write_text("{}")
        subprocess.run(["bash", str(REPO / "eval" / "run_lmms.sh"), str(model), "mme"], cwd=tmp_path, check=True,
                       env=dict(os.environ, PYTHON=str(fake)), capture_output=True)
    assert default_eval_dir(models[0]) == tmp_path / "a" / "mllm" / "eval"
    assert default_eval_dir(models[2]) == tmp_path / "zoo" / "c-eval"
    for model in models:
        found = list((default_eval_dir(model) / "lmms_eval").rglob("*results*.json"))
        assert len(found) == 1 and str(model) in found[0].read_text()
        assert collect_lmms_results(default_eval_dir(model) / "lmms_eval", model) == {"mme": {"score": 1.5}}
    # results of another model in the same folder are not counted as this one's
    stray = default_eval_dir(models[0]) / "lmms_eval" / "m" / "20270101_results.json"
    stray.write_text(json.dumps({"config": {"model_args": f"pretrained={models[1]}"}, "results": {"gqa": {"acc,none": 0.5}}}))
    assert collect_lmms_results(default_eval_dir(models[0]) / "lmms_eval", models[0]) == {"mme": {"score": 1.5}}


def test_wandb_runs_are_named_and_resume_the_stored_id(tmp_path, monkeypatch):
    from semhitok.common.metrics_log import MetricLogger, wandb_identity

    monkeypatch.delenv("WANDB_NAME", raising=False)
    ids = iter(["first", "second"])
    run_dir = tmp_path / "runs" / "256" / "mllm"
    run_dir.mkdir(parents=True)
    assert wandb_identity(run_dir, lambda: next(ids)) == {"name": "runs/256/mllm", "id": "first"}
    assert wandb_identity(run_dir, lambda: next(ids))["id"] == "first"  # a requeued job: the same run
    assert (run_dir / "wandb_run_id").read_text().strip() == "first"
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the real wandb.init with these arguments, without a server
    logger = MetricLogger(run_dir, ["jsonl", "wandb"], {"a": 1})
    logger.log(1, {"loss": 0.5})
    logger.close()
    assert json.loads((run_dir / "metrics.jsonl").read_text()) == {"step": 1, "loss": 0.5}


def test_pipeline_stages_are_those_the_config_runs():
    from semhitok.pipeline import pipeline_stages

    core = ["tokenizer", "tokenizer eval", "pretokenize", "mllm"]
    assert pipeline_stages(load_project_config("shapes")) == ["world", "teacher", *core, "samples", "eval"]
    assert pipeline_stages(load_project_config("tiny")) == [*core, "samples", "eval"]
    assert pipeline_stages(load_project_config("tiny", ["eval.gfid_captions="])) == [*core, "eval"]


def test_pipeline_log_counts_stages_prints_the_pretokenize_summary_once_and_lists_the_outputs(tmp_path, monkeypatch,
                                                                                              capsys, caplog):
    """Every stage's work stubbed (each is tested elsewhere): what is left is the pipeline's own log and output."""
    import semhitok.pipeline

    def train_mllm(cfg):
        (cfg.mllm_dir / "final").mkdir(parents=True)
        (cfg.mllm_dir / "loss_curves.png").write_bytes(b"png")  # and no gaps.png: not listed

    def evaluate_model(model_dir, eval_cfg, out, device=None):
        Path(out, "summary.md").write_text("| metric | value |\n")

    def sample_images(decoder, visual, prompts, out, *rest, **kwargs):
        Path(out, "grid.png").write_bytes(b"png")

    for name, fake in [
        ("kind_trainer", lambda kind: (lambda cfg: None,)),
        ("load_tokenizer", lambda path: None),
        ("reconstruct_to_dir", lambda *a: None),
        ("evaluate_reconstruction", lambda *a, **kw: {"psnr": 20.0}),
        ("run_pretokenize", lambda *a: {"units_done_now": 7}),
        ("train_mllm", train_mllm),
        ("load_sampler", lambda model_dir: (None, None)),
        ("sample_images", sample_images),
        ("evaluate_model", evaluate_model),
    ]:
        monkeypatch.setattr(semhitok.pipeline, name, fake)  # (raising=True: each is a name the pipeline calls)
    assert main(["pipeline", "--config", "tiny", f"run_dir={tmp_path}"]) in (0, None)
    headers = [m for m in caplog.messages if m.startswith("== stage")]
    assert [h.split(":")[0] for h in headers] == [f"== stage {i}/6" for i in range(1, 7)]
    assert "pretokenize ['coco_captions'" in headers[2] and headers[5].startswith("== stage 6/6: evaluation")
    out = capsys.readouterr().out
    assert "units_done_now" not in out  # run_pretokenize logs its summary; the pipeline does not print it again
    listed = out[out.index(f"outputs of {tmp_path}:"):].splitlines()[1:-1]
    assert [line.split(":")[0].strip() for line in listed] == ["tokenizer metrics", "model", "loss curves", "samples",
                                                                "eval summary"]
    assert listed[-1].endswith(str(tmp_path / "mllm" / "eval" / "summary.md"))  # the model's one eval folder
