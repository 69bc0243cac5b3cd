"""`semhitok pipeline` (what `make demo` runs) end to end on the shipped sample, with short schedules."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_pipeline_runs_every_stage_and_skips_finished_ones_when_rerun(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    cmd = [sys.executable, "-m", "semhitok.cli", "pipeline", "--config", "tiny", f"run_dir={tmp_path}",
           "tokenizer_train.max_steps=10", "tokenizer_train.eval_every=1000", "tokenizer_train.image_every=1000",
           "mllm_train.max_steps=3", "eval.geneval_limit=1", "eval.geneval_samples=1"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for produced in ("tokenizer_eval.json", "reconstructions/grid.png", "pretokenized/manifest.json",
                     "mllm/final/semhitok_mllm.json", "samples/grid.png", "mllm/eval/summary.md"):
        assert (tmp_path / produced).is_file(), produced
    assert json.loads((tmp_path / "mllm" / "eval" / "summary.json").read_text())["tokenizer"]["images"] == 12
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0
    assert "stage 1 already finished" in again.stderr and "mllm already trained" in again.stderr
