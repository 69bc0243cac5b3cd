"""The shipped POPE questions as lmms-eval's own `pope` task reads them, offline.

lmms-eval's `pope` task (its YAML, installed with lmms-eval) loads the Hub dataset named by its
`dataset_path` (lmms-eval 0.7: lmms-lab-encoder/POPE; schema question_id, question, answer, image_source,
image, category; split `test`). With HF_DATASETS_OFFLINE / HF_HUB_OFFLINE set, `datasets.load_dataset`
cannot reach the Hub and falls back to its own cache: <HF_DATASETS_CACHE>/<namespace>___<name>/<config>/
<version>/<hash>/ (arrow files + dataset_info.json). This module writes the shipped questions there, in the
Hub dataset's schema, with datasets' own Parquet builder, so the unmodified task runs offline:

    python -m semhitok.eval.lmms_datasets --cache DIR
    HF_DATASETS_CACHE=DIR HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 \\
        lmms-eval eval --model semhitok --model_args pretrained=MODEL --tasks pope

(`LMMS_DATA=shipped bash eval/run_lmms.sh MODEL pope` does both.) For the real benchmark, leave
HF_DATASETS_CACHE alone and let lmms-eval download the dataset (or pre-download it on a connected machine).
"""

from __future__ import annotations

import argparse
import re
import shutil
import tempfile
from pathlib import Path

import datasets
from datasets import Features, Image, Value
from datasets.naming import camelcase_to_snakecase
from datasets.packaged_modules.parquet.parquet import Parquet

from semhitok.common.resources import shipped
from semhitok.eval.pope import load_pope

POPE_FEATURES = Features({"question_id": Value("string"), "question": Value("string"), "answer": Value("string"),
                          "image_source": Value("string"), "image": Image(), "category": Value("string")})
SHIPPED_HASH = "semhitok_shipped"  # the cache entry's hash folder: marks it as ours, replaced on rebuild


def task_dataset_path(task: str) -> str:
    """The Hub dataset an installed lmms-eval task loads (`dataset_path` in its YAML)."""
    import lmms_eval

    yaml_file = Path(lmms_eval.__file__).parent / "tasks" / task / f"{task}.yaml"
    match = re.search(r"^dataset_path:\s*(\S+)", yaml_file.read_text(), re.M) if yaml_file.is_file() else None
    if match is None:
        raise FileNotFoundError(f"{yaml_file}: no dataset_path (is lmms-eval installed? pip install -e '.[eval]')")
    return match.group(1)


def pope_rows(questions: str | Path, image_root: str | Path) -> list[dict]:
    """POPE jsonl (semhitok.eval.pope format) -> rows in the Hub dataset's schema, image bytes inlined."""
    return [{"question_id": str(r["question_id"]), "question": r["question"], "answer": r["label"],
             "image_source": Path(r["image_path"]).stem, "image": {"bytes": Path(r["image_path"]).read_bytes(), "path": Path(r["image_path"]).name},
             "category": r["category"]} for r in load_pope(questions, image_root)]


def write_cached_dataset(cache: str | Path, repo_id: str, split: str, rows: list[dict], features: Features) -> Path:
    """rows -> the entry `datasets.load_dataset(repo_id)` finds offline in `cache` (config `default`)."""
    cache = Path(cache).resolve()
    namespace, name = repo_id.split("/")
    with tempfile.TemporaryDirectory(dir=cache.parent if cache.parent.exists() else None) as tmp:
        parquet = Path(tmp) / f"{split}.parquet"
        datasets.Dataset.from_list(rows, features=features).to_parquet(str(parquet))
        # Built without repo_id (datasets checks that data files lie inside the repo), then moved to the
        # <namespace>___<name> folder a Hub download would have written.
        builder = Parquet(cache_dir=str(Path(tmp) / "build"), dataset_name=name, config_name="default", config_id="default",
                          hash=SHIPPED_HASH, data_files={split: [str(parquet)]}, features=features)
        builder.download_and_prepare()
        built = Path(builder.cache_dir)
        target = cache / f"{namespace}___{camelcase_to_snakecase(name)}" / "default" / built.parent.name / SHIPPED_HASH
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(built), str(target))
    return target


def build_pope(cache: str | Path, questions: str | Path | None = None, image_root: str | Path | None = None) -> Path:
    """The shipped POPE questions (or other POPE jsonl) as lmms-eval's `pope` dataset in `cache`."""
    rows = pope_rows(questions or shipped("data/eval/pope.jsonl"), image_root or shipped("data/sample"))
    return write_cached_dataset(cache, task_dataset_path("pope"), "test", rows, POPE_FEATURES)


BUILDERS = {"pope": build_pope}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True, help="a datasets cache folder (use it as HF_DATASETS_CACHE)")
    ap.add_argument("--tasks", default="pope", help=f"comma-separated; shipped: {', '.join(BUILDERS)}")
    args = ap.parse_args()
    for task in args.tasks.split(","):
        if task not in BUILDERS:
            raise SystemExit(f"lmms_datasets: no shipped data for task {task!r} (shipped: {', '.join(BUILDERS)})")
        print(BUILDERS[task](args.cache))


if __name__ == "__main__":
    main()
