"""The trainer end to end: DeepSpeed ZeRO-3 on CPU (gloo), 1 and 2 processes, on the shipped sample."""

import json

import pytest
import torch

from semhitok.mllm.model import SemHiTokLM
from tests.conftest import run_train


def losses(run_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in open(run_dir / "mllm" / "metrics.jsonl")]
    return {r["step"]: r["loss"] for r in rows}


@pytest.mark.slow
def test_loss_falls_on_the_shipped_sequences(trained_mllm_run, capsys):
    seen = losses(trained_mllm_run)
    first, last = sum(seen[s] for s in range(1, 6)) / 5, sum(seen[s] for s in range(36, 41)) / 5
    with capsys.disabled():
        print(f"\ntiny MLLM on the shipped sequences: mean loss steps 1-5 {first:.3f} -> steps 36-40 {last:.3f}")
    assert last < first - 1.0
    log = [json.loads(line) for line in open(trained_mllm_run / "mllm" / "metrics.jsonl")]
    assert {"loss_understanding", "loss_generation", "loss_text", "tokens_per_s", "grad_norm"} <= set(log[-1])
    model = SemHiTokLM.from_pretrained(trained_mllm_run / "mllm" / "final")
    assert model.layout.visual_vocab_size == 256 * 12


@pytest.mark.slow
def test_two_process_zero3_run(trained_tokenizer, pretokenized_sample, tmp_path):
    run_train(tmp_path, trained_tokenizer, pretokenized_sample, "mllm_train.max_steps=4", "mllm_train.ckpt_every=2", nproc=2)
    ckpt = tmp_path / "mllm" / "checkpoints" / "step00000004"
    assert {f"loader_rank{r}.json" for r in (0, 1)} <= {p.name for p in ckpt.iterdir()}
    assert len(list(ckpt.glob("zero_pp_rank_*_model_states.pt"))) == 2  # partitioned across both ranks
    states = [json.loads((ckpt / f"loader_rank{r}.json").read_text()) for r in (0, 1)]
    assert [s["rank"] for s in states] == [0, 1] and min(s["next_draw"] for s in states) > 0
    assert len(losses(tmp_path)) == 4
    SemHiTokLM.from_pretrained(tmp_path / "mllm" / "final")


def test_non_finite_loss_is_reported_with_step_and_batch(trained_tokenizer, pretokenized_sample, tmp_path):
    proc = run_train(tmp_path, trained_tokenizer, pretokenized_sample, "mllm_train.max_steps=3", "mllm_train.lr=1e30",
                     "mllm_train.adapter_lr=1e30", "mllm_train.warmup_steps=1", "mllm_train.grad_clip=0", check=False)
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("semhitok: error: non-finite loss at step 2") and "data/sample" in line


@pytest.mark.slow
def test_adapter_stage_then_full_fine_tuning_from_its_export(trained_tokenizer, pretokenized_sample, tmp_path):
    run_train(tmp_path / "align", trained_tokenizer, pretokenized_sample, "mllm_train.max_steps=2", "mllm_train.trainable=adapter")
    aligned = SemHiTokLM.from_pretrained(tmp_path / "align" / "mllm" / "final")
    run_train(tmp_path / "sft", trained_tokenizer, pretokenized_sample, "mllm_train.max_steps=2",
              f"mllm_train.init_from={tmp_path / 'align' / 'mllm' / 'final'}")
    tuned = SemHiTokLM.from_pretrained(tmp_path / "sft" / "mllm" / "final")
    T = aligned.layout.text_vocab_size
    layer = "lm.model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(aligned.state_dict()[layer], tuned.state_dict()[layer])  # full stage trains the LLM
    assert not torch.equal(aligned.lm.lm_head.weight[:T], tuned.lm.lm_head.weight[:T])  # text rows too
