"""Each tokenizer kind samples at its own paper's CFG scale (tokenizer.kinds.PAPER_CFG_SCALE) unless the user
says otherwise: a project config by its tokenizer.kind (semhitok.config.load_project_config), a model directory
by the kind its export records (`semhitok sample`, `chat`, `eval`); an explicit setting, 2 included, wins."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from semhitok.cli import build_parser, main
from semhitok.config import load_project_config
from semhitok.mllm.config import MLLMConfig
from semhitok.mllm.model import SemHiTokLM, saved_ids
from semhitok.tokenizer.dualtoken.model import DualToken
from semhitok.tokenizer.kinds import KINDS, PAPER_CFG_SCALE
from semhitok.tokenizer.siglip import load_teacher
from tests.conftest import TINY_QWEN
from tests.tokenizer.test_dualtoken import tiny_config as tiny_dualtoken_config


def test_every_kind_declares_its_papers_cfg():
    assert set(PAPER_CFG_SCALE) == set(KINDS)
    assert PAPER_CFG_SCALE["semhitok"] == 2.0 and PAPER_CFG_SCALE["dualtoken"] == 3.0  # arXiv 2503.06764 / 2503.14324
    help_text = " ".join(build_parser()._subparsers._group_actions[0].choices["sample"].format_help().split())
    assert "SemHiTok 2, DualToken 3, TokLIP 2.5" in help_text  # the flag's help names what the registry holds
    assert PAPER_CFG_SCALE["toklip"] == 2.5


@pytest.mark.parametrize(("overrides", "scale"), [
    ([], 2.0),  # tiny is a SemHiTok config
    (["tokenizer.kind=dualtoken"], 3.0),
    (["tokenizer.kind=toklip"], 2.5),
    (["tokenizer.kind=dualtoken", "eval.sampling.cfg_scale=2"], 2.0),  # explicit, even at SemHiTok's value, wins
    (["eval.sampling.cfg_scale=1.5", "tokenizer.kind=dualtoken"], 1.5),  # whatever the order
    (["tokenizer.kind=semhitok", "eval.sampling.seed=4"], 2.0),  # another sampling field leaves the scale to the kind
])
def test_config_samples_at_its_kinds_papers_cfg_unless_set(overrides, scale):
    assert load_project_config("tiny", overrides).eval.sampling.cfg_scale == scale


def test_a_config_file_that_sets_the_scale_keeps_it_and_the_resolved_config_reloads_the_same(tmp_path, capsys):
    mine = tmp_path / "mine.yaml"
    mine.write_text(yaml.safe_dump({"tokenizer": {"kind": "dualtoken"}, "eval": {"sampling": {"cfg_scale": 2.0, "seed": 1}}}))
    assert load_project_config(mine).eval.sampling.cfg_scale == 2.0
    capsys.readouterr()
    assert main(["config", "--config", "tiny", "tokenizer.kind=dualtoken"]) == 0  # as runs record their config
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    assert load_project_config(printed).eval.sampling.cfg_scale == 3.0
    assert load_project_config(printed, ["tokenizer.kind=semhitok"]).eval.sampling.cfg_scale == 3.0  # recorded: set
    # the kind of the model being evaluated, when given, picks the scale a config does not set
    assert load_project_config("tiny", model_kind="dualtoken").eval.sampling.cfg_scale == 3.0
    assert load_project_config("tiny", ["eval.sampling.cfg_scale=2"], model_kind="dualtoken").eval.sampling.cfg_scale == 2.0


@pytest.fixture(scope="module")
def dualtoken_model(text_tokenizer, tmp_path_factory) -> Path:
    """A random-weight tiny DualToken MLLM export (tiny SigLIP tower, 8 x 8 positions, 16 codes each; 2-layer Qwen2)."""
    out = tmp_path_factory.mktemp("dualtoken_model")
    torch.manual_seed(0)
    cfg = tiny_dualtoken_config()
    tok = DualToken.from_teacher(cfg, load_teacher(cfg))
    tok.train().quantize(torch.rand(4, 3, 64, 64) * 2 - 1)  # fit the codebooks once
    tok.eval().save_pretrained(out / "tokenizer")
    lm = SemHiTokLM.build(MLLMConfig(base_model="random", base_config=TINY_QWEN, depth_layers=1, depth_width=16),
                          tok, text_tokenizer).eval()
    lm.save_pretrained(out / "model", text_tokenizer, out / "tokenizer")
    assert saved_ids(out / "model").kind == "dualtoken"
    return out / "model"


@pytest.mark.parametrize(("flags", "scale"), [([], 3.0), (["--cfg-scale", "2"], 2.0)])
def test_sample_uses_the_models_kinds_cfg_unless_the_flag_is_given(dualtoken_model, tmp_path, flags, scale):
    out = tmp_path / "samples"
    assert main(["sample", "--model", str(dualtoken_model), "--prompt", "a red square", "--out", str(out), *flags]) == 0
    rows = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    assert [row["cfg_scale"] for row in rows] == [scale]  # what each image was drawn at
    assert yaml.safe_load((out / "config.yaml").read_text())["sampling"]["cfg_scale"] == scale  # what the run records


@pytest.mark.parametrize(("flags", "scale"), [([], 3.0), (["--cfg-scale", "2"], 2.0)])
def test_chat_starts_at_the_models_kinds_cfg_unless_the_flag_is_given(dualtoken_model, monkeypatch, flags, scale):
    import semhitok.mllm.chat_app as chat_app

    served = {}
    monkeypatch.setattr(chat_app, "serve", lambda engine, *args, **kw: served.setdefault("engine", engine))
    assert main(["chat", "--model", str(dualtoken_model), *flags]) == 0
    assert served["engine"].sampling.cfg_scale == scale  # the page's CFG slider starts here
    assert type(served["engine"])(served["engine"].decoder, served["engine"].visual, 100_000, 1_000_000,
                                  max_new_tokens=4).sampling.cfg_scale == 3.0  # ChatEngine's own default, by kind


def test_eval_without_a_recorded_config_uses_the_models_kinds_cfg(dualtoken_model, tmp_path, monkeypatch):
    import semhitok.eval.summary as summary

    seen = {}

    def evaluate(model, eval_cfg, out, device=None):  # the scoring itself is tested in tests/eval
        seen["cfg_scale"] = eval_cfg.sampling.cfg_scale
        (Path(out) / "summary.md").write_text("stub\n")

    monkeypatch.setattr(summary, "evaluate_model", evaluate)
    assert main(["eval", "--model", str(dualtoken_model), "--out", str(tmp_path / "e")]) == 0
    assert seen == {"cfg_scale": 3.0}  # no recorded run config: the tiny preset (a SemHiTok config), the model's kind
    assert main(["eval", "--model", str(dualtoken_model), "--out", str(tmp_path / "f"), "--config", "tiny",
                 "eval.sampling.cfg_scale=2"]) == 0
    assert seen == {"cfg_scale": 2.0}
