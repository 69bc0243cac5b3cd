"""A local lmms-eval task over POPE questions on local images: `semhitok_pope_local`, fully offline.

    python -m semhitok.eval.lmms_tasks --out TASK_DIR --questions pope.jsonl --image-root IMAGES
    lmms-eval eval --model semhitok --model_args pretrained=DIR --tasks semhitok_pope_local --include_path TASK_DIR

`eval/run_lmms.sh` does both. The task writes the questions with absolute image paths next to its YAML
and scores with POPE's own formula (semhitok.eval.pope), reporting accuracy, precision, recall, F1 and
yes-ratio as pope_* metrics.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image

from semhitok.eval.pope import POST_PROMPT, load_pope, pope_metrics

TASK = "semhitok_pope_local"
METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


# -- the functions the task's YAML names (through the utils.py written beside it) ------------------------
def doc_to_visual(doc: dict) -> list:
    with Image.open(doc["image_path"]) as img:
        return [img.convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return f"{doc['question']}{POST_PROMPT}"


def process_results(doc: dict, results: list[str]) -> dict:
    entry = {"answer": results[0], "label": doc["label"]}
    return {f"pope_{m}": entry for m in METRICS}


def _aggregate(metric: str):
    def aggregate(entries: list[dict]) -> float:
        return pope_metrics([e["answer"] for e in entries], [e["label"] for e in entries])[metric]

    return aggregate


agg_accuracy, agg_precision, agg_recall, agg_f1, agg_yes_ratio = (_aggregate(m) for m in METRICS)


def write_task(out: str | Path, questions: str | Path, image_root: str | Path) -> Path:
    """Write <out>/semhitok_pope_local/{task.yaml, utils.py, questions.jsonl}; return <out>."""
    out = Path(out).resolve()
    folder = out / TASK
    folder.mkdir(parents=True, exist_ok=True)
    rows = load_pope(questions, Path(image_root).resolve())
    with open(folder / "questions.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    (folder / "utils.py").write_text("from semhitok.eval.lmms_tasks import *  # noqa: F401,F403\n"
                                     "from semhitok.eval.lmms_tasks import agg_accuracy, agg_f1, agg_precision, agg_recall, agg_yes_ratio  # noqa: F401\n")
    metric_list = "\n".join(f"  - metric: pope_{m}\n    aggregation: !function utils.agg_{m}\n    higher_is_better: true" for m in METRICS)
    (folder / f"{TASK}.yaml").write_text(f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / "questions.jsonl"}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: label
generation_kwargs:
  max_new_tokens: 16
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
{metric_list}
metadata:
  version: 0.1
""")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--questions", required=True, help="POPE jsonl (question_id, image | local_image, text, label)")
    ap.add_argument("--image-root", required=True)
    args = ap.parse_args()
    print(write_task(args.out, args.questions, args.image_root))


if __name__ == "__main__":
    main()
