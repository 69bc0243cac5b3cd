"""Conditioning gaps (mllm/gaps.py), the shipped eval data and visible skips in `semhitok eval`."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from semhitok.cli import main
from semhitok.data_pipelines.sequences import IGNORE, SequenceBuilder
from semhitok.eval.config import EvalConfig
from semhitok.eval.generation import read_metadata
from semhitok.eval.pope import load_pope
from semhitok.eval.summary import BenchmarkUnavailable, markdown_table, runnable
from semhitok.mllm.gaps import conditioning_gaps, derangement, documents, interval, load_pairs, plot_training, score
from semhitok.tokenizer import SemHiTok
from tests.conftest import REPO, SAMPLE


@pytest.fixture(scope="module")
def pairs(trained_tokenizer):
    return load_pairs(SAMPLE / "holdout.jsonl", SemHiTok.from_pretrained(trained_tokenizer), limit=5)


@pytest.fixture(scope="module")
def builder(tiny_mllm, text_tokenizer):
    return SequenceBuilder(text_tokenizer, tiny_mllm.layout, tiny_mllm.sequence_config)


def test_gap_documents_are_the_training_documents_with_the_condition_swapped(pairs, builder):
    n, grid = len(pairs.captions), pairs.ids.shape[1]
    assert n == 5 and sorted(derangement(n)) == list(range(n)) and all(j != i for i, j in enumerate(derangement(n)))
    for i, (prompt, target, _) in enumerate(documents(builder, pairs, "understanding", "true")):
        doc = builder.understanding({"text": pairs.captions[i]}, pairs.ids[i].flatten().numpy())
        assert prompt + target == doc.tokens[: len(prompt) + len(target)].tolist()
        assert target == [t for t in doc.labels.tolist() if t != IGNORE]  # exactly what training supervises
    shuffled = documents(builder, pairs, "understanding", "shuffled")
    assert shuffled[0][0] == documents(builder, pairs, "understanding", "true")[1][0]  # pair 0 gets pair 1's image
    assert all(t < builder.layout.visual_offset for p, _, _ in documents(builder, pairs, "understanding", "no_image") for t in p)
    for i, (prompt, target, _) in enumerate(documents(builder, pairs, "generation", "true")):
        doc = builder.generation({"text": pairs.captions[i]}, pairs.ids[i].flatten().numpy(), uncond=False)
        assert prompt + target == doc.tokens[: len(prompt) + grid * grid].tolist() and len(target) == grid * grid
    uncond = documents(builder, pairs, "generation", "uncond")[0][0]
    assert uncond == builder.generation_prompt(builder.cfg.uncond_prompt)


def test_scored_loss_is_the_training_loss_and_independent_of_batching(tiny_mllm, pairs, builder):
    docs = documents(builder, pairs, "generation", "shuffled") + documents(builder, pairs, "understanding", "true")
    loss1, acc1 = score(tiny_mllm, docs, batch_size=1)
    loss8, acc8 = score(tiny_mllm, docs, batch_size=8)  # right-padded rows of different lengths
    np.testing.assert_allclose(loss8, loss1, rtol=1e-4)
    np.testing.assert_array_equal(acc8, acc1)
    prompt, target, _ = docs[0]
    tokens = torch.tensor([prompt + target])
    labels = torch.tensor([[IGNORE] * len(prompt) + target])
    with torch.no_grad():
        trained = tiny_mllm(tokens, torch.arange(tokens.shape[1])[None], labels)["loss"]
    assert loss1[0] == pytest.approx(trained.item(), rel=1e-5)
    assert ((0 <= acc1) & (acc1 <= 1)).all()


def test_gaps_report_means_with_intervals(tiny_mllm, pairs, builder):
    gaps = conditioning_gaps(tiny_mllm, builder, pairs, batch_size=4)
    assert gaps["pairs"] == 5
    for task, conditions in (("understanding", ("shuffled", "no_image")), ("generation", ("shuffled", "uncond"))):
        for c in conditions:
            lo, hi = gaps[task][f"gap_{c}_ci95"]
            assert gaps[task][f"gap_{c}"] == pytest.approx(gaps[task][f"loss_{c}"] - gaps[task]["loss_true"])
            assert lo <= gaps[task][f"gap_{c}"] <= hi
    assert not tiny_mllm.training  # the model's mode is restored
    table = markdown_table({"model": "m", "gaps": gaps})
    assert f"| gaps | generation.gap_uncond | {gaps['generation']['gap_uncond']:.4f} [" in table


def test_interval_is_mean_plus_minus_1_96_standard_errors():
    mean, lo, hi = interval(np.array([1.0, 2.0, 3.0, 4.0]))
    assert mean == 2.5 and hi - mean == pytest.approx(1.96 * np.std([1, 2, 3, 4], ddof=1) / 2)


def test_eval_defaults_are_shipped_in_the_repository_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = EvalConfig()
    for path in (cfg.pope_questions, cfg.pope_image_root, cfg.geneval_metadata, cfg.gaps_data, cfg.gfid_captions):
        assert path.startswith(str(REPO / "data")) and "shared" not in path
    rows = load_pope(cfg.pope_questions, cfg.pope_image_root)
    assert len(rows) == 18 and {r["category"] for r in rows} == {"random", "popular", "adversarial"}
    assert len(read_metadata(cfg.geneval_metadata)) == 553
    assert runnable(cfg, {}) == {"pope", "geneval", "gaps", "gfid"}


def test_a_requested_benchmark_without_data_fails_unless_skipping_is_allowed(tmp_path, caplog, capsys):
    cfg = EvalConfig(pope_questions=str(tmp_path / "missing.jsonl"), geneval_metadata="")
    with pytest.raises(BenchmarkUnavailable, match="eval.pope_questions=.*missing.jsonl not found"):
        runnable(cfg, {})
    cfg.allow_skip = True
    summary = {}
    assert runnable(cfg, summary) == {"gaps", "gfid"}  # geneval turned off by the empty path, pope skipped
    assert "not found" in summary["pope"]["skipped"] and "geneval" not in summary
    assert "skipped pope" in caplog.text
    # the command fails before loading anything, naming the field
    assert main(["eval", "--model", str(tmp_path), f"eval.pope_questions={tmp_path / 'missing.jsonl'}"]) == 2
    assert "eval.pope_questions" in capsys.readouterr().err


def test_training_plots_are_drawn_from_metrics_jsonl(tmp_path):
    rows = [{"step": s, "loss": 5 - s / 10, "loss_generation": 6 - s / 20} for s in range(0, 40, 10)]
    rows += [{"step": s, "understanding_gap_shuffled": s / 40, "understanding_gap_shuffled_lo": s / 40 - 0.1,
              "understanding_gap_shuffled_hi": s / 40 + 0.1, "generation_gap_uncond": s / 80} for s in (0, 20, 40)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    drawn = plot_training(tmp_path / "metrics.jsonl", tmp_path)
    assert [p.name for p in drawn] == ["loss_curves.png", "gaps.png"]
    for p in drawn:
        pixels = np.asarray(Image.open(p).convert("RGB"))
        coloured = (pixels.max(-1).astype(int) - pixels.min(-1)) > 60  # the series' lines, not black/grey/white
        assert coloured.sum() > 200, p


def test_training_logs_the_gaps_at_its_eval_interval_and_plots_them(trained_mllm_run):
    """The tiny preset (eval_every 25) trained 40 steps under DeepSpeed: gaps at steps 25 and the last."""
    out = trained_mllm_run / "mllm"
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    gap_rows = [r for r in rows if "generation_gap_uncond" in r]
    assert [r["step"] for r in gap_rows] == [25, 40] and all("loss" in r for r in gap_rows)  # in the training rows
    for r in gap_rows:
        assert r["understanding_gap_shuffled_lo"] <= r["understanding_gap_shuffled"] <= r["understanding_gap_shuffled_hi"]
        assert 0 <= r["generation_acc_true"] <= 1
    assert (out / "loss_curves.png").is_file() and (out / "gaps.png").is_file()
