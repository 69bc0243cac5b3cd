"""Rebuild data/sample/ from ../shared/data: only photos under CC BY 2.0, CC BY-SA 2.0 or "no known
copyright restrictions" (COCO licence ids 4, 5, 7), resized, with per-image attribution.

    python data/make_sample.py [--shared ../shared/data]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image

SHORT_SIDE = 384  # enough for the 384 px preset
HOLDOUT = 12  # the last 12 val2017 photos (by COCO id) are held out for reconstruction metrics
INSTRUCTIONS = [  # written for this project
    "Describe this photo in one sentence.",
    "What does this picture show?",
    "Give a short caption for the image.",
    "Summarize the scene in a few words.",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "sample")
    args = ap.parse_args()
    src = args.shared / "images_captions"
    rows = {json.loads(l)["image"]: json.loads(l) for l in open(src / "captions.jsonl")}
    keep = sorted((json.loads(l)["image"] for l in open(src / "captions_open_license.jsonl")), key=lambda p: rows[p]["coco_id"])
    (args.out / "images").mkdir(parents=True, exist_ok=True)
    val = [p for p in keep if "val2017" in p]
    holdout = set(val[-HOLDOUT:])
    samples, attribution = [], []
    for n, rel in enumerate(keep):
        row = rows[rel]
        assert row["image_license_id"] in (4, 5, 7), rel
        name = f"images/coco_{row['coco_id']:012d}.jpg"
        with Image.open(src / rel) as img:
            img = img.convert("RGB")
            scale = SHORT_SIDE / min(img.size)
            img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC)
            img.save(args.out / name, quality=90)
        samples.append({
            "image": name, "caption": row["caption"], "captions": row["captions"], "coco_id": row["coco_id"],
            "split": "holdout" if rel in holdout else "train",
        })
        attribution.append(f"| `{name}` | COCO 2017 id {row['coco_id']} | {row['flickr_url']} | "
                           f"[{row['image_license']}]({row['image_license_url'].replace(chr(92) + '/', '/')}) | resized to {SHORT_SIDE} px short side |")
    with open(args.out / "captions.jsonl", "w") as f:
        f.writelines(json.dumps(s) + "\n" for s in samples)
    for split in ("train", "holdout"):
        with open(args.out / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps({"image": s["image"], "caption": s["caption"]}) + "\n" for s in samples if s["split"] == split)
    # Text-only corpus: the remaining COCO captions of each training photo as one paragraph (no image).
    with open(args.out / "text.jsonl", "w") as f:
        f.writelines(json.dumps({"text": " ".join(c.strip() for c in s["captions"][2:])}) + "\n" for s in samples if s["split"] == "train")
    conversations = [
        {"id": f"coco_{s['coco_id']}", "image": s["image"], "conversations": [
            {"from": "human", "value": f"<image>\n{INSTRUCTIONS[i % len(INSTRUCTIONS)]}"},
            {"from": "gpt", "value": s["caption"]},
            {"from": "human", "value": "Say it another way."},
            {"from": "gpt", "value": s["captions"][1]},
        ]}
        for i, s in enumerate(samples) if s["split"] == "train"
    ]
    (args.out / "llava.json").write_text(json.dumps(conversations, indent=1) + "\n")
    header = (
        "# Attribution of the shipped sample\n\n"
        "Photos: MS-COCO 2017 (via the COCO-MINI and tiny_coco_dataset GitHub snapshots), only those whose Flickr\n"
        "licence allows redistribution with modification: CC BY 2.0, CC BY-SA 2.0, or no known copyright\n"
        "restrictions. Each was resized (bicubic) and re-encoded as JPEG quality 90; nothing else changed.\n"
        "CC BY-SA photos keep their licence in this modified form.\n\n"
        "Captions (`caption`, `captions`, the answers in `llava.json`, the paragraphs in `text.jsonl`): COCO annotations, CC BY 4.0\n"
        "(cocodataset.org, Lin et al. 2014). The instruction sentences in `llava.json` were written for this project.\n\n"
        "Built by `data/make_sample.py`.\n\n| file | source | original | licence | change |\n|---|---|---|---|---|\n"
    )
    (args.out / "ATTRIBUTION.md").write_text(header + "\n".join(attribution) + "\n")
    print(f"{len(samples)} photos ({len(holdout)} held out) -> {args.out}")


if __name__ == "__main__":
    main()
