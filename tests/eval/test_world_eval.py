"""The world's scorers: the generation checker validated on rendered scenes, the understanding metrics by
hand, and both scorers end to end on a tiny model."""

import json

import numpy as np
import pytest
from PIL import Image

from semhitok.data_pipelines.world import Obj, Scene, WorldConfig, render, write_world
from semhitok.eval.world_eval import (check, degrade, detect, generation_metrics, normalize_answer,
                                      question_metrics, validate_checker, world_table)


def test_checker_passes_rendered_scenes_clean_and_degraded_and_fails_wrong_specs():
    v = validate_checker(300, seed=7)
    assert v["prompts"] > 400
    assert v["clean"] >= 0.98 and v["degraded"] >= 0.98, v
    assert v["scenes_clean"] >= 0.98 and v["scenes_degraded"] >= 0.98, v
    assert v["wrong_failed_clean"] >= 0.98 and v["wrong_failed_degraded"] >= 0.98, v


SCENE = Scene((Obj("red", "circle", 16.0, 20.0, 18.0), Obj("blue", "square", 46.0, 40.0, 20.0)), 64)
PAIR = [["red", "circle"], ["blue", "square"]]


@pytest.mark.parametrize("image", [render(SCENE), degrade(render(SCENE)), render(SCENE).resize((256, 256), Image.NEAREST)])
def test_detect_finds_colour_shape_and_place(image):
    objects = detect(image)
    assert [o.name for o in objects] == ["red circle", "blue square"]
    scale = image.size[0] / 64
    assert objects[0].x == pytest.approx(16 * scale, abs=1.5 * scale) and objects[1].y == pytest.approx(40 * scale, abs=1.5 * scale)
    assert check({"objects": PAIR, "count": 2}, objects) == (True, "ok")
    assert check({"objects": PAIR, "count": 2, "left_of": [0, 1]}, objects) == (True, "ok")
    assert check({"objects": [], "count": 2}, objects) == (True, "ok")


@pytest.mark.parametrize("spec,reason", [
    ({"objects": [["green", "circle"], ["blue", "square"]], "count": 2}, "no green circle"),  # colour swapped
    ({"objects": [["red", "triangle"], ["blue", "square"]], "count": 2}, "no red triangle"),  # shape swapped
    ({"objects": PAIR[::-1], "count": 2, "left_of": [0, 1]}, "blue square (x=45.5) is not left of red circle"),  # relation (pixel centres: x - 0.5)
    ({"objects": [], "count": 3}, "found 2 object(s) (red circle, blue square), wanted 3"),  # count
    ({"objects": [["red", "circle"]], "count": 1}, "found 2 object(s)"),  # one object asked, two drawn
])
def test_wrong_specs_fail_with_a_reason(spec, reason):
    ok, why = check(spec, detect(render(SCENE)))
    assert not ok and why.startswith(reason), why


def test_blank_and_noise_images_pass_nothing():
    rng = np.random.default_rng(0)
    single = {"objects": [["red", "circle"]], "count": 1}
    assert detect(Image.new("RGB", (64, 64), (235, 235, 235))) == []
    assert detect(np.zeros((64, 64, 3), np.uint8)) == []
    for noise in (rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)):
        objects = detect(noise)
        assert len(objects) <= 1 and not check(single, objects)[0]


def test_touching_objects_of_one_colour_are_two():
    scene = Scene((Obj("green", "triangle", 20.0, 14.0, 20.0), Obj("green", "square", 26.0, 37.0, 22.0)), 64)  # 1-px gap
    assert sorted(o.name for o in detect(degrade(render(scene)))) == ["green square", "green triangle"]


@pytest.mark.parametrize("text,word", [("Red.", "red"), ("  yes, it is", "yes"), ("NO!", "no"), ("2", "two"),
                                       ("3 shapes", "three"), ("one", "one"), ("left-ish", "left"), ("", ""), ("?!", "")])
def test_answers_normalise_to_their_first_word(text, word):
    assert normalize_answer(text) == word


def test_question_metrics_by_hand():
    rows = [("colour", "red", False, "Red."), ("colour", "blue", True, "green"), ("count", "two", False, "2"),
            ("shape", "circle", True, "circle"),
            ("yes_no", "yes", False, "Yes"), ("yes_no", "yes", True, "no"), ("yes_no", "no", False, "yes"),
            ("yes_no", "no", False, "no."), ("yes_no", "yes", False, "maybe"), ("left_right", "left", True, "right")]
    questions = [{"type": t, "answer": a, "heldout_combo": h} for t, a, h, _ in rows]
    m = question_metrics(questions, [r for *_, r in rows])
    assert m["questions"] == 10 and m["accuracy"] == pytest.approx(5 / 10)
    assert m["by_type"]["colour"] == {"accuracy": 0.5, "n": 2} and m["by_type"]["count"]["accuracy"] == 1.0
    assert m["by_type"]["yes_no"] == {"accuracy": pytest.approx(2 / 5), "n": 5} and m["by_type"]["left_right"]["accuracy"] == 0.0
    assert m["by_combo"]["seen"] == {"accuracy": pytest.approx(4 / 6), "n": 6}
    assert m["by_combo"]["heldout"] == {"accuracy": pytest.approx(1 / 4), "n": 4}
    assert m["by_type_combo"]["colour"] == {"seen": {"accuracy": 1.0, "n": 1}, "heldout": {"accuracy": 0.0, "n": 1}}
    assert m["by_type_combo"]["yes_no"]["heldout"] == {"accuracy": 0.0, "n": 1}
    assert m["by_type_combo"]["shape"]["seen"] == {"accuracy": None, "n": 0}
    yn = m["yes_no"]  # truth yes yes no no yes; said yes no yes no (maybe): TP 1, FP 1, FN 2 (the no and the maybe)
    assert yn["precision"] == pytest.approx(1 / 2) and yn["recall"] == pytest.approx(1 / 3)
    assert yn["f1"] == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))
    assert yn["yes_ratio"] == pytest.approx(2 / 4) and yn["unparseable"] == 1 and yn["questions"] == 5
    with pytest.raises(ValueError, match="equally many"):
        question_metrics(questions, ["red"])


def test_generation_metrics_average_the_categories():
    results = [{"category": c, "heldout_combo": h, "ok": ok} for c, h, ok in [
        ("single_object", False, True), ("single_object", True, False), ("counting", False, True), ("counting", False, True),
        ("counting", False, True), ("position", True, False)]]
    m = generation_metrics(results)
    assert m["by_category"]["single_object"] == {"accuracy": 0.5, "n": 2} and m["by_category"]["counting"]["accuracy"] == 1.0
    assert "two_objects" not in m["by_category"] and m["accuracy"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert m["by_combo"]["heldout"] == {"accuracy": 0.0, "n": 2} and m["by_combo"]["seen"] == {"accuracy": 1.0, "n": 4}
    assert m["by_category_combo"]["single_object"] == {"seen": {"accuracy": 1.0, "n": 1}, "heldout": {"accuracy": 0.0, "n": 1}}
    assert m["by_category_combo"]["counting"]["heldout"] == {"accuracy": None, "n": 0}


# -- end to end on a tiny model ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_world(WorldConfig(train_scenes=2, holdout_scenes=24, text_rows=4), tmp_path_factory.mktemp("world") / "world")


@pytest.fixture(scope="module")
def sampler(tiny_mllm_dir):
    from semhitok.mllm.sample import load_sampler

    return load_sampler(tiny_mllm_dir, "cpu")


def test_answer_questions_answers_every_question_in_batches_as_one_by_one(sampler, world):
    from semhitok.eval.world_eval import answer_questions, question_grid
    from semhitok.mllm.config import SamplingConfig
    from semhitok.tokenizer import encode_images, load_rgb

    decoder, visual = sampler
    result = answer_questions(decoder, visual, world, limit=20, batch_size=8, max_new_tokens=4)
    assert result["questions"] == 20 and len(result["answers"]) == 20 and result["questions_per_s"] > 0
    assert 0 <= result["accuracy"] <= 1 and set(result["by_type"]) <= {"colour", "shape", "count", "yes_no", "left_right"}
    for a in result["answers"][:3]:  # the batched, left-padded decode gives answer()'s replies
        ids = encode_images(visual, [load_rgb(world / a["image"])], decoder.seq_cfg.understanding_image)[0]
        assert decoder.answer([("user", "<image>\n" + a["question"])], ids, SamplingConfig(temperature=0.0), 4) == a["reply"]
    picture = question_grid(world, result["answers"], n=6, cols=3)
    assert picture.image.size[0] > 3 * 128 and picture.image.size[1] > 2 * 128 and "model: " in " ".join(t for t, _ in picture.texts)


def test_generate_and_check_writes_images_results_and_grids(sampler, world, tmp_path):
    from semhitok.eval.world_eval import generate_and_check
    from semhitok.mllm.config import SamplingConfig

    report = generate_and_check(*sampler, world, SamplingConfig(seed=3), tmp_path, limit_per_category=1, batch_size=3)
    assert list(report) == ["cfg_1", "cfg_2"]  # no guidance, and the sampling's scale
    for key, scores in report.items():
        rows = [json.loads(line) for line in (tmp_path / key / "results.jsonl").read_text().splitlines()]
        assert len(rows) == scores["images"] == sum(v["n"] for v in scores["by_category"].values()) <= 4
        assert all((tmp_path / key / r["file"]).is_file() and isinstance(r["ok"], bool) and r["reason"] for r in rows)
        assert Image.open(tmp_path / key / "grid.png").size[1] >= len(scores["by_category"]) * 128 and scores["images_per_s"] > 0
    again = generate_and_check(*sampler, world, SamplingConfig(seed=3), tmp_path / "again", limit_per_category=1, cfg_scales=(1.0,))
    first = json.loads((tmp_path / "again" / "cfg_1" / "results.jsonl").read_text().splitlines()[0])
    # image i is keyed by its prompt's index: the same in another batch
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again" / "cfg_1" / first["file"])),
                          np.asarray(Image.open(tmp_path / "cfg_1" / first["file"])))
    assert list(again) == ["cfg_1"]


def test_semhitok_eval_scores_the_world_into_the_summary(tiny_mllm_dir, world, tmp_path):
    from semhitok.eval.config import EvalConfig
    from semhitok.eval.summary import evaluate_model, markdown_table

    cfg = EvalConfig(pope_questions="", geneval_metadata="", gaps_data="", world=str(world), world_questions_limit=10,
                     world_prompts_limit=1, batch_size=8)
    summary = evaluate_model(tiny_mllm_dir, cfg, tmp_path, "cpu")
    on_disk = json.loads((tmp_path / "summary.json").read_text())["world"]
    assert on_disk["understanding"]["questions"] == 10 and set(on_disk["generation"]) == {"cfg_1", "cfg_2"}
    assert (tmp_path / "world" / "answers.jsonl").is_file() and (tmp_path / "world" / "questions.png").is_file()
    assert (tmp_path / "world" / "generation" / "cfg_2" / "grid.png").is_file()
    table = (tmp_path / "summary.md").read_text()
    assert table == markdown_table(summary) and "## World" in table and "| held-out combinations |" in table
    assert "| counting |" in table and "CFG 1 | seen | held-out | CFG 2 | seen | held-out" in table and "yes/no: precision" in table


def test_prompt_checker_judges_the_worlds_prompts_and_no_others(world):
    from semhitok.eval.world_eval import prompt_checker, read_jsonl

    verdict = prompt_checker(world)
    row = next(r for r in read_jsonl(world / "prompts.jsonl") if r["category"] == "single_object")
    colour, shape = row["spec"]["objects"][0]
    blank = Image.new("RGB", (64, 64), (235, 235, 235))
    ok, reason = verdict(row["prompt"], blank)
    assert ok is False and reason
    assert verdict(row["prompt"], render(Scene((Obj(colour, shape, 32.0, 32.0, 24.0),), 64)))[0] is True
    assert verdict("a prompt from elsewhere", blank) is None


def test_world_table_reads_a_skipped_world():
    assert world_table({"skipped": "/x not found"})[-1] == "skipped: /x not found"


def test_a_missing_world_is_named():
    from semhitok.eval.config import EvalConfig
    from semhitok.eval.summary import BenchmarkUnavailable, runnable

    cfg = EvalConfig(pope_questions="", geneval_metadata="", gaps_data="", gfid_captions="", world="/nonexistent/world")
    with pytest.raises(BenchmarkUnavailable, match="world: eval.world=/nonexistent/world not found"):
        runnable(cfg, {})
    cfg.allow_skip = True
    summary: dict = {}
    assert runnable(cfg, summary) == set() and "skipped" in summary["world"]
