import pytest

from semhitok.eval.pope import load_pope, pope_answer, pope_metrics
from tests.conftest import SHARED_DATA

POPE = SHARED_DATA / "llava_instruct" / "pope_on_shipped_images.jsonl"


@pytest.mark.parametrize("text,expected", [
    ("Yes", "yes"), ("No", "no"), ("no", "no"), ("Yes, there is a dog.", "yes"), ("There is not a dog.", "no"),
    ("No, there is none.", "no"), ("Yes. No dog though.", "yes"),  # only the first sentence counts
    ("NO", "yes"), ("", "yes"),  # POPE's rule is case-sensitive and defaults to yes
])
def test_answers_reduce_to_yes_no_like_popes_evaluate_py(text, expected):
    assert pope_answer(text) == expected


def test_metrics_with_yes_as_the_positive_class():
    labels = ["yes", "yes", "yes", "no", "no", "no", "no", "no"]
    answers = ["Yes", "yes", "No", "Yes", "no", "No.", "no", "not really"]  # TP 2, FN 1, FP 1, TN 4
    m = pope_metrics(answers, labels)
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3) and m["yes_ratio"] == pytest.approx(3 / 8)
    all_no = pope_metrics(["no"] * 4, ["yes", "no", "no", "yes"])
    assert all_no["precision"] == 0.0 and all_no["f1"] == 0.0 and all_no["accuracy"] == 0.5


def test_shared_pope_questions_load_with_their_images():
    rows = load_pope(POPE, SHARED_DATA / "images_captions")
    assert len(rows) == 54 and {r["category"] for r in rows} == {"random", "popular", "adversarial"}
    assert {r["label"] for r in rows} == {"yes", "no"}


def test_missing_images_and_bad_rows_are_named(tmp_path):
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"question_id": 1, "image": "nope.jpg", "text": "Is there a cat?", "label": "no"}\n')
    with pytest.raises(FileNotFoundError, match="q.jsonl:1: image .*nope.jpg"):
        load_pope(bad, tmp_path)
    bad.write_text('{"question_id": 1}\n')
    with pytest.raises(ValueError, match="q.jsonl:1: not a POPE row"):
        load_pope(bad, tmp_path)


def test_shipped_pope_questions_are_popes_own_about_the_shipped_photos():
    import json
    import re

    from tests.conftest import REPO, SAMPLE

    shipped_ids = {int(re.search(r"(\d+)\.jpg$", p.name).group(1)) for p in (SAMPLE / "images").glob("*.jpg")}
    originals = {}
    for category in ("random", "popular", "adversarial"):
        for line in open(SHARED_DATA / "llava_instruct" / "pope_original" / f"coco_pope_{category}.json"):
            q = json.loads(line)
            if int(re.search(r"(\d+)\.jpg$", q["image"]).group(1)) in shipped_ids:
                originals[f"{category}_{q['question_id']}"] = q
    rows = load_pope(REPO / "data" / "eval" / "pope.jsonl", SAMPLE)  # every image exists under data/sample
    assert len(rows) == len(originals) == 18
    for r in rows:
        q = originals[r["question_id"]]
        assert (r["question"], r["label"], r["category"]) == (q["text"], q["label"], r["question_id"].split("_")[0])
        assert re.search(r"(\d+)\.jpg$", q["image"]).group(1).lstrip("0") in r["image_path"]
