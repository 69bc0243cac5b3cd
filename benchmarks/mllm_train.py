"""MLLM training step throughput, MFU and peak memory against plain transformers, in the same run.

    python benchmarks/mllm_train.py --shape 1.5b          # GPU: the issue's setting
    python benchmarks/mllm_train.py --shape tiny --steps 2  # CPU smoke

Both arms: Qwen2.5-1.5B shape (random init), vocabulary 151,936 + 196,608 visual ids = 348,544 rows,
bf16 weights, AdamW, activation checkpointing (baseline: every layer; ours: --ckpt-every-n), every position supervised (the worst case for us: real packed
rows supervise fewer positions, and ours only computes the head on supervised ones).
  baseline  Qwen2ForCausalLM(..., labels=...) : full [B, T, V] logits + transformers' loss, seq --base-seq
  ours      SemHiTokLM: adapter inputs, packed rows (documents of --doc-len tokens) with per-document
            attention, chunked cross-entropy, seq --seq
MFU = tokens/s * (6N + 12 L d T) / peak, N counting the LM head. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from semhitok.data_pipelines.text_tokenizer import TokenLayout
from semhitok.mllm.config import MLLMConfig
from semhitok.mllm.model import SemHiTokLM, VisualAdapter, apply_fused_kernels, attention_kernel
from semhitok.mllm.flops import batch_flops, row_flops
from semhitok.mllm.train import peak_flops

SHAPES = {
    "1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=True),
    "tiny": dict(vocab_size=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True),
}
VISUAL = {"1.5b": (16384, 12), "tiny": (256, 12)}  # (K, m)


def make_model(shape: str, attn: str, device, dtype) -> SemHiTokLM:
    k, m = VISUAL[shape]
    text = SHAPES[shape]["vocab_size"]
    layout = TokenLayout(text, k * m, 151652 % text, 151653 % text, 151644 % text, 151645 % text, 151643 % text)
    with torch.device(device):  # initialise on the GPU: seconds instead of minutes at 1.5B
        lm = Qwen2ForCausalLM(Qwen2Config(**{**SHAPES[shape], "vocab_size": layout.vocab_size}, attn_implementation=attn))
        d = lm.config.hidden_size
        adapter = VisualAdapter(torch.randn(k, 32), torch.randn(k * m, 8), m, d, d)
        model = SemHiTokLM(lm, adapter, layout, MLLMConfig(base_model="random", attn_implementation=attn), 16)
    return model.to(device, dtype)


def run_arm(step_fn, model, steps: int, warmup: int, tokens_per_step: int, device) -> dict:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        for i in range(warmup + steps):
            if i == warmup:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
            step_fn().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
    except torch.OutOfMemoryError:
        return {"oom": True}
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"tokens_per_s": tokens_per_step * steps / elapsed, "peak_gib": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="1.5b", choices=sorted(SHAPES))
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=2, help="packed rows per step (ours)")
    ap.add_argument("--base-seq", type=int, default=2048)
    ap.add_argument("--base-batch", type=int, default=4)
    ap.add_argument("--doc-len", type=int, default=600, help="document length inside packed rows")
    ap.add_argument("--attn", default=None, help="ours: sdpa | flash_attention_2 | flex_attention (default: flash when installed)")
    ap.add_argument("--ckpt-every-n", type=int, default=1, help="ours: checkpoint every n-th layer (0: off)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--no-fused", action="store_true", help="ours: leave Liger-Kernel out even when installed")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    attn = attention_kernel(args.attn or "auto")
    torch.manual_seed(0)
    result = {"bench": "mllm_train", "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "shape": args.shape, "attn": attn}
    peak = peak_flops()

    if not args.skip_baseline:
        base = make_model(args.shape, "sdpa", device, dtype)
        base.enable_activation_checkpointing(1)
        base.train()
        V = base.layout.vocab_size
        ids = torch.randint(0, V, (args.base_batch, args.base_seq), device=device)
        fpt = flops_per_token(base, args.base_seq)
        r = run_arm(lambda: base.lm(input_ids=ids, labels=ids, use_cache=False).loss, base, args.steps, args.warmup,
                    ids.numel(), device)
        result["baseline"] = {"seq": args.base_seq, "micro_batch": args.base_batch, **r,
                              "mfu": r["tokens_per_s"] * fpt / peak if peak and "tokens_per_s" in r else None}
        del base, ids
        if device.type == "cuda":
            torch.cuda.empty_cache()

    ours = make_model(args.shape, attn, device, dtype)
    ours.enable_activation_checkpointing(args.ckpt_every_n)
    result["fused_kernels"] = apply_fused_kernels(ours) if not args.no_fused else False
    ours.train()
    V = ours.layout.vocab_size
    ids = torch.randint(0, V, (args.batch, args.seq), device=device)
    pos = (torch.arange(args.seq, device=device) % args.doc_len).expand(args.batch, -1).contiguous()
    labels = ids.masked_fill(pos == 0, -100)
    fpt = flops_per_token(ours, args.seq)
    r = run_arm(lambda: ours(ids, pos, labels)["loss"], ours, args.steps, args.warmup, ids.numel(), device)
    result["ours"] = {"seq": args.seq, "micro_batch": args.batch, **r,
                      "mfu": r["tokens_per_s"] * fpt / peak if peak and "tokens_per_s" in r else None}
    b, o = result.get("baseline", {}), result["ours"]
    if b.get("peak_gib") and o.get("peak_gib"):
        result["memory_ratio"] = o["peak_gib"] / b["peak_gib"]
    if b.get("tokens_per_s") and o.get("tokens_per_s"):
        result["speedup"] = o["tokens_per_s"] / b["tokens_per_s"]
    result["targets"] = {"mfu": 0.40, "memory_ratio": 0.5}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
