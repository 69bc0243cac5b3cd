"""MLLM training step throughput, MFU and peak memory: arms that differ in one thing at a time, same run.

    python benchmarks/mllm_train.py --shape 1.5b                        # GPU: the issue's setting
    python benchmarks/mllm_train.py --shape tiny --steps 1 --seq 256    # CPU smoke

Every arm: Qwen2.5-1.5B shape (random init), vocabulary 151,936 + 196,608 visual ids = 348,544 rows, bf16
on a GPU (fp32 on CPU), AdamW, the same activation checkpointing (--ckpt-every-n), the same attention kernel
(--attn) and the same packed batch: --batch rows of --seq tokens, documents of --doc-len tokens attended
per document (restarting position_ids), every position but each document's first supervised.
  hf_loss        the model body, then transformers' own loss: full [B, T, V] logits + cross-entropy
  chunked        differs in the loss only: our chunked cross-entropy over supervised positions
  chunked_fused  differs from chunked only by Liger-Kernel RMSNorm/RoPE/SwiGLU (CUDA + liger-kernel)
  zero3_engine   the trainer's own setup: built partitioned under the shipped ZeRO-3 config
                 (configs/deepspeed/zero3.json), deepspeed.initialize, engine.backward/step, one process
Every arm reports `loss`, its first step's (before any update), on the same batch: hf_loss, chunked (and
chunked_fused) build the same weights from one seed, so their losses agree unless an arm computes another loss;
zero3_engine's weights are drawn under ZeRO-3's partitioned init, so its loss is only close (tiny on CPU: 8.390
vs 8.376, both near ln 4096 = 8.318).
MFU = training FLOPs / s / peak, FLOPs counted by mllm/flops.py (head on supervised positions only,
attention per document); `mfu_row_formula` is the old 6N + 12 L d T per token figure, for comparison.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import TYPE_CHECKING

import torch

from semhitok.data_pipelines.text_tokenizer import TokenLayout
from semhitok.mllm.config import MLLMConfig
from semhitok.mllm.flops import batch_flops, row_flops

if TYPE_CHECKING:
    from semhitok.mllm.model import SemHiTokLM
# semhitok.mllm.model and .train (transformers) are imported where used: mllm_memory.py's parent process reads
# SHAPES from here and builds no model

SHAPES = {
    "1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=True),
    "tiny": dict(vocab_size=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True),
}
VISUAL = {"1.5b": (16384, 12), "tiny": (256, 12)}  # (K, m)
ARMS = ("hf_loss", "chunked", "chunked_fused", "zero3_engine")


def make_model(shape: str, attn: str, device, dtype, grid: int = 16, layers: int = 0) -> SemHiTokLM:
    """The real build path (SemHiTokLM.from_base) with random codes; under mllm.partition.zero3_build: partitioned.
    grid: the image grid (grid**2 ids per image); layers: cut the LLM to this depth (0: the shape's)."""
    from semhitok.mllm.model import SemHiTokLM, load_base_lm

    k, m = VISUAL[shape]
    text = SHAPES[shape]["vocab_size"]
    layout = TokenLayout(text, k * m, 151652 % text, 151653 % text, 151644 % text, 151645 % text, 151643 % text)
    fields = {**SHAPES[shape], **({"num_hidden_layers": layers} if layers else {})}
    cfg = MLLMConfig(base_model="random", base_config=fields, attn_implementation=attn)
    with torch.device(device):  # initialise on the GPU: seconds instead of minutes at 1.5B
        model = SemHiTokLM.from_base(load_base_lm(cfg, dtype), layout, torch.randn(k, 32), torch.randn(k * m, 8), m, grid, cfg)
    return model.to(device)


def packed_batch(model: SemHiTokLM, batch: int, seq: int, doc_len: int, device):
    gen = torch.Generator(device=device).manual_seed(0)  # the same batch in every arm, whatever its model's init drew
    ids = torch.randint(0, model.layout.vocab_size, (batch, seq), device=device, generator=gen)
    pos = (torch.arange(seq, device=device) % doc_len).expand(batch, -1).contiguous()
    return ids, pos, ids.masked_fill(pos == 0, -100)


def timed_steps(step, steps: int, warmup: int, device) -> float:
    """Seconds for `steps` calls of step() after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run_arm(arm: str, args, device, dtype, attn: str) -> dict:
    from semhitok.mllm.model import apply_fused_kernels
    from semhitok.mllm.train import peak_flops

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    out = {}
    engine = keep = None
    if arm == "zero3_engine":
        import deepspeed

        from semhitok.mllm.partition import zero3_build
        from semhitok.mllm.train import setup_distributed

        setup_distributed()
        ds = json.loads(open("configs/deepspeed/zero3.json").read())
        ds.update(train_micro_batch_size_per_gpu=args.batch, gradient_accumulation_steps=1, gradient_clipping=1.0,
                  bf16={"enabled": dtype == torch.bfloat16})
        keep = zero3_build(ds)  # noqa: F841
    model = make_model(args.shape, attn, device, dtype)
    model.enable_activation_checkpointing(args.ckpt_every_n)
    if arm == "chunked_fused":
        out["fused_kernels"] = apply_fused_kernels(model)
        if not out["fused_kernels"]:
            return {"skipped": "needs CUDA and liger-kernel"}
    model.train()
    ids, pos, labels = packed_batch(model, args.batch, args.seq, args.doc_len, device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    if arm == "zero3_engine":
        engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds)

    first_loss = []

    def step():
        if arm == "hf_loss":
            loss = model.lm(inputs_embeds=model.embed(ids), position_ids=pos, labels=labels, use_cache=False).loss
        else:
            loss = (engine or model)(input_ids=ids, position_ids=pos, labels=labels)["loss"]
        if not first_loss:  # before any update (one host sync)
            first_loss.append(loss.item())
        if engine is not None:
            engine.backward(loss)
            engine.step()
        else:
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    try:
        elapsed = timed_steps(step, args.steps, args.warmup, device)
    except torch.OutOfMemoryError:
        return {"oom": True}
    flops = batch_flops(model, pos, labels, torch.ones_like(ids, dtype=torch.bool), ids) * args.steps
    peak = peak_flops()
    out.update(loss=first_loss[0], tokens_per_s=ids.numel() * args.steps / elapsed,
               peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
               tflops_per_s=flops / elapsed / 1e12,
               mfu=flops / elapsed / peak if peak else None,
               mfu_row_formula=row_flops(model, ids.numel(), args.seq) * args.steps / elapsed / peak if peak else None)
    del engine, model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="1.5b", choices=sorted(SHAPES))
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=2, help="packed rows per step")
    ap.add_argument("--doc-len", type=int, default=600, help="document length inside packed rows")
    ap.add_argument("--attn", default=None, help="sdpa | flash_attention_2 | flex_attention (default: flash when installed)")
    ap.add_argument("--ckpt-every-n", type=int, default=1, help="checkpoint every n-th layer (0: off)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    args = ap.parse_args()
    from semhitok.mllm.model import attention_kernel

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    attn = attention_kernel(args.attn or "auto")
    result = {"bench": "mllm_train", "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "shape": args.shape, "attn": attn, "seq": args.seq, "micro_batch": args.batch, "doc_len": args.doc_len,
              "ckpt_every_n": args.ckpt_every_n, "dtype": str(dtype).removeprefix("torch.")}
    for arm in args.arms:
        result[arm] = run_arm(arm, args, device, dtype, attn)
    ref = result.get("hf_loss", {})
    for arm in args.arms:
        r = result[arm]
        if arm != "hf_loss" and ref.get("tokens_per_s") and r.get("tokens_per_s"):
            r["speedup_vs_hf_loss"] = r["tokens_per_s"] / ref["tokens_per_s"]
            if ref.get("peak_gib") and r.get("peak_gib"):
                r["memory_ratio_vs_hf_loss"] = r["peak_gib"] / ref["peak_gib"]
    result["targets"] = {"mfu": 0.40, "memory_ratio": 0.5}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
