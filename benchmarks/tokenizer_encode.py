"""Tokenizer encode throughput against the bare SigLIP forward, measured in the same run.

    python benchmarks/tokenizer_encode.py --preset 256 --batch 64        # GPU: the issue's target (>= 0.7x)
    python benchmarks/tokenizer_encode.py --preset 384 --batch 32        # GPU: so400m/14, 27x27 ids
    python benchmarks/tokenizer_encode.py --preset tiny --batch 8         # CPU smoke
    python benchmarks/tokenizer_encode.py --preset 384 --batch 1 --iters 1 --warmup 0 --layers 1   # CPU shape check

Weights are random (no hub here): throughput depends only on shapes. The teacher shape for the 256/384
presets is that of google/siglip-large-patch16-256 / google/siglip-so400m-patch14-384; --layers N cuts the
depth of every transformer (teacher, student, pixel encoder/decoder) to N for a quick shape check (the ratio
is then not the real one).
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import SiglipVisionConfig, SiglipVisionModel

from semhitok.config import load_project_config
from semhitok.tokenizer import SemHiTok

TEACHER_SHAPES = {
    "google/siglip-large-patch16-256": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                            num_attention_heads=16, image_size=256, patch_size=16),
    "google/siglip-so400m-patch14-384": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                             num_attention_heads=16, image_size=384, patch_size=14),
}


def images_per_second(fn, batch: torch.Tensor, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn(batch)
    if batch.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn(batch)
    if batch.is_cuda:
        torch.cuda.synchronize()
    return iters * batch.shape[0] / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="256")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--layers", type=int, default=0, help="cut every transformer to this depth (0: real depth)")
    args = ap.parse_args()

    cfg = load_project_config(args.preset).tokenizer
    if cfg.teacher != "random":
        cfg.siglip_config, cfg.teacher = dict(TEACHER_SHAPES[cfg.teacher]), "random"
    if args.layers:
        cfg.siglip_config = {**cfg.siglip_config, "num_hidden_layers": args.layers}
        for field in [f for f in vars(cfg) if f.startswith("pix_") and f.endswith("_layers")] + ["sem_decoder_layers"]:
            setattr(cfg, field, min(getattr(cfg, field), args.layers))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = SemHiTok(cfg).to(device).eval()
    model.trained_stages = [1, 2]
    siglip = SiglipVisionModel(SiglipVisionConfig.from_dict({**cfg.siglip_config, "vision_use_head": False})).to(device).eval()
    size = model.image_size
    batch = torch.rand(args.batch, 3, size, size, device=device) * 2 - 1
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    @torch.no_grad()
    def bare(x):
        with autocast:
            return siglip(pixel_values=x).last_hidden_state

    baseline = images_per_second(bare, batch, args.iters, args.warmup)
    encode = images_per_second(model.encode, batch, args.iters, args.warmup)
    result = {
        "bench": "tokenizer_encode",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "preset": args.preset,
        "batch": args.batch,
        "image_size": size,
        "ids_per_image": model.grid**2,
        "layers": args.layers or "real",
        "bare_siglip_img_per_s": round(baseline, 2),
        "tokenizer_encode_img_per_s": round(encode, 2),
        "ratio": round(encode / baseline, 3),
        "target_ratio": 0.7,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
