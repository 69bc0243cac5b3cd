import json
import re

import pytest

from semhitok.eval.pope import load_pope, pope_answer, pope_metrics
from tests.conftest import REPO, SAMPLE

SHIPPED = REPO / "data" / "eval" / "pope.jsonl"


@pytest.mark.parametrize("text,expected", [
    ("Yes", "yes"), ("No", "no"), ("no", "no"), ("Yes, there is a dog.", "yes"), ("There is not a dog.", "no"),
    ("No, there is none.", "no"), ("Yes. No dog though.", "yes"),  # only the first sentence counts
    ("NO", "no"), ("yes!", "yes"), ("Yes, but not here", "no"),  # any case, punctuation dropped; a no-word wins
    ("", None), ("A red circle on grey.", None), ("Nothing here", None), ("Sure. Yes.", None),  # says neither
])
def test_answers_reduce_to_yes_no_or_unparsed(text, expected):
    assert pope_answer(text) == expected


def test_metrics_with_yes_as_the_positive_class():
    labels = ["yes", "yes", "yes", "no", "no", "no", "no", "no"]
    answers = ["Yes", "yes", "No", "Yes", "no", "No.", "no", "not really"]  # TP 2, FN 1, FP 1, TN 4
    m = pope_metrics(answers, labels)
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3) and m["yes_ratio"] == pytest.approx(3 / 8) and m["unparsed"] == 0
    all_no = pope_metrics(["no"] * 4, ["yes", "no", "no", "yes"])
    assert all_no["precision"] == 0.0 and all_no["f1"] == 0.0 and all_no["accuracy"] == 0.5


def test_answers_that_say_neither_are_wrong_counted_and_left_out_of_the_yes_ratio():
    # a captioning model: POPE's evaluate.py would call all four yes (accuracy 0.5, yes-ratio 1.0, recall 1.0)
    captions = pope_metrics(["A red circle.", "a dog", "A kitchen.", ""], ["yes", "no", "yes", "no"])
    assert captions["accuracy"] == 0.0 and captions["recall"] == 0.0 and captions["yes_ratio"] is None
    assert captions["unparsed"] == 4 and captions["questions"] == 4
    mixed = pope_metrics(["Yes", "A cat.", "No", "yes"], ["yes", "yes", "no", "no"])  # TP 1, FN 1 (unparsed), TN 1, FP 1
    assert mixed["accuracy"] == pytest.approx(2 / 4) and mixed["recall"] == pytest.approx(1 / 2)
    assert mixed["precision"] == pytest.approx(1 / 2) and mixed["yes_ratio"] == pytest.approx(2 / 3) and mixed["unparsed"] == 1


def test_shipped_pope_questions_load_with_their_photos():
    rows = load_pope(SHIPPED, SAMPLE)  # every image exists under data/sample
    assert len(rows) == 18 and {r["category"] for r in rows} == {"random", "popular", "adversarial"}
    assert {r["label"] for r in rows} == {"yes", "no"}


def test_missing_images_and_bad_rows_are_named(tmp_path):
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"question_id": 1, "image": "nope.jpg", "text": "Is there a cat?", "label": "no"}\n')
    with pytest.raises(FileNotFoundError, match="q.jsonl:1: image .*nope.jpg"):
        load_pope(bad, tmp_path)
    bad.write_text('{"question_id": 1}\n')
    with pytest.raises(ValueError, match="q.jsonl:1: not a POPE row"):
        load_pope(bad, tmp_path)


def test_shipped_pope_rows_keep_popes_fields_and_name_their_own_photo():
    # data/make_eval.py builds the file from POPE's COCO files (the data share, absent from a user's clone): each
    # row keeps POPE's image name, text and label; the added category and local photo must agree with them
    raw = [json.loads(line) for line in open(SHIPPED)]
    rows = {r["question_id"]: r for r in load_pope(SHIPPED, SAMPLE)}
    assert len(raw) == len(rows) == 18
    for q in raw:
        category, _, number = q["question_id"].partition("_")
        assert category == q["category"] and number.isdigit() and q["label"] in ("yes", "no")
        assert re.fullmatch(r"COCO_val2014_\d{12}\.jpg", q["image"])  # POPE's own name for the photo
        coco_id = re.search(r"(\d+)\.jpg$", q["image"]).group(1)
        assert q["local_image"] == f"images/coco_{coco_id}.jpg"  # val2014 id = the 2017 id of the shipped photo
        r = rows[q["question_id"]]
        assert (r["question"], r["label"], r["category"]) == (q["text"], q["label"], category)
        assert r["image_path"].endswith(q["local_image"])
