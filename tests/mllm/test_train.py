"""The trainer end to end: DeepSpeed ZeRO-3 on CPU (gloo), 1 and 2 processes, on the shipped sample."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from semhitok.mllm.model import SemHiTokLM
from tests.conftest import REPO

ENV = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
ENV.pop("RANK", None)


def train(run_dir, trained_tokenizer, pretokenized_sample, *overrides, nproc=1, check=True):
    args = ["--config", "tiny", f"run_dir={run_dir}", f"mllm_train.tokenizer={trained_tokenizer}",
            f"data.pretokenized={pretokenized_sample}", "mllm_train.log_every=1", *overrides]
    if nproc == 1:
        cmd = [sys.executable, "-m", "semhitok.cli", "train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", "29533",
               "-m", "semhitok.cli", "train", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def losses(run_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in open(run_dir / "mllm" / "metrics.jsonl")]
    return {r["step"]: r["loss"] for r in rows}


@pytest.mark.slow
def test_loss_falls_and_resume_gives_the_same_next_losses(trained_tokenizer, pretokenized_sample, tmp_path, capsys):
    full = tmp_path / "full"
    train(full, trained_tokenizer, pretokenized_sample, "mllm_train.max_steps=40", "mllm_train.ckpt_every=20")
    seen = losses(full)
    first, last = sum(seen[s] for s in range(1, 6)) / 5, sum(seen[s] for s in range(36, 41)) / 5
    with capsys.disabled():
        print(f"\ntiny MLLM on the shipped sequences: mean loss steps 1-5 {first:.3f} -> steps 36-40 {last:.3f}")
    assert last < first - 1.0
    log = [json.loads(line) for line in open(full / "mllm" / "metrics.jsonl")]
    assert {"loss_understanding", "loss_generation", "loss_text", "tokens_per_s", "grad_norm"} <= set(log[-1])

    # A job killed after the step-20 checkpoint and started again continues exactly.
    resumed = tmp_path / "resumed"
    (resumed / "mllm" / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "mllm" / "checkpoints" / "step00000020", resumed / "mllm" / "checkpoints" / "step00000020")
    (resumed / "mllm" / "checkpoints" / "latest").write_text("step00000020")
    shutil.copytree(full / "mllm" / "text_tokenizer", resumed / "mllm" / "text_tokenizer")
    train(resumed, trained_tokenizer, pretokenized_sample, "mllm_train.max_steps=40", "mllm_train.ckpt_every=20")
    again = losses(resumed)
    assert sorted(again) == list(range(21, 41))
    for step in range(21, 41):
        assert again[step] == pytest.approx(seen[step], rel=1e-5, abs=1e-6), step
    model = SemHiTokLM.from_pretrained(full / "mllm" / "final")
    assert model.layout.visual_vocab_size == 256 * 12


@pytest.mark.slow
def test_two_process_zero3_run(trained_tokenizer, pretokenized_sample, tmp_path):
    train(tmp_path, trained_tokenizer, pretokenized_sample, "mllm_train.max_steps=4", "mllm_train.ckpt_every=2", nproc=2)
    ckpt = tmp_path / "mllm" / "checkpoints" / "step00000004"
    assert {f"loader_rank{r}.json" for r in (0, 1)} <= {p.name for p in ckpt.iterdir()}
    assert len(list(ckpt.glob("zero_pp_rank_*_model_states.pt"))) == 2  # partitioned across both ranks
    states = [json.loads((ckpt / f"loader_rank{r}.json").read_text()) for r in (0, 1)]
    assert states[0]["next_draw"] > 0 and states[0]["cursors"] != [0, 0, 0, 0]
    assert len(losses(tmp_path)) == 4
    SemHiTokLM.from_pretrained(tmp_path / "mllm" / "final")


def test_non_finite_loss_is_reported_with_step_and_batch(trained_tokenizer, pretokenized_sample, tmp_path):
    proc = train(tmp_path, trained_tokenizer, pretokenized_sample, "mllm_train.max_steps=3", "mllm_train.lr=1e30",
                 "mllm_train.adapter_lr=1e30", "mllm_train.warmup_steps=1", "mllm_train.grad_clip=0", check=False)
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("semhitok: error: non-finite loss at step 2") and "data/sample" in line
