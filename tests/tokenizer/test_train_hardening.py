"""A damaged newest tokenizer checkpoint is skipped: the run resumes from the newest intact one."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from semhitok.common.io import MANIFEST
from semhitok.common import dist as D
from semhitok.tokenizer.semhitok.train import build_task, train_tokenizer
from semhitok.tokenizer.trainer import Trainer
from tests.conftest import tiny_config

COMMON = ["tokenizer_train.max_steps=6", "tokenizer_train.batch_size=4", "tokenizer_train.ckpt_every=2",
          "tokenizer_train.keep_checkpoints=4"]


def stage_dir(run_dir):
    return run_dir / "tokenizer" / "stage1"


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """6 steps of stage 1 with checkpoints at 2 and 4; its run_dir."""
    run_dir = tmp_path_factory.mktemp("straight")
    cfg = tiny_config(run_dir, *COMMON)
    train_tokenizer(cfg.tokenizer, cfg.tokenizer_train, stage_dir(run_dir))
    return run_dir


def rows(run_dir):
    return [json.loads(line) for line in open(stage_dir(run_dir) / "metrics.jsonl")]


def copy_run(straight, dest):
    shutil.copytree(stage_dir(straight) / "checkpoints", stage_dir(dest) / "checkpoints")
    shutil.copy(stage_dir(straight) / "metrics.jsonl", stage_dir(dest) / "metrics.jsonl")  # as if killed after step 6's log
    return stage_dir(dest) / "checkpoints"


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def garbage(path):
    path.write_bytes(os.urandom(os.path.getsize(path)))  # same size: only the checksum tells


DAMAGE = {
    "truncated weights": lambda d: truncate(d / "model.safetensors"),
    "garbage optimizer and RNG state": lambda d: garbage(d / "train_state.pt"),
    "no completion marker (killed while saving)": lambda d: (d / MANIFEST).unlink(),
    "garbage completion marker": lambda d: (d / MANIFEST).write_text("{not json"),
    "empty directory": lambda d: [p.unlink() for p in d.iterdir()],
}


def resume_only(run_dir):
    cfg = tiny_config(run_dir, *COMMON)
    task = build_task(1, cfg.tokenizer, cfg.tokenizer_train, None, torch.device("cpu"), world=1)
    trainer = Trainer(task, cfg.tokenizer_train, stage_dir(run_dir), D.DistInfo(0, 1, 0))
    return trainer.maybe_resume(), task


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(straight, tmp_path, caplog, damage):
    ckpts = copy_run(straight, tmp_path)
    DAMAGE[damage](ckpts / "step_00000004")
    step, task = resume_only(tmp_path)
    assert step == 2
    assert "skipped damaged checkpoint" in caplog.text and "step_00000004" in caplog.text
    saved = load_file(str(ckpts / "step_00000002" / "model.safetensors"))
    state = task.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())


def test_no_intact_checkpoint_starts_fresh_with_a_warning(straight, tmp_path, caplog):
    ckpts = copy_run(straight, tmp_path)
    for d in ckpts.iterdir():
        (d / MANIFEST).unlink()
    step, _ = resume_only(tmp_path)
    assert step == 0 and "no intact checkpoint" in caplog.text and "starting from step 0" in caplog.text


def test_resume_past_a_damaged_checkpoint_reproduces_the_run_and_its_metrics(straight, tmp_path):
    ckpts = copy_run(straight, tmp_path)
    truncate(ckpts / "step_00000004" / "model.safetensors")
    cfg = tiny_config(tmp_path, *COMMON)
    train_tokenizer(cfg.tokenizer, cfg.tokenizer_train, stage_dir(tmp_path))
    want, got = rows(straight), rows(tmp_path)
    # rows past step 2 (logged before the "kill") were dropped, then logged again by the resumed run: one set per step
    assert [r["step"] for r in got] == [r["step"] for r in want]
    assert [r.get("loss") for r in got] == [r.get("loss") for r in want]


def test_a_checkpoint_of_another_tokenizer_config_is_refused_not_skipped_as_damage(straight, tmp_path):
    """Loading it fails (other shapes); treated as damage the run would start from step 0 and delete it."""
    ckpts = copy_run(straight, tmp_path)
    before = sorted(p.name for p in ckpts.iterdir())
    cfg = tiny_config(tmp_path, *COMMON, "tokenizer.sem_code_dim=8")
    task = build_task(1, cfg.tokenizer, cfg.tokenizer_train, None, torch.device("cpu"), world=1)
    trainer = Trainer(task, cfg.tokenizer_train, stage_dir(tmp_path), D.DistInfo(0, 1, 0))
    with pytest.raises(ValueError, match=r"step_00000004 was written by another configuration \(tokenizer.sem_code_dim 16 -> 8\)"):
        trainer.fit()
    assert sorted(p.name for p in ckpts.iterdir()) == before


def test_the_cli_refuses_such_a_resume_before_it_records_anything(straight, tmp_path, capsys):
    from semhitok.cli import main
    from semhitok.common.run_dir import record_run

    copy_run(straight, tmp_path)
    cfg = tiny_config(tmp_path, *COMMON)
    record_run(stage_dir(tmp_path), cfg, "tokenizer-stage1")
    records = {n: (stage_dir(tmp_path) / n).read_bytes() for n in ("config.yaml", "run.json", "runs.jsonl")}
    capsys.readouterr()
    args = [f"run_dir={tmp_path}", *COMMON, "tokenizer.sem_codebook_size=64"]
    assert main(["tokenizer", "train", "--config", "tiny", "--stage", "1", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "written by another configuration (tokenizer.sem_codebook_size" in err, err
    assert main(["tokenizer", "train", "--config", "tiny", *args]) == 2  # every stage: the same check
    assert {n: (stage_dir(tmp_path) / n).read_bytes() for n in records} == records
