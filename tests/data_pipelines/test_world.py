"""The procedural shapes world (data_pipelines/world.py): written deterministically, held-out combinations kept
out of everything training reads, ground truth that the pixels bear out, object sizes, and one-question
conversations whose answers are right."""

import json
import re
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from semhitok.common.config_io import ConfigError
from semhitok.data_pipelines.world import (BACKGROUND, COLOURS, MIN_DX, NUMBERS, SHAPES, Scene, WorldConfig,
                                           make_scenes, read_scenes, render, write_world)
from semhitok.eval.world_eval import detect, read_jsonl

CFG = WorldConfig(train_scenes=60, holdout_scenes=30, text_rows=20)
HELD = set(CFG.heldout_combos)  # "green circle", "yellow square"
SEEN = {f"{c} {s}" for c in COLOURS for s in SHAPES} - HELD
FILES = {"images", "train.jsonl", "holdout.jsonl", "captions.jsonl", "llava.json", "text.jsonl", "questions.jsonl",
         "prompts.jsonl", "scenes.jsonl", "WORLD.json"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_world(CFG, tmp_path_factory.mktemp("world") / "world")


# -- helpers --------------------------------------------------------------------------------------------
def named(text: str, answer: str = "") -> set[str]:
    """Every "colour shape" a text names, outright ("a green circle") or through its answer ("What color is the
    circle?" "green"; "What shape is the green object?" "circle"; the text source's "The circle is green.")."""
    found = {combo for combo in HELD | SEEN if combo in text}
    if m := re.fullmatch(r"What color is the (\w+)\?", text):
        found.add(f"{answer} {m[1]}")
    if m := re.fullmatch(r"What shape is the (\w+) object\?", text):
        found.add(f"{m[1]} {answer}")
    return found | {f"{colour} {shape}" for shape, colour in re.findall(r"The (\w+) is (\w+)\.", text)}


def truth(scene: Scene, question: str) -> tuple[str, str]:
    """(type, answer) of a world question, worked out from the scene's ground truth alone."""
    def the(**kw):
        [obj] = [o for o in scene.objects if all(getattr(o, k) == v for k, v in kw.items())]  # exactly one
        return obj

    if m := re.fullmatch(r"What color is the (\w+)\?", question):
        return "colour", the(shape=m[1]).colour
    if m := re.fullmatch(r"What shape is the (\w+) object\?", question):
        return "shape", the(colour=m[1]).shape
    if question == "How many shapes are there?":
        return "count", NUMBERS[len(scene.objects)]
    if m := re.fullmatch(r"Is there a (\w+ \w+)\?", question):
        return "yes_no", "yes" if m[1] in {o.name for o in scene.objects} else "no"
    if m := re.fullmatch(r"Is the (\w+) (\w+) left or right of the (\w+) (\w+)\?", question):
        p, q = the(colour=m[1], shape=m[2]), the(colour=m[3], shape=m[4])
        return "left_right", "left" if p.x < q.x else "right"
    raise AssertionError(f"not a world question: {question!r}")


def all_questions(scene: Scene) -> Counter:
    """How many questions of each kind the scene answers: a colour for each shape it holds once, a shape for each
    colour it holds once, one count, two yes/no, two left/right when it has two objects or more."""
    once = lambda attr: list(Counter(getattr(o, attr) for o in scene.objects).values()).count(1)
    return Counter(count=1, yes_no=2, left_right=2 * (len(scene.objects) > 1), colour=once("shape"), shape=once("colour"))


def assert_describes(scene: Scene, caption: str) -> None:
    """The caption names exactly the scene's objects, and a relation it states holds."""
    assert named(caption) == {o.name for o in scene.objects}, (caption, scene)
    if m := re.fullmatch(r"a (\w+ \w+) (left|right) of a (\w+ \w+)", caption):
        x = {o.name: o.x for o in scene.objects}
        assert (x[m[1]] < x[m[3]]) == (m[2] == "left"), (caption, scene)


def ink(image: Image.Image) -> int:
    """pixels off the background"""
    return int((np.asarray(image) != BACKGROUND).any(-1).sum())


def scenes_of(cfg: WorldConfig) -> list[Scene]:
    return make_scenes(cfg, "train") + make_scenes(cfg, "holdout")


# -- determinism ----------------------------------------------------------------------------------------
def test_the_same_config_writes_the_same_bytes_and_another_seed_other_scenes(world, tmp_path):
    again = write_world(CFG, tmp_path / "again")
    files = sorted(p.relative_to(world) for p in world.rglob("*") if p.is_file())
    assert {p.name for p in world.iterdir()} == FILES
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert sum(p.suffix == ".png" for p in files) == CFG.train_scenes + CFG.holdout_scenes
    for path in files:  # every jsonl and json, and every image
        assert (world / path).read_bytes() == (again / path).read_bytes(), path
    for split in ("train", "holdout"):
        ours, theirs = make_scenes(CFG, split), make_scenes(replace(CFG, seed=1), split)
        assert sum(a != b for a, b in zip(ours, theirs)) > 0.9 * len(ours)


# -- held-out combinations ------------------------------------------------------------------------------
def test_heldout_combinations_reach_nothing_training_reads(world):
    assert all(o.name in SEEN for _, scene, _ in read_scenes(world, "train") for o in scene.objects)
    assert not any(flag for *_, flag in read_scenes(world, "train"))
    captions = [r["caption"] for name in ("captions.jsonl", "train.jsonl") for r in read_jsonl(world / name)]
    assert len(captions) == CFG.train_scenes * (CFG.captions_per_scene + 1)
    assert set().union(*map(named, captions)) == SEEN  # the check below can see a combination: every seen one is there
    texts = [r["text"] for r in read_jsonl(world / "text.jsonl")]
    assert len(texts) == CFG.text_rows
    turns = [[t["value"] for t in c["conversations"]] for c in json.loads((world / "llava.json").read_text())]
    for combo in HELD:
        for name in ("captions.jsonl", "train.jsonl", "text.jsonl", "llava.json"):
            assert combo not in (world / name).read_text(), (combo, name)
        assert not any(combo in named(c) for c in captions + texts)
        assert not any(combo in named(q.removeprefix("<image>\n"), a) for q, a in turns)


def test_heldout_combinations_appear_in_heldout_scenes_questions_and_prompts(world):
    held_out = read_scenes(world, "holdout")
    for _, scene, flag in held_out:
        assert flag == any(o.name in HELD for o in scene.objects)
    assert [flag for *_, flag in held_out] == [i % 3 == 2 for i in range(CFG.holdout_scenes)]  # a third of them
    flagged = {image for image, _, flag in held_out if flag}
    questions, prompts = read_jsonl(world / "questions.jsonl"), read_jsonl(world / "prompts.jsonl")
    # a question is held out when its scene is, or when it names a held-out combination ("Is there a green circle?")
    assert all(q["heldout_combo"] == (q["image"] in flagged or any(c in q["question"] for c in HELD)) for q in questions)
    assert any(q["heldout_combo"] and q["image"] not in flagged for q in questions)
    for combo in HELD:
        assert any(combo in {o.name for o in scene.objects} for _, scene, _ in held_out)
        assert any(combo in named(q["question"], q["answer"]) for q in questions if q["heldout_combo"])
        assert any(combo in p["prompt"] and combo.split() in p["spec"]["objects"] for p in prompts if p["heldout_combo"])


# -- splits ---------------------------------------------------------------------------------------------
def test_train_and_heldout_are_different_images(world):
    images = {split: [image for image, *_ in read_scenes(world, split)] for split in ("train", "holdout")}
    assert [len(images["train"]), len(images["holdout"])] == [CFG.train_scenes, CFG.holdout_scenes]
    assert all(i.startswith("images/train_") for i in images["train"])
    assert all(i.startswith("images/holdout_") for i in images["holdout"])
    assert {f"images/{p.name}" for p in (world / "images").iterdir()} == {*images["train"], *images["holdout"]}
    assert [r["image"] for r in read_jsonl(world / "train.jsonl")] == images["train"]
    assert [r["image"] for r in read_jsonl(world / "holdout.jsonl")] == images["holdout"]
    assert {c["image"] for c in json.loads((world / "llava.json").read_text())} == set(images["train"])
    assert {q["image"] for q in read_jsonl(world / "questions.jsonl")} == set(images["holdout"])
    training = {np.asarray(Image.open(world / i)).tobytes() for i in images["train"]}
    assert not any(np.asarray(Image.open(world / i)).tobytes() in training for i in images["holdout"])


def test_heldout_images_are_not_training_images_at_the_default_size():
    cfg = WorldConfig()
    training = {render(s).tobytes() for s in make_scenes(cfg, "train")}
    repeated = [s for s in make_scenes(cfg, "holdout") if render(s).tobytes() in training]
    assert not repeated, f"{len(repeated)} of {cfg.holdout_scenes} held-out scenes are training images"


# -- ground truth ---------------------------------------------------------------------------------------
def test_the_pixels_show_the_ground_truth(world):
    assert [s for _, s, _ in read_scenes(world, "train")] == make_scenes(CFG, "train")
    for image, scene, _ in read_scenes(world):
        pixels = np.asarray(Image.open(world / image).convert("RGB"))
        np.testing.assert_array_equal(pixels, np.asarray(render(scene)))
        found = detect(pixels)
        assert [d.name for d in found] == [o.name for o in scene.by_x()], image
        assert [d.x for d in found] == pytest.approx([o.x for o in scene.by_x()], abs=1.5), image


GEOMETRIES = [CFG, replace(CFG, image_size=128), replace(CFG, snap=0), replace(CFG, single_min_size=0.25)]


@pytest.mark.parametrize("cfg", GEOMETRIES, ids=["default", "128px", "continuous", "varied_singles"])
def test_objects_are_distinct_apart_and_inside_the_image(cfg):
    side = cfg.image_size
    for scene in scenes_of(cfg):
        assert len({o.name for o in scene.objects}) == len(scene.objects)
        assert all(o.size / 2 <= c <= side - o.size / 2 for o in scene.objects for c in (o.x, o.y)), scene
        xs = sorted(o.x for o in scene.objects)
        assert all(b - a >= MIN_DX * side / 64 for a, b in zip(xs, xs[1:])), scene
        for i, p in enumerate(scene.objects):  # bounding boxes apart, so drawn pixels too
            for q in scene.objects[i + 1:]:
                assert max(abs(p.x - q.x), abs(p.y - q.y)) > (p.size + q.size) / 2, scene
        assert ink(render(scene)) == sum(ink(render(Scene((o,), side))) for o in scene.objects), scene


# -- sizes ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg,single,several", [
    (CFG, {32}, {16, 24}),  # half the side; 0.25-0.4 of it, on the 8-cell lattice (3.2 cells rounds to 3)
    (replace(CFG, image_size=128), {64}, {32, 48}),
    (replace(CFG, single_min_size=0.25), {16, 24, 32}, {16, 24}),
    (replace(CFG, single_min_size=0.375, single_max_size=0.375, min_size=0.25, max_size=0.25), {24}, {16}),
])
def test_a_lone_object_takes_the_single_sizes_and_others_the_plain_ones(cfg, single, several):
    sizes = {1: set(), 2: set(), 3: set()}
    for scene in scenes_of(cfg):
        sizes[len(scene.objects)] |= {o.size for o in scene.objects}
    assert sizes[1] == single and sizes[2] | sizes[3] == several
    cell = cfg.image_size / cfg.snap
    corners = [c - o.size / 2 for s in scenes_of(cfg) for o in s.objects for c in (o.x, o.y)]
    assert all(c % cell == 0 for c in corners)  # on the lattice


def test_continuous_sizes_stay_in_their_ranges():
    cfg = replace(CFG, snap=0, min_size=0.2, max_size=0.3, single_min_size=0.35, single_max_size=0.45)
    scenes = scenes_of(cfg)
    single = [o.size / 64 for s in scenes if len(s.objects) == 1 for o in s.objects]
    several = [o.size / 64 for s in scenes if len(s.objects) > 1 for o in s.objects]
    assert 0.35 <= min(single) and max(single) <= 0.45 and max(single) - min(single) > 0.05
    assert 0.2 <= min(several) and max(several) <= 0.3 and max(several) - min(several) > 0.05


@pytest.mark.parametrize("fields,message", [
    ({"single_min_size": 0.5, "single_max_size": 0.4}, "single_min_size: 0.5 is above single_max_size=0.4"),
    ({"min_size": 0.4, "max_size": 0.3}, "min_size: 0.4 is above max_size=0.3"),
    ({"single_max_size": 0.6}, "single_max_size: must lie in"),
    ({"heldout_combos": ["purple circle"]}, "heldout_combos: 'purple circle'"),
])
def test_bad_configs_are_refused_naming_the_field(fields, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        WorldConfig(**fields)


# -- conversations and questions ------------------------------------------------------------------------
def test_conversations_ask_one_question_each_with_the_right_answer(world):
    scenes = {image: scene for image, scene, _ in read_scenes(world, "train")}
    llava = json.loads((world / "llava.json").read_text())
    assert len({c["id"] for c in llava}) == len(llava)
    kinds, answers, described = {image: Counter() for image in scenes}, Counter(), set()
    for c in llava:
        assert [t["from"] for t in c["conversations"]] == ["human", "gpt"], c["id"]
        human, gpt = c["conversations"]
        assert human["value"].startswith("<image>\n") and human["value"].count("<image>") == 1, c["id"]
        question, scene = human["value"].removeprefix("<image>\n"), scenes[c["image"]]
        if question == "Describe the image.":
            assert_describes(scene, gpt["value"])
            described.add(c["image"])
            continue
        kind, answer = truth(scene, question)
        assert gpt["value"] == answer, (question, scene)
        kinds[c["image"]][kind] += 1
        answers[kind, answer] += 1
    for image, scene in scenes.items():  # every training scene asks all its questions
        assert kinds[image] == all_questions(scene), image
    assert answers["yes_no", "yes"] == answers["yes_no", "no"] == CFG.train_scenes  # balanced
    assert 0.3 < len(described) / CFG.train_scenes < 0.7  # a caption request for about half the scenes


def test_questions_per_scene_draws_that_many_true_questions_of_every_kind(tmp_path):
    cfg = replace(CFG, train_scenes=400, questions_per_scene=2, caption_requests=0.0)
    world = write_world(cfg, tmp_path / "world")
    scenes = {image: scene for image, scene, _ in read_scenes(world, "train")}
    per_image, answers = Counter(), Counter()
    for c in json.loads((world / "llava.json").read_text()):
        human, gpt = c["conversations"]
        kind, answer = truth(scenes[c["image"]], human["value"].removeprefix("<image>\n"))
        assert gpt["value"] == answer
        per_image[c["image"]] += 1
        answers[kind, answer] += 1
    assert set(per_image.values()) == {2} and len(per_image) == cfg.train_scenes
    assert {kind for kind, _ in answers} == {"colour", "shape", "count", "yes_no", "left_right"}
    yes, no = answers["yes_no", "yes"], answers["yes_no", "no"]
    assert abs(yes - no) < 0.25 * (yes + no)  # drawn, so balanced on average only


def test_captions_and_heldout_questions_are_true_of_their_scenes(world):
    scenes = {image: scene for image, scene, _ in read_scenes(world)}
    for name in ("captions.jsonl", "train.jsonl", "holdout.jsonl"):
        for row in read_jsonl(world / name):
            assert_describes(scenes[row["image"]], row["caption"])
    questions = read_jsonl(world / "questions.jsonl")
    for q in questions:
        assert truth(scenes[q["image"]], q["question"]) == (q["type"], q["answer"]), q
    yes_no = Counter(q["answer"] for q in questions if q["type"] == "yes_no")
    assert yes_no["yes"] == yes_no["no"] == CFG.holdout_scenes


# -- reruns ---------------------------------------------------------------------------------------------
def test_a_rerun_keeps_the_same_world_and_refuses_another(tmp_path):
    cfg = WorldConfig(train_scenes=3, holdout_scenes=3, text_rows=2)
    out = write_world(cfg, tmp_path / "world")
    stamps = lambda: {p: p.stat().st_mtime_ns for p in [out, *out.rglob("*")]}
    before = stamps()
    assert write_world(cfg, out) == out
    assert write_world(replace(cfg, enabled=True, out_dir=str(out)), out) == out  # where it goes is not the world
    for other in (replace(cfg, seed=1), replace(cfg, train_scenes=4), replace(cfg, heldout_combos=["red circle"])):
        with pytest.raises(ValueError, match="another config \\(WORLD.json\\)"):
            write_world(other, out)
    assert stamps() == before and list(tmp_path.iterdir()) == [out]  # untouched, and no half-written copy left


def test_turns_per_conversation_asks_every_question_once_with_no_answer_in_an_earlier_turn(tmp_path):
    cfg = replace(CFG, train_scenes=200, turns_per_conversation=4, caption_requests=0.0)
    world = write_world(cfg, tmp_path / "world")
    scenes = {image: scene for image, scene, _ in read_scenes(world, "train")}
    kinds, turns = {image: Counter() for image in scenes}, []
    for c in json.loads((world / "llava.json").read_text()):
        said = c["conversations"]
        assert [t["from"] for t in said] == ["human", "gpt"] * (len(said) // 2), c["id"]
        assert said[0]["value"].startswith("<image>\n") and sum(t["value"].count("<image>") for t in said) == 1
        asked = [(said[k]["value"].removeprefix("<image>\n"), said[k + 1]["value"]) for k in range(0, len(said), 2)]
        assert len(asked) <= cfg.turns_per_conversation
        turns.append(len(asked))
        scene = scenes[c["image"]]
        for question, answer in asked:
            kind, truth_ = truth(scene, question)
            assert answer == truth_, (question, scene)
            kinds[c["image"]][kind] += 1
        # the leaks the grouping exists for: a colour named for a shape, then a yes/no about that shape; a
        # left/right question and its reverse
        for (q1, a1), (q2, _) in [(x, y) for x in asked for y in asked if x != y]:
            if m := re.fullmatch(r"What color is the (\w+)\?", q1):
                assert not re.fullmatch(rf"Is there a \w+ {m[1]}\?", q2), asked
            if m := re.fullmatch(r"Is the (\w+ \w+) left or right of the (\w+ \w+)\?", q1):
                assert q2 != f"Is the {m[2]} left or right of the {m[1]}?", asked
    for image, scene in scenes.items():  # every question of every scene, once, as with one per conversation
        assert kinds[image] == all_questions(scene), image
    assert max(turns) > 1 and np.mean(turns) > 1.3  # questions about different objects share conversations
