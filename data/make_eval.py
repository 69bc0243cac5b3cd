"""Rebuild data/eval/ from ../shared/data: the evaluation data `semhitok eval` ships with.

    python data/make_eval.py [--shared ../shared/data]

- pope.jsonl: every question of POPE's COCO files (random, popular, adversarial; MIT) whose photo is one
  of the shipped, licence-clean photos in data/sample/images (POPE's val2014 id = the COCO 2017 id).
  `local_image` is relative to data/sample.
- geneval_evaluation_metadata.jsonl: GenEval's 553 prompts with their metadata (MIT), unchanged.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

DATA = Path(__file__).resolve().parent
CATEGORIES = ("random", "popular", "adversarial")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=DATA.parents[1] / "shared" / "data")
    ap.add_argument("--out", type=Path, default=DATA / "eval")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    shipped = {int(re.search(r"(\d+)\.jpg$", p.name).group(1)): p for p in (DATA / "sample" / "images").glob("coco_*.jpg")}
    rows = []
    for category in CATEGORIES:
        for line in open(args.shared / "llava_instruct" / "pope_original" / f"coco_pope_{category}.json"):
            row = json.loads(line)
            coco_id = int(re.search(r"(\d+)\.jpg$", row["image"]).group(1))
            if coco_id in shipped:
                rows.append({"question_id": f"{category}_{row['question_id']}", "image": row["image"], "text": row["text"],
                             "label": row["label"], "category": category,
                             "local_image": f"images/{shipped[coco_id].name}"})
    with open(args.out / "pope.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    shutil.copy(args.shared / "llava_instruct" / "pope_original" / "LICENSE_POPE_MIT.txt", args.out / "LICENSE_POPE")
    geneval = args.shared / "prompts" / "geneval"
    shutil.copy(geneval / "geneval_evaluation_metadata.jsonl", args.out / "geneval_evaluation_metadata.jsonl")
    shutil.copy(geneval / "geneval_LICENSE", args.out / "LICENSE_GENEVAL")
    print(f"{len(rows)} POPE questions on {len({r['local_image'] for r in rows})} shipped photo(s); "
          f"{sum(1 for _ in open(args.out / 'geneval_evaluation_metadata.jsonl'))} GenEval prompts -> {args.out}")


if __name__ == "__main__":
    main()
