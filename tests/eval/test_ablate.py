"""`semhitok ablate`: one short Table 5 variant end to end, the table's layout, and the skip on rerun; one
Table 4 variant through the LLM path on a small shapes world, its world columns against its own answers."""

import json

import pytest

from semhitok.cli import main
from semhitok.common.run_dir import record_run
from semhitok.config import load_project_config
from semhitok.eval.ablate import LLM_FILE, TABLES, default_stage1_steps, forward_gflops, render, run_table
from tests.conftest import SAMPLE, tiny_config


def test_one_table5_variant_trains_measures_and_is_skipped_on_rerun(tmp_path, capsys, caplog):
    cfg = tiny_config(tmp_path, "tokenizer_train.perceptual=semantic", "tokenizer_train.batch_size=8")
    out = tmp_path / "table5"
    path = run_table(5, cfg, out, stage1_steps=2, steps=2, only=["dim_m12"], fid=False)
    result = json.loads((out / "dim_m12" / "metrics.json").read_text())
    assert result["overrides"] == ["tokenizer.fusion=concat", "tokenizer.pix_codes_per_group=12"]
    assert 5 < result["psnr"] < 40 and 0 < result["subcode_usage"] <= 1 and 0 < result["semantic_usage"] <= 1
    assert -1 <= result["teacher_cosine"] <= 1 and result["rfid"] is None and result["gflops_per_image"] > 0
    # one fixed perceptual network for every row: the semantic term read the teacher
    assert json.loads((out / "dim_m12" / "run_config.json").read_text())["perceptual_network"] == "teacher"
    lines = path.read_text().splitlines()
    assert lines[2].startswith("| Fusion | Subc Size | rFID (ours) | PSNR (ours)") and lines[2].endswith("| rFID (paper) | Usage (paper) |")
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): line for line in lines[4:10]}
    assert len(rows) == 6 and "1.26 | 93.7%" in rows["Dim", "12"] and f"{result['psnr']:.2f}" in rows["Dim", "12"]
    assert "(not run)" in rows["w/o sem", "12"] and "1.99 | 98.4%" in rows["w/o sem", "12"]
    # rerun through the CLI: the finished variant is not trained again
    stamp = (out / "dim_m12" / "metrics.json").stat().st_mtime_ns
    assert main(["ablate", "--table", "5", "--config", "tiny", "--out", str(out), "--only", "dim_m12", "--no-fid",
                 f"run_dir={tmp_path}", f"tokenizer_train.holdout_data=[{SAMPLE / 'holdout.jsonl'}]",
                 "tokenizer_train.batch_size=8", "--stage1-steps", "2", "--steps", "2"]) == 0
    assert "ablation dim_m12: done already" in caplog.text and (out / "dim_m12" / "metrics.json").stat().st_mtime_ns == stamp
    assert "| Dim | 12 |" in capsys.readouterr().out


def test_tables_carry_the_papers_rows():
    assert [v.cells for v in TABLES[5].variants] == [["w/o sem", "12"], ["w/o sem, shared codebook", "12"], ["Len", "12"],
                                                     ["Dim", "8"], ["Dim", "12"], ["Dim", "16"]]
    assert [v.paper[0] for v in TABLES[4].variants] == ["3.10", "2.73", "2.10", "1.24"]
    with pytest.raises(ValueError, match="unknown variant"):
        run_table(5, None, None, 1, 1, only=["dim_m99"])


# The shapes preset at a tiny budget: a small world, two steps per stage (stage 0, the teacher, included).
SHAPES_BUDGET = ["world.train_scenes=32", "world.holdout_scenes=8", "world.text_rows=16", "teacher_train.steps=2",
                 "tokenizer_train.eval_every=1000",
                 "tokenizer_train.image_every=1000", "tokenizer_train.ckpt_every=1000", "tokenizer_train.holdout_images=4",
                 "mllm_train.max_steps=2", "mllm_train.eval_every=0",
                 # plain engine: an in-process DeepSpeed run would keep a process group (and its port, exported as
                 # MASTER_PORT) for the rest of the session, which later torchrun subprocesses then fail to bind
                 "mllm_train.deepspeed_config=none", "eval.world_questions_limit=12",
                 "eval.world_prompts_limit=1", "eval.batch_size=8"]


def test_a_semantic_only_variant_through_the_llm_path_scores_the_world(tmp_path, caplog):
    cfg = load_project_config("shapes", [f"run_dir={tmp_path}", *SHAPES_BUDGET])
    out = tmp_path / "table4"
    path = run_table(4, cfg, out, stage1_steps=2, steps=2, only=["spc_teacher_init"], fid=False, llm=True)
    variant = out / "spc_teacher_init"
    llm = json.loads((variant / LLM_FILE).read_text())
    # the LLM trained on the variant's ids (m = 1: K semantic ids) and was scored on the run's world
    assert json.loads((variant / "llm" / "mllm" / "final" / "visual_tokenizer" / "config.json").read_text())["fusion"] == "semantic_only"
    assert llm["mllm_steps"] == 2 and llm["world"]["world"] == str(tmp_path / "world")
    assert (tmp_path / "teacher" / "model.safetensors").is_file()  # stage 0, which the variants distilled
    answers = [json.loads(line) for line in (variant / "llm" / "world_eval" / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 12 and llm["scores"]["world_understanding"] == pytest.approx(sum(a["correct"] for a in answers) / 12)
    colour = [a["correct"] for a in answers if a["type"] == "colour"]
    assert llm["scores"]["world_understanding_colour"] == (pytest.approx(sum(colour) / len(colour)) if colour else None)
    checked = [json.loads(line) for line in (variant / "llm" / "world_eval" / "generation" / "cfg_2" / "results.jsonl").read_text().splitlines()]
    single = [r["ok"] for r in checked if r["category"] == "single_object"]
    assert llm["scores"]["world_cfg_scale"] == 2.0 and llm["scores"]["world_generation_single_object"] == sum(single) / len(single)
    lines = path.read_text().splitlines()
    assert lines[2].endswith("| Teacher cos (ours) | GFLOPs / img (ours) | World und. (ours) | World gen. (ours) | rFID (paper) | GQA (paper) | POPE (paper) | SEEDB (paper) |")
    row = next(ln for ln in lines if ln.startswith("| ✓ |  |  |"))
    assert f"| {100 * llm['scores']['world_understanding']:.1f}% (" in row and row.endswith("| 2.73 | 58.2 | 83.1 | 57.4 |")
    assert "Then its LLM: 2 steps" in lines[0]
    # a rerun trains nothing: the tokenizer and the LLM are both done
    stamp = (variant / LLM_FILE).stat().st_mtime_ns
    run_table(4, cfg, out, stage1_steps=2, steps=2, only=["spc_teacher_init"], fid=False, llm=True)
    assert "ablation spc_teacher_init: LLM done already" in caplog.text and (variant / LLM_FILE).stat().st_mtime_ns == stamp


def test_render_shows_the_llm_columns_and_variants_whose_llm_did_not_run():
    tok = {"rfid": None, "psnr": 20.0, "ssim": 0.5, "semantic_usage": 0.5, "subcode_usage": None, "teacher_cosine": 0.9}
    scores = {"world_understanding": 0.5, "world_understanding_colour": 1.0, "world_understanding_shape": None,
              "world_generation": 0.25, "world_generation_single_object": 0.5, "world_cfg_scale": 2.0}
    results = {"spc_random_init": {**tok, "llm": {"scores": scores}}, "spc_teacher_init": tok}
    lines = render(TABLES[4], results, "budget", llm=True).splitlines()
    rows = [ln for ln in lines if ln.startswith("| ")][1:]
    assert "| 0.900 | - | 50.0% (100.0% / -) | 25.0% (50.0%) | 3.10 |" in rows[0]
    assert "| 0.900 | - | (LLM not run) |  | 2.73 |" in rows[1]
    assert "| (not run) |" + "  |" * 8 + " 2.10 |" in rows[2]
    assert len({ln.count("|") for ln in rows}) == 1
    assert "World und. (ours)" not in render(TABLES[4], results, "budget")


def test_the_llm_path_needs_the_world(tmp_path, capsys):
    assert main(["ablate", "--table", "5", "--config", "tiny", "--out", str(tmp_path), "--llm", f"run_dir={tmp_path}"]) == 2
    assert "use a config with world.enabled=true" in capsys.readouterr().err and not list(tmp_path.glob("*/metrics.json"))


def test_the_joint_row_distils_as_many_steps_as_the_others(tmp_path):
    """Table 4's joint row keeps distilling in stage 2, so its own stage 1 is stage1_steps - steps long."""
    assert default_stage1_steps(4, None, 500, 300) == 800 and default_stage1_steps(4, ["sghc"], 500, 300) == 500
    assert default_stage1_steps(5, None, 500, 300) == 500
    cfg = tiny_config(tmp_path, "tokenizer_train.batch_size=8", "tokenizer_train.perceptual=none")
    with pytest.raises(ValueError, match="spc_joint: its stage 1 runs --stage1-steps minus --steps"):
        run_table(4, cfg, tmp_path / "t4", stage1_steps=2, steps=2, only=["spc_joint"], fid=False)
    assert not (tmp_path / "t4").exists()  # refused before anything was written
    run_table(4, cfg, tmp_path / "t4", stage1_steps=3, steps=2, only=["spc_joint"], fid=False)
    state = json.loads((tmp_path / "t4" / "stage1_joint" / "final" / "config.json").read_text())
    assert state["trained_stages"] == [1]
    assert json.loads((tmp_path / "t4" / "stage1_joint" / "run_config.json").read_text())["train"]["max_steps"] == 1  # 3 - 2
    # the stage-1 runs live in the output folder: a table asking for another stage-1 budget there is refused
    (tmp_path / "t4" / "spc_joint" / "metrics.json").unlink()
    with pytest.raises(ValueError, match="stage1_joint: a stage 1 of 1 steps, this table asks for 2"):
        run_table(4, cfg, tmp_path / "t4", stage1_steps=4, steps=2, only=["spc_joint"], fid=False)
    # ... by the CLI before it records anything
    record_run(tmp_path / "t4", cfg, "ablate")
    records = {n: (tmp_path / "t4" / n).read_bytes() for n in ("config.yaml", "run.json", "runs.jsonl")}
    args = ["--table", "4", "--out", str(tmp_path / "t4"), "--only", "spc_joint", "--stage1-steps", "4", "--steps", "2"]
    assert main(["ablate", *args, "--config", "tiny", f"run_dir={tmp_path}"]) == 2
    assert {n: (tmp_path / "t4" / n).read_bytes() for n in records} == records


@pytest.mark.parametrize("overrides,more", [(["tokenizer.fusion=length"], True), (["tokenizer.fusion=semantic_only"], False),
                                            (["tokenizer.fusion=pixel_only", "tokenizer.pix_codebook=shared"], True)])
def test_forward_gflops_counts_what_a_variant_adds(tmp_path, overrides, more):
    """"Len" decodes 2N tokens and a shared codebook is searched whole (K * m codes per patch): both cost more than
    concat; without pixel codes, less."""
    from semhitok.tokenizer import SemHiTok
    from semhitok.tokenizer.siglip import load_teacher

    def gflops(*overrides):
        cfg = tiny_config(tmp_path, *overrides)
        return forward_gflops(SemHiTok.from_teacher(cfg.tokenizer, load_teacher(cfg.tokenizer)))

    assert (gflops(*overrides) > gflops("tokenizer.fusion=concat")) == more
