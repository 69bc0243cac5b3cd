"""lmms-eval plugin, GenEval layout, gFID plumbing and the `semhitok eval` summary on a trained tiny model."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from semhitok.cli import main
from semhitok.eval.generation import (GenEvalUnavailable, generate_geneval, generation_fid, read_metadata,
                                      score_geneval, summarize_geneval)
from semhitok.eval.pope import load_pope, run_pope
from semhitok.mllm.config import SamplingConfig
from semhitok.mllm.sample import load_sampler
from tests.conftest import REPO, SAMPLE

POPE = REPO / "data" / "eval" / "pope.jsonl"  # shipped: the POPE questions about a shipped photo
GENEVAL = REPO / "data" / "eval" / "geneval_evaluation_metadata.jsonl"


@pytest.fixture(scope="module")
def model_dir(trained_mllm_run):
    return trained_mllm_run / "mllm" / "final"


@pytest.fixture(scope="module")
def sampler(model_dir):
    return load_sampler(model_dir, "cpu")


@pytest.mark.slow
def test_run_lmms_sh_scores_local_pope_like_our_own_loop(model_dir, sampler, tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled")
    proc = subprocess.run(["bash", "eval/run_lmms.sh", str(model_dir), "semhitok_pope_local", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results_file = proc.stdout.strip().splitlines()[-1].removeprefix("results: ")
    scores = json.loads(open(results_file).read())["results"]["semhitok_pope_local"]
    ours = run_pope(*sampler, load_pope(POPE, SAMPLE))
    for metric in ("accuracy", "precision", "recall", "f1", "yes_ratio", "unparsed"):
        expected = math.nan if ours[metric] is None else ours[metric]  # yes_ratio when no answer says yes or no
        assert scores[f"pope_{metric},none"] == pytest.approx(expected, nan_ok=True), metric
    samples = [json.loads(line) for f in tmp_path.rglob("*semhitok_pope_local*.jsonl") for line in open(f)]
    answers = {s["doc_id"]: s["filtered_resps"] if isinstance(s["filtered_resps"], str) else s["filtered_resps"][0] for s in samples}
    assert answers == {i: a["answer"] for i, a in enumerate(ours["answers"])}  # the same replies, question by question


def test_run_lmms_sh_refuses_a_non_model_directory(tmp_path):
    proc = subprocess.run(["bash", "eval/run_lmms.sh", str(tmp_path), "pope"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "not a SemHiTok model directory" in proc.stderr


def test_lmms_eval_finds_the_plugin_by_entry_point():
    from lmms_eval.models import get_model

    assert get_model("semhitok").__name__ == "SemHiTokLMMS"


def test_lmms_model_args_turn_compiled_decoding_on(model_dir):
    from semhitok.eval.lmms_model import SemHiTokLMMS

    assert SemHiTokLMMS(str(model_dir), "cpu", compile="true").decoder.compile  # lmms-eval passes strings
    assert not SemHiTokLMMS(str(model_dir), "cpu").decoder.compile


def test_geneval_folders_follow_the_scorer_layout_and_resume(sampler, tmp_path):
    metadata = read_metadata(GENEVAL)[:3]
    sampling = SamplingConfig(cfg_scale=3.0, seed=1)
    assert generate_geneval(*sampler, metadata, tmp_path, sampling, samples_per_prompt=2) == 3
    for i, meta in enumerate(metadata):
        folder = tmp_path / f"{i:05d}"
        assert json.loads((folder / "metadata.jsonl").read_text()) == meta
        assert sorted(p.name for p in (folder / "samples").iterdir()) == ["0000.png", "0001.png"]
        assert (folder / "grid.png").is_file()
    (tmp_path / "00001" / "samples" / "0001.png").unlink()  # an interrupted folder is redone, the rest kept
    assert generate_geneval(*sampler, metadata, tmp_path, sampling, samples_per_prompt=2) == 1


def test_geneval_draws_a_prompts_samples_batch_size_at_a_time_with_the_same_images(tiny_mllm_dir, tmp_path):
    """eval.geneval_samples images of a prompt were one batch (10^9 of them: no end); now eval.batch_size at a time,
    sample j keyed by j as before, so the pictures do not depend on the batch size"""
    decoder, visual = load_sampler(tiny_mllm_dir, "cpu")
    metadata, sampling = read_metadata(GENEVAL)[:1], SamplingConfig(cfg_scale=2.0, seed=3)
    asked, image_ids = [], decoder.image_ids
    decoder.image_ids = lambda captions, *args, **kw: asked.append(len(captions)) or image_ids(captions, *args, **kw)
    generate_geneval(decoder, visual, metadata, tmp_path / "b2", sampling, samples_per_prompt=5, batch_size=2)
    assert asked == [2, 2, 1]
    generate_geneval(decoder, visual, metadata, tmp_path / "b16", sampling, samples_per_prompt=5, batch_size=16)
    assert asked[3:] == [5]
    pictures = {b: [np.asarray(Image.open(tmp_path / b / "00000" / "samples" / f"{j:04d}.png")) for j in range(5)] for b in ("b2", "b16")}
    assert all((x == y).all() for x, y in zip(pictures["b2"], pictures["b16"], strict=True))
    assert len({x.tobytes() for x in pictures["b2"]}) > 1  # distinct samples, not one picture five times


def test_geneval_scorer_explains_its_setup_and_summarizes(tmp_path, monkeypatch):
    monkeypatch.delenv("GENEVAL_DIR", raising=False)
    with pytest.raises(GenEvalUnavailable, match="git clone https://github.com/djghosh13/geneval"):
        score_geneval(tmp_path, tmp_path)
    results = tmp_path / "results.jsonl"
    rows = [("single_object", True), ("single_object", True), ("two_object", False), ("two_object", True), ("counting", False)]
    results.write_text("".join(json.dumps({"tag": t, "correct": c}) + "\n" for t, c in rows))
    summary = summarize_geneval(results)
    assert summary["single_object"] == 1.0 and summary["two_object"] == 0.5 and summary["counting"] == 0.0
    assert summary["overall"] == pytest.approx(0.5)  # the mean over tags, as GenEval reports it


def test_gfid_compares_generated_and_real_images_through_the_fid_code(sampler, tmp_path):
    captions = [json.loads(line)["caption"] for line in open(SAMPLE / "holdout.jsonl")][:6]

    def colour_features(images: torch.Tensor) -> np.ndarray:  # any deterministic embedding exercises the plumbing
        return torch.cat([images.mean((2, 3)), images.std((2, 3))], 1).cpu().numpy()

    result = generation_fid(*sampler, captions, [SAMPLE / "holdout.jsonl"], tmp_path, SamplingConfig(seed=0), 4, colour_features)
    assert result["images"] == 6 and len(list(tmp_path.glob("*.png"))) == 6
    assert result["gfid"] > 0
    same = generation_fid(*sampler, captions, [SAMPLE / "holdout.jsonl"], tmp_path / "again", SamplingConfig(seed=0), 4, colour_features)
    assert same["gfid"] == pytest.approx(result["gfid"])  # seeded generation, same distance
    unavailable = generation_fid(*sampler, captions[:2], [SAMPLE / "holdout.jsonl"], tmp_path / "x", SamplingConfig(), 4)
    assert unavailable["gfid"] is None and "pytorch-fid" in unavailable["gfid_error"]


@pytest.mark.slow
def test_semhitok_eval_writes_one_summary_table(model_dir, tmp_path, capsys):
    earlier = tmp_path / "lmms_eval" / "model" / "20260101_results.json"  # what run_lmms.sh left there
    earlier.parent.mkdir(parents=True)
    earlier.write_text(json.dumps({"results": {"mme": {"alias": "mme", "mme_cognition_score,none": 212.5,
                                                        "mme_cognition_score_stderr,none": "N/A"}}}))
    assert main(["eval", "--model", str(model_dir), "--out", str(tmp_path), "--config", "tiny", "eval.geneval_limit=2",
                 "eval.geneval_samples=1"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["pope"]["questions"] == 18 and 0 <= summary["pope"]["f1"] <= 1  # the shipped questions
    assert summary["gaps"]["pairs"] == 12 and set(summary["gaps"]["generation"]) >= {"gap_shuffled", "gap_uncond", "gap_uncond_ci95"}
    assert summary["geneval"]["prompts"] == 2 and "not_scored" in summary["geneval"]
    assert summary["tokenizer"]["images"] == 12 and summary["tokenizer"]["psnr"] > 5
    table = (tmp_path / "summary.md").read_text()
    assert "| pope | f1 |" in table and "| tokenizer | psnr |" in table and "| gaps | understanding.gap_shuffled |" in table
    assert summary["lmms_eval"] == {"mme": {"mme_cognition_score": 212.5}} and "| lmms_eval | mme.mme_cognition_score | 212.5000 |" in table
