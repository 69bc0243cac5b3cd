"""The Megatron-Core backend's training step beside the ZeRO-3 engine's: tokens/s, MFU and peak memory at one shape.

    torchrun --nproc_per_node 8 benchmarks/megatron_train.py --shape 1.5b --tp 8     # GPU: TP 8
    torchrun --nproc_per_node 8 benchmarks/megatron_train.py --shape 1.5b --tp 2     # TP 2 x DP 4
    python benchmarks/megatron_train.py --shape tiny --steps 1 --warmup 0 --seq 128   # CPU smoke (gloo, one rank)

The model, batch, FLOP count and activation checkpointing (--ckpt-every-n, as megatron's recompute) are
benchmarks/mllm_train.py's (Qwen2.5-1.5B shape, 348,544 vocabulary rows, packed documents of --doc-len tokens, bf16
on a GPU): built once as SemHiTokLM, converted to this rank's TP shard
(mllm/megatron/model.py), stepped by MegatronEngine (mllm/megatron/engine.py: megatron-core's DDP, distributed
optimizer and schedule) on the same --batch rows per DP replica. `loss` is the first step's, before any update: on
CPU it equals mllm_train.py's arms' at the same shape and seed (on a GPU mllm_train.py draws its weights there,
another generator, so the two start from different weights).
MFU = training FLOPs of the whole job / s / (peak x ranks). Rank 0 prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mllm_train import SHAPES, make_model, packed_batch, timed_steps  # noqa: E402

from semhitok.mllm.flops import batch_flops  # noqa: E402
from semhitok.mllm.train import peak_flops  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="1.5b", choices=sorted(SHAPES))
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=2, help="packed rows per step and DP replica")
    ap.add_argument("--doc-len", type=int, default=600)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--ckpt-every-n", type=int, default=1, help="recompute every n-th layer (0: off), as mllm_train.py's")
    args = ap.parse_args()

    from megatron.core import parallel_state

    from semhitok.mllm.megatron.convert import recompute
    from semhitok.mllm.megatron.engine import MegatronEngine
    from semhitok.mllm.megatron.model import from_semhitok
    from semhitok.mllm.megatron.train import init_parallel

    dist = init_parallel(args.tp, 1, seed=0)
    device = torch.device(f"cuda:{dist.local_rank}" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = make_model(args.shape, "sdpa", torch.device("cpu"), torch.float32)  # fp32 master weights; bf16 autocast on GPU
    mg = from_semhitok(model, **recompute(args.ckpt_every_n, model.lm.config.num_hidden_layers)).to(device)
    ids, pos, labels = (t.to(device) for t in packed_batch(model, args.batch, args.seq, args.doc_len, torch.device("cpu")))
    flops = batch_flops(model, pos.cpu(), labels.cpu(), torch.ones_like(ids, dtype=torch.bool).cpu(), ids.cpu())
    del model  # the template: only the converted shard stays
    engine = MegatronEngine(mg, lr=1e-5, adapter_lr=1e-5, weight_decay=0.0, lr_lambda=lambda _: 1.0, grad_clip=1.0,
                            bf16=device.type == "cuda", device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    first = []

    def step():
        (result,) = engine.train_window([{"input_ids": ids, "position_ids": pos, "labels": labels}])
        if not first:
            first.append(result["loss"].item())

    elapsed = timed_steps(step, args.steps, args.warmup, device)
    dp = parallel_state.get_data_parallel_world_size()
    peak = peak_flops()
    result = {"bench": "megatron_train", "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "shape": args.shape, "tp": args.tp, "dp": dp, "ckpt_every_n": args.ckpt_every_n, "seq": args.seq, "micro_batch": args.batch, "doc_len": args.doc_len,
              "loss": first[0], "tokens_per_s": ids.numel() * dp * args.steps / elapsed,
              "tflops_per_s": flops * dp * args.steps / elapsed / 1e12,
              "mfu": flops * dp * args.steps / elapsed / (peak * dist.world_size) if peak else None,
              "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}
    if dist.is_main:
        print(json.dumps(result))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
