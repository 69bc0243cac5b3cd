"""POPE (object hallucination, Li et al. 2023) with the original repository's scoring.

Answers are reduced to yes/no exactly as POPE's evaluate.py does: keep the first sentence, drop commas,
split on spaces; "No", "no" or "not" among the words means no, anything else yes. Then accuracy,
precision, recall, F1 with yes as the positive class, and yes-ratio = share of predicted yes.
(lmms-eval's built-in `pope` task compares raw lower-cased answers instead; the local task here uses
POPE's own reduction, so "No, there is not." counts as no.)

Questions file: POPE jsonl rows {"question_id", "image" | "local_image", "text", "label", "category"}.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm import tqdm

from semhitok.tokenizer import encode_images, load_rgb

POST_PROMPT = "\nAnswer the question using a single word or phrase."  # LLaVA-1.5's POPE prompt


def pope_answer(text: str) -> str:
    """A free-form answer -> 'yes' | 'no' (POPE's evaluate.py)."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_metrics(answers: list[str], labels: list[str]) -> dict:
    """Free-form answers and yes/no labels -> accuracy, precision, recall, f1, yes_ratio (yes positive)."""
    if len(answers) != len(labels) or not answers:
        raise ValueError(f"need equally many answers and labels, got {len(answers)} and {len(labels)}")
    pred = [pope_answer(a) == "yes" for a in answers]
    gold = [label.strip().lower() == "yes" for label in labels]
    tp = sum(p and g for p, g in zip(pred, gold))
    tn = sum(not p and not g for p, g in zip(pred, gold))
    fp = sum(p and not g for p, g in zip(pred, gold))
    fn = sum(not p and g for p, g in zip(pred, gold))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {"accuracy": (tp + tn) / len(pred), "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "yes_ratio": sum(pred) / len(pred), "questions": len(pred)}


def load_pope(questions: str | Path, image_root: str | Path) -> list[dict]:
    """POPE jsonl -> rows {question_id, question, label, category, image_path}; images must exist."""
    questions, image_root = Path(questions), Path(image_root)
    rows = []
    for n, line in enumerate(questions.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            image = image_root / row.get("local_image", row["image"])
            rows.append({"question_id": row["question_id"], "question": row["text"], "label": row["label"],
                         "category": row.get("category", ""), "image_path": str(image)})
        except (json.JSONDecodeError, KeyError) as err:
            raise ValueError(f"{questions}:{n}: not a POPE row ({type(err).__name__}: {err})") from None
        if not image.is_file():
            raise FileNotFoundError(f"{questions}:{n}: image {image} not found (image_root={image_root})")
    return rows


@torch.no_grad()
def run_pope(decoder, visual, rows: list[dict], max_new_tokens: int = 16) -> dict:
    """Answer every question greedily about its image (padded to square or centre-cropped, as the model's
    data.understanding_image says) -> metrics (overall and per category) + answers."""
    from semhitok.mllm.sample import SamplingConfig

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
