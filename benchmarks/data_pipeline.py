"""Data pipeline throughput: pre-tokenization end to end, then the packed training loader.

    python benchmarks/data_pipeline.py --preset tiny                   # CPU
    python benchmarks/data_pipeline.py --preset 256 --batch 64         # GPU: pre-tokenization images/s at 256 px

Pre-tokenizes the shipped sample (caption, LLaVA and text sources) with a tokenizer of the preset's shape
(random weights unless --tokenizer DIR is given), and compares its end-to-end images/s (file read, JPEG
decode in DataLoader workers, resize, encode, shard write) with `encode` alone on the same images already
in memory. Then runs the loader over the result and compares packed rows with one document per padded row.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tokenizer_encode import TEACHER_SHAPES  # noqa: E402

from semhitok import RESOURCE_ROOT  # noqa: E402
from semhitok.config import load_project_config  # noqa: E402
from semhitok.data_pipelines.config import SourceConfig  # noqa: E402
from semhitok.data_pipelines.loader import PackedLoader  # noqa: E402
from semhitok.data_pipelines.pretokenize import run_pretokenize  # noqa: E402
from semhitok.data_pipelines.text_tokenizer import TokenLayout, resolve_text_tokenizer  # noqa: E402
from semhitok.tokenizer import SemHiTok, list_images, load_rgb, preprocess  # noqa: E402

SAMPLE = RESOURCE_ROOT / "data" / "sample"  # the repository's, or the installed package's


def random_tokenizer(preset: str, out: Path) -> Path:
    cfg = load_project_config(preset).tokenizer
    if cfg.teacher != "random":
        cfg.siglip_config, cfg.teacher = TEACHER_SHAPES[cfg.teacher], "random"
    model = SemHiTok(cfg)
    model.trained_stages = [1, 2]
    model.save_pretrained(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--tokenizer", default=None, help="a trained tokenizer directory (default: random weights)")
    ap.add_argument("--text-tokenizer", default="tiny", help="HF name/path, or tiny")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2, help="the sample is listed this many times (more images)")
    ap.add_argument("--max-length", type=int, default=4096)
    ap.add_argument("--rows", type=int, default=200, help="packed rows the loader produces")
    args = ap.parse_args()

    cfg = load_project_config(args.preset)
    work = Path(tempfile.mkdtemp(prefix="semhitok-bench-"))
    tok_dir = Path(args.tokenizer) if args.tokenizer else random_tokenizer(args.preset, work / "tokenizer")
    device = "cuda" if torch.cuda.is_available() else "cpu"

    pre = cfg.pretokenize
    pre.sources = [SourceConfig("coco_captions" + (f"_copy{i}" if i else ""), "caption_jsonl", str(SAMPLE / "train.jsonl"))
                   for i in range(args.repeat)]
    pre.sources += [SourceConfig("coco_llava", "llava_json", str(SAMPLE / "llava.json")),
                    SourceConfig("coco_text", "text_jsonl", str(SAMPLE / "text.jsonl"))]
    pre.batch_size, pre.num_workers = args.batch, args.workers
    summary = run_pretokenize(pre, tok_dir, work / "pretokenized", 1, 0, device)

    model = SemHiTok.from_pretrained(tok_dir).to(device).eval()
    paths = list_images([SAMPLE / "train.jsonl"])
    images = preprocess([load_rgb(p) for p in paths], model.image_size).to(device)
    encode_s = []
    with torch.no_grad():
        model.encode(images[: args.batch])  # warm-up
        for _ in range(args.repeat + 1):
            start = time.perf_counter()
            for i in range(0, len(images), args.batch):
                model.encode(images[i : i + args.batch])
            if device == "cuda":
                torch.cuda.synchronize()
            encode_s.append(time.perf_counter() - start)
    encode_only = len(images) / min(encode_s)

    text_tok = resolve_text_tokenizer(args.text_tokenizer, work / "text_tokenizer", SAMPLE)
    layout = TokenLayout.from_tokenizer(text_tok, model.vocab_size)
    data = cfg.data
    data.max_length, data.micro_batch_size = args.max_length, 1
    loader = PackedLoader(data, text_tok, layout, work / "pretokenized")
    start = time.perf_counter()
    for _ in range(args.rows):
        loader.next_batch()
    elapsed = time.perf_counter() - start
    docs = sum(v for k, v in loader.stats.items() if k.startswith("docs_"))
    doc_lengths = [len(loader.next_document()[1]) for _ in range(500)]
    one_per_row = float(np.mean(doc_lengths)) / args.max_length

    print(json.dumps({
        "bench": "data_pipeline",
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "preset": args.preset,
        "pretokenize_images": summary["images"],
        "pretokenize_img_per_s": summary["images_per_s"],
        "baseline_encode_only_img_per_s": round(encode_only, 2),
        "pretokenize_vs_encode_only": round(summary["images_per_s"] / encode_only, 3),
        "loader_samples_per_s": round(docs / elapsed, 1),
        "loader_tokens_per_s": round(loader.stats["tokens"] / elapsed, 1),
        "max_length": args.max_length,
        "packing_efficiency": round(loader.packing_efficiency, 4),
        "baseline_one_document_per_row_efficiency": round(one_per_row, 4),
    }))


if __name__ == "__main__":
    main()
