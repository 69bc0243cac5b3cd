"""`semhitok compare` on the tiny preset at a very small budget: the table's numbers against independent
recomputation, resuming without rerunning a finished kind, and a failing kind shown in its row. The compared run
(fixture `compared`, tests/conftest.py) is the suite's end-to-end pipeline run, which tests/test_pipeline.py checks."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from semhitok.common.model_card import eval_dir
from semhitok.config import load_project_config
from semhitok.eval.compare import ROW_FILE, STAGE_STEPS, group_usage, kind_overrides, mllm_scores, render, world_scores
from tests.conftest import SAMPLE, compare


def holdout_images(size: int) -> torch.Tensor:
    """The held-out photos as the tokenizer sees them: centre-cropped, resized, in [-1, 1] ([n, 3, size, size])."""
    from semhitok.tokenizer import iter_image_batches, list_images

    return torch.cat([x for _, x in iter_image_batches(list_images([SAMPLE / "holdout.jsonl"]), size, 64)])


def test_table_matches_independent_recomputation(compared):
    from semhitok.tokenizer.semhitok.model import SemHiTok
    from semhitok.tokenizer.siglip import load_teacher

    report = json.loads((compared / "compare.json").read_text())
    row = report["kinds"]["semhitok"]
    assert row["errors"] == [] and (compared / "semhitok" / ROW_FILE).is_file()
    cfg = load_project_config("tiny", [f"run_dir={compared / 'semhitok'}"])
    tok = SemHiTok.from_pretrained(cfg.tokenizer_dir)
    images = holdout_images(tok.image_size)
    with torch.no_grad():
        ids = tok.encode(images)
        recon = tok.decode(ids)
    # PSNR per image on the [0, 1] scale, averaged over the images
    mse = (((recon.numpy() - images.numpy()) / 2) ** 2).reshape(len(images), -1).mean(1)
    assert row["psnr"] == pytest.approx(float(np.mean(10 * np.log10(1 / mse))), abs=1e-3)
    assert row["held_out_images"] == len(images) == 12
    # usage: distinct ids over the vocabulary; ids per image: 8 x 8 positions of one code
    assert row["codebook_usage"] == [pytest.approx(len(np.unique(ids.numpy())) / tok.vocab_size)]
    assert (row["positions"], row["codes_per_position"]) == (64, 1)
    # teacher cosine: the semantic prediction against a teacher rebuilt as stage 1 built it (seed, then load)
    torch.manual_seed(cfg.tokenizer_train.seed)
    teacher = load_teacher(cfg.tokenizer)
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(tok.semantic(images)[0], teacher(pixel_values=images).last_hidden_state, dim=-1)
    assert row["teacher_cosine"] == pytest.approx(float(cos.mean()), abs=1e-4)
    # MLLM columns: the pipeline's own eval of this kind
    summary = json.loads((eval_dir(compared / "semhitok" / "mllm" / "final") / "summary.json").read_text())
    assert row["understanding_loss"] == summary["gaps"]["understanding"]["loss_true"]
    assert row["generation_loss"] == summary["gaps"]["generation"]["loss_true"]
    assert row["pope_accuracy"] == summary["pope"]["accuracy"]
    assert row["budget"]["tokenizer_steps"] == 3 and row["budget"]["mllm_steps"] == 2
    table = (compared / "compare.md").read_text()
    line = next(ln for ln in table.splitlines() if ln.startswith("| semhitok |"))
    assert f"| {row['psnr']:.2f} |" in line and "| semhitok | 3+3 | 64 x 1 = 64 |" in line and line.endswith("| ok |")
    assert row["tokenizer_stages"] == {"stage1": 3, "stage2": 3}
    assert f"{row['generation_loss']:.3f} ({np.log(tok.vocab_size):.2f})" in line
    assert "Budget: tokenizer 3 steps per stage (tok. steps: per stage trained), batch 16" in table
    # the figure: a row of held-out images, a row of reconstructions, 4 images each
    with Image.open(compared / "compare.png") as fig:
        assert fig.size == (96 + 4 * 66 + 2, 2 * 68)
        strip = np.asarray(fig.convert("RGB"))[68 + 2 : 68 + 66, 96 + 2 : 96 + 66].astype(float)
    expected = ((recon[0].permute(1, 2, 0).numpy() + 1) * 127.5)
    assert np.abs(strip - expected).mean() < 2.0  # the first reconstruction, as drawn (PNG rounding)


def test_rerun_skips_the_finished_kind(compared, caplog):
    log_file = compared / "semhitok" / "pipeline.log"
    before = log_file.read_text()
    assert compare(compared) == 0
    assert log_file.read_text() == before  # no pipeline run
    assert "finished already" in caplog.text
    assert json.loads((compared / "run.json").read_text())["job"] == "compare"


def test_a_failing_kind_is_a_row_not_a_crash(tmp_path, capsys):
    code = compare(tmp_path, f"tokenizer_train.train_data=[{tmp_path / 'missing.jsonl'}]")
    assert code == 1
    row = json.loads((tmp_path / "compare.json").read_text())["kinds"]["semhitok"]
    assert any(e.startswith("pipeline: `semhitok pipeline` exited 2") and "missing.jsonl" in e for e in row["errors"])
    assert not (tmp_path / "semhitok" / ROW_FILE).exists()  # not finished: the next run retries it
    line = next(ln for ln in (tmp_path / "compare.md").read_text().splitlines() if ln.startswith("| semhitok |"))
    assert "FAILED: pipeline:" in line and "| - |" in line
    assert "1 of 1 kinds failed (semhitok)" in capsys.readouterr().err


def test_render_marks_missing_values_and_unequal_budgets():
    budget = {"tokenizer_steps": 3, "tokenizer_batch": 16, "tokenizer_lr": 0.001, "mllm_steps": 2, "mllm_micro_batch": 2,
              "mllm_lr": 0.002}
    rows = {"a": {"errors": [], "budget": budget, "tokenizer_stages": {"vq": 5, "enc": 7}, "positions": 64, "codes_per_position": 16, "codebook_usage": [0.5, 0.25],
                  "code_vocab_sizes": [8] * 16, "generation_loss": 30.0, "psnr": 20.0},
            "b": {"errors": ["pipeline: boom | bang"], "budget": {**budget, "mllm_steps": 4}}}
    table = render({"config": "tiny", "overrides": [], "kinds": rows})
    a = next(ln for ln in table.splitlines() if ln.startswith("| a |"))
    assert "| a | 5+7 | 64 x 16 = 1024 |" in a and "| 50.0% / 25.0% |" in a and f"| 30.000 ({16 * np.log(8):.2f}) |" in a
    assert "| 20.00 | - |" in a  # PSNR, then no SSIM
    b = next(ln for ln in table.splitlines() if ln.startswith("| b |"))
    assert b.endswith("| FAILED: pipeline: boom \\| bang |")
    assert "not trained at one budget" in table


def world_summary(und: float, colour: float, gen1: float, gen2: float, single2: float) -> dict:
    """summary.json's "world" as eval/world_eval.py score_world writes it (the fields compare reads, and others)."""
    def gen(scale, acc, single):
        return {"cfg_scale": scale, "accuracy": acc, "images": 8,
                "by_category": {"single_object": {"accuracy": single, "n": 2}, "counting": {"accuracy": 2 * acc - single, "n": 2}},
                "by_combo": {"seen": {"accuracy": acc, "n": 6}, "heldout": {"accuracy": None, "n": 0}}}

    return {"world": "/w", "understanding": {"accuracy": und, "questions": 20, "by_type": {
                "colour": {"accuracy": colour, "n": 5}, "shape": {"accuracy": 0.2, "n": 5}, "count": {"accuracy": 0.0, "n": 10}}},
            "generation": {"cfg_1": gen(1.0, gen1, 0.0), "cfg_2": gen(2.0, gen2, single2)}}


def test_world_scores_from_the_summary_at_the_default_cfg():
    world = world_summary(0.45, 0.8, 0.25, 0.5, 1.0)
    expected = {"world_understanding": 0.45, "world_understanding_colour": 0.8, "world_understanding_shape": 0.2,
                "world_generation": 0.5, "world_generation_single_object": 1.0, "world_cfg_scale": 2.0}
    assert world_scores(world, 2.0) == expected
    assert world_scores(world, None) == expected  # the last scale scored: the sampling default
    assert world_scores(world, 1.0)["world_generation"] == 0.25 and world_scores(world, 1.0)["world_cfg_scale"] == 1.0
    assert world_scores(world, 3.0) == expected  # a scale not scored: the last one
    del world["understanding"]["by_type"]["shape"]
    assert world_scores(world, 2.0)["world_understanding_shape"] is None
    # summaries without a scored world: no world fields at all (the table shows no world columns)
    for summary in ({}, {"world": {"skipped": "/w not found"}}):
        assert world_scores(summary.get("world")) == {}
        assert set(mllm_scores(summary)) == {"understanding_loss", "generation_loss", "pope_accuracy", "gfid"}
    scores = mllm_scores({"gaps": {"understanding": {"loss_true": 1.5}}, "world": world_summary(0.45, 0.8, 0.25, 0.5, 1.0)}, 2.0)
    assert scores["understanding_loss"] == 1.5 and scores["world_understanding"] == 0.45 and scores["pope_accuracy"] is None


def test_render_adds_the_world_columns_when_a_kind_was_scored_on_it():
    rows = {"a": {"errors": [], **mllm_scores({"world": world_summary(0.45, 0.8, 0.25, 0.5, 1.0)}, 2.0)},
            "b": {"errors": ["pipeline: boom"]}}
    table = render({"config": "shapes", "overrides": [], "kinds": rows})
    head = next(ln for ln in table.splitlines() if ln.startswith("| kind |"))
    assert head.endswith("| gFID | world und. (colour / shape) | world gen. (single obj.) | status |")
    a = next(ln for ln in table.splitlines() if ln.startswith("| a |"))
    assert a.endswith("| 45.0% (80.0% / 20.0%) | 50.0% (100.0%) | ok |")
    b = next(ln for ln in table.splitlines() if ln.startswith("| b |"))
    assert "| - | - | FAILED: pipeline: boom |" in b
    assert "at CFG 2." in table
    assert len({ln.count("|") for ln in table.splitlines() if ln.startswith("|")}) == 1  # every row as wide as the head


def test_group_usage_weights_each_slot_by_its_vocabulary():
    # two groups: slots (0, 1) with 8 and 4 codes, slot 2 alone with 16
    assert group_usage([0.5, 1.0, 0.25], (8, 4, 16), (2, 1)) == [pytest.approx((4 + 4) / 12), 0.25]


def test_every_kind_trains_each_stage_tokenizer_train_max_steps():
    from semhitok.tokenizer.kinds import KINDS

    for kind in KINDS:
        cfg = load_project_config("tiny", kind_overrides("tiny", ["tokenizer_train.max_steps=7"], kind, Path("/x")))
        assert cfg.tokenizer.kind == kind and cfg.run_dir == f"/x/{kind}"
        for key in STAGE_STEPS.get(kind, ()):
            section, name = key.split(".")
            assert getattr(getattr(cfg, section), name) == 7, key
    # the user's own override of a stage's steps still wins
    cfg = load_project_config("tiny", kind_overrides("tiny", ["toklip.vqgan_steps=2"], "toklip", Path("/x")))
    assert cfg.toklip.vqgan_steps == 2 and cfg.toklip.encoder_steps == cfg.tokenizer_train.max_steps


def test_usage_per_code_group_of_a_residual_tokenizer(tmp_path):
    """DualToken (L = 16: 8 semantic then 8 pixel residual codes), untrained: compare's usage per group against
    the ids counted here; ids per image N x L; its reconstructions kept for the figure."""
    from semhitok.eval.compare import measure_tokenizer
    from semhitok.tokenizer.dualtoken.model import DualToken
    from semhitok.tokenizer.siglip import load_teacher

    cfg = load_project_config("tiny", [])
    torch.manual_seed(0)
    DualToken.from_teacher(cfg.dualtoken, load_teacher(cfg.dualtoken)).save_pretrained(tmp_path / "tok")
    row, recons = measure_tokenizer(tmp_path / "tok", [str(SAMPLE / "holdout.jsonl")], fid=False, keep=3)
    tok = DualToken.from_pretrained(tmp_path / "tok")
    with torch.no_grad():
        codes = tok.encode(holdout_images(tok.image_size)).reshape(-1, 16)  # [12 * 64, L]
    sizes = tok.code_vocab_sizes
    expected = [sum(len(codes[:, s].unique()) for s in slots) / sum(sizes[s] for s in slots) for slots in (range(8), range(8, 16))]
    assert row["codebook_usage"] == pytest.approx(expected)
    assert (row["positions"], row["codes_per_position"], row["code_groups"]) == (64, 16, [8, 8])
    assert recons.shape == (3, 3, tok.image_size, tok.image_size)
    assert row["teacher_cosine"] is not None and -1 <= row["teacher_cosine"] <= 1
