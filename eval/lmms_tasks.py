"""lmms-eval tasks that score POPE with semhitok's POPE parser (semhitok.eval.pope), fully offline if need be.

    semhitok_pope        lmms-eval's own `pope` task (its dataset and prompt, by `include:` of its installed
                         YAML) with POPE scoring instead of its exact string match, and answers as long as
                         `semhitok eval` lets them be (MAX_NEW_TOKENS)
    semhitok_pope_local  POPE questions on local images (a POPE jsonl and an image folder)

    python -m semhitok.eval.lmms_tasks --out TASK_DIR [--questions pope.jsonl --image-root IMAGES]
    lmms-eval eval --model semhitok --model_args pretrained=DIR --tasks semhitok_pope --include_path TASK_DIR

`eval/run_lmms.sh` does both (and runs semhitok_pope when asked for `pope`). Both report accuracy, precision,
recall, F1, yes-ratio and the count of unparsed answers as pope_* metrics, computed by pope_metrics: the
numbers `semhitok eval` gives for the same answers.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from PIL import Image

from semhitok.eval.pope import MAX_NEW_TOKENS, POST_PROMPT, load_pope, pope_metrics

TASK, LOCAL_TASK = "semhitok_pope", "semhitok_pope_local"
METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio", "unparsed")


# -- the functions the tasks' YAML names (through the utils.py written beside them) ----------------------
def doc_to_visual(doc: dict) -> list:
    with Image.open(doc["image_path"]) as img:
        return [img.convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return f"{doc['question']}{POST_PROMPT}"


def process_results(doc: dict, results: list[str]) -> dict:
    entry = {"answer": results[0], "label": doc.get("label", doc.get("answer"))}  # local rows: label; lmms-eval's: answer
    return {f"pope_{m}": entry for m in METRICS}


def _aggregate(metric: str):
    def aggregate(entries: list[dict]) -> float:
        value = pope_metrics([e["answer"] for e in entries], [e["label"] for e in entries])[metric]
        return math.nan if value is None else value  # yes_ratio with no parsed answer

    return aggregate


agg_accuracy, agg_precision, agg_recall, agg_f1, agg_yes_ratio, agg_unparsed = (_aggregate(m) for m in METRICS)


def lmms_pope_yaml() -> Path:
    """The installed lmms-eval's `pope` task YAML."""
    import lmms_eval

    path = Path(lmms_eval.__file__).parent / "tasks" / "pope" / "pope.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: lmms-eval has no pope task (pip install -e '.[eval]')")
    return path


def _metric_list() -> str:
    return "\n".join(f"  - metric: pope_{m}\n    aggregation: !function utils.agg_{m}\n    higher_is_better: {str(m != 'unparsed').lower()}"
                     for m in METRICS)


UTILS = ("from semhitok.eval.lmms_tasks import *  # noqa: F401,F403\n"
         f"from semhitok.eval.lmms_tasks import {', '.join(f'agg_{m}' for m in sorted(METRICS))}  # noqa: F401\n")


def write_task(out: str | Path, questions: str | Path | None = None, image_root: str | Path | None = None) -> Path:
    """Write <out>/semhitok_pope/{semhitok_pope.yaml, utils.py} and, with questions, <out>/semhitok_pope_local/
    {semhitok_pope_local.yaml, utils.py, questions.jsonl}; return <out>."""
    out = Path(out).resolve()
    folder = out / TASK
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "utils.py").write_text(UTILS)
    (folder / f"{TASK}.yaml").write_text(f"include: {lmms_pope_yaml()}\ntask: {TASK}\n"
                                         f"generation_kwargs:\n  max_new_tokens: {MAX_NEW_TOKENS}\n  temperature: 0\n  do_sample: false\n"
                                         f"process_results: !function utils.process_results\nmetric_list:\n{_metric_list()}\n")
    if questions is None:
        return out
    folder = out / LOCAL_TASK
    folder.mkdir(parents=True, exist_ok=True)
    rows = load_pope(questions, Path(image_root or ".").resolve())
    with open(folder / "questions.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    (folder / "utils.py").write_text(UTILS)
    (folder / f"{LOCAL_TASK}.yaml").write_text(f"""task: {LOCAL_TASK}
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
  max_new_tokens: {MAX_NEW_TOKENS}
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
{_metric_list()}
metadata:
  version: 0.1
""")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--questions", default=None, help="POPE jsonl (question_id, image | local_image, text, label) for "
                    f"{LOCAL_TASK}; without it only {TASK} is written")
    ap.add_argument("--image-root", default=None)
    args = ap.parse_args()
    print(write_task(args.out, args.questions, args.image_root))


if __name__ == "__main__":
    main()
