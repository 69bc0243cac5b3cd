"""POPE (object hallucination, Li et al. 2023): the one answer parser and scorer of every POPE path.

`semhitok eval` (run_pope), the local lmms-eval task semhitok_pope_local and semhitok_pope (lmms-eval's own
`pope` data and prompt; eval/lmms_tasks.py) all score with pope_metrics, so the same answers give the same
numbers everywhere.

An answer is reduced as POPE's evaluate.py does, with one difference: keep the first sentence, drop
punctuation, split into lower-cased words; "no" or "not" among them means no, else "yes" among them means yes,
else the answer is unparsed. (evaluate.py counts an answer that says neither as yes, which gives a captioning
model a yes-ratio of 1.0 and recall 1.0; lmms-eval's built-in task compares the raw lower-cased answer with
the label, so "Yes." is wrong there.) An unparsed answer counts as wrong in accuracy and as a non-yes in
precision and recall; yes_ratio is the share of yes among parsed answers (None when none parsed), and
`unparsed` counts the rest.

Questions file: POPE jsonl rows {"question_id", "image" | "local_image", "text", "label", "category"}.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from tqdm import tqdm

from semhitok.common.io import loads_json
from semhitok.tokenizer import encode_images, load_rgb

POST_PROMPT = "\nAnswer the question using a single word or phrase."  # LLaVA-1.5's POPE prompt
MAX_NEW_TOKENS = 16  # every POPE path cuts answers here, so all read the same first sentence
NO_WORDS, YES_WORDS = {"no", "not"}, {"yes"}


def pope_answer(text: str) -> str | None:
    """A free-form answer -> 'yes' | 'no' | None (says neither), read from its first sentence."""
    words = set(re.findall(r"[a-z]+", text.split(".")[0].lower()))
    return "no" if words & NO_WORDS else "yes" if words & YES_WORDS else None


def pope_metrics(answers: list[str], labels: list[str]) -> dict:
    """Free-form answers and yes/no labels -> accuracy, precision, recall, f1 (yes positive), yes_ratio over
    the parsed answers (None when none parsed), unparsed (answers saying neither), questions."""
    if len(answers) != len(labels) or not answers:
        raise ValueError(f"need equally many answers and labels, got {len(answers)} and {len(labels)}")
    pred = [pope_answer(a) for a in answers]
    gold = [label.strip().lower() if isinstance(label, str) else label for label in labels]
    if (bad := next((i for i, g in enumerate(gold) if g not in ("yes", "no")), None)) is not None:
        raise ValueError(f"label {bad}: must be \"yes\" or \"no\", got {labels[bad]!r:.80}")
    tp = sum(p == "yes" and g == "yes" for p, g in zip(pred, gold))
    fp = sum(p == "yes" and g != "yes" for p, g in zip(pred, gold))
    fn = sum(p != "yes" and g == "yes" for p, g in zip(pred, gold))  # an unparsed answer misses a yes
    parsed = [p for p in pred if p is not None]
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {"accuracy": sum(p == g for p, g in zip(pred, gold)) / len(pred), "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "yes_ratio": parsed.count("yes") / len(parsed) if parsed else None,
            "unparsed": len(pred) - len(parsed), "questions": len(pred)}


def load_pope(questions: str | Path, image_root: str | Path) -> list[dict]:
    """POPE jsonl -> rows {question_id, question, label, category, image_path}; images must exist."""
    questions, image_root = Path(questions), Path(image_root)
    rows = []
    for n, line in enumerate(questions.read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = loads_json(line, f"{questions}:{n}")
        if not isinstance(row, dict):
            raise ValueError(f"{questions}:{n}: not a POPE row (a JSON object), got a {type(row).__name__}")
        try:
            image = image_root / row.get("local_image", row["image"])
            rows.append({"question_id": row["question_id"], "question": row["text"], "label": row["label"],
                         "category": row.get("category", ""), "image_path": str(image)})
        except (KeyError, TypeError) as err:
            raise ValueError(f"{questions}:{n}: not a POPE row ({type(err).__name__}: {err})") from None
        label = row["label"]
        if not isinstance(label, str) or label.strip().lower() not in ("yes", "no"):
            raise ValueError(f"{questions}:{n}: label must be \"yes\" or \"no\", got {label!r:.80}")
        rows[-1]["label"] = label.strip().lower()
        if not isinstance(row["text"], str):
            raise ValueError(f"{questions}:{n}: text must be a string, got {row['text']!r:.80}")
        if not image.is_file():
            raise FileNotFoundError(f"{questions}:{n}: image {image} not found (image_root={image_root})")
    return rows


@torch.no_grad()
def run_pope(decoder, visual, rows: list[dict], max_new_tokens: int = MAX_NEW_TOKENS) -> dict:
    """Answer every question greedily about its image (padded to square or centre-cropped, as the model's
    data.understanding_image says) -> metrics (overall and per category) + answers."""
    from semhitok.mllm.config import SamplingConfig

    ids_of: dict[str, torch.Tensor] = {}
    answers = []
    for row in tqdm(rows, desc="pope", unit="q", dynamic_ncols=True):
        if row["image_path"] not in ids_of:
            img = load_rgb(row["image_path"])
            if img is None:
                raise ValueError(f"question {row['question_id']}: {row['image_path']} is not a readable image")
            ids_of[row["image_path"]] = encode_images(visual, [img], decoder.seq_cfg.understanding_image)[0]
        turn = [("user", f"<image>\n{row['question']}{POST_PROMPT}")]
        answers.append(decoder.answer(turn, ids_of[row["image_path"]], SamplingConfig(temperature=0.0), max_new_tokens))
    result = pope_metrics(answers, [r["label"] for r in rows])
    for category in sorted({r["category"] for r in rows} - {""}):
        picked = [i for i, r in enumerate(rows) if r["category"] == category]
        result[category] = pope_metrics([answers[i] for i in picked], [rows[i]["label"] for i in picked])
    result["answers"] = [{"question_id": r["question_id"], "answer": a} for r, a in zip(rows, answers)]
    return result
