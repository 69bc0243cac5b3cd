"""Text-to-image sampling speed: our decoder against a plain generate-style loop, in the same run.

    python benchmarks/sample.py --shape 1.5b                 # GPU: batch 1 and 64 (the issue's target: >= 4x)
    python benchmarks/sample.py --shape tiny --batches 1 4   # CPU smoke
    python benchmarks/sample.py --shape tiny --batches 1 --grid 8 --layers 2 --depth-positions 8   # the test's quick check

Random weights at Qwen2.5-1.5B shape with the 348,544-row vocabulary and a 16x16 image (256 ids); --grid and
--layers shrink the image and the LLM's depth for a quick check (the speedups are then not the real ones).
  baseline  what a straightforward loop does: every step re-runs the whole sequence (no KV cache), the
            conditional and unconditional prompts in two separate forward passes, logits over the full
            vocabulary, then CFG and sampling restricted to visual ids
  cached    the same loop with transformers' KV cache (DynamicCache): one new token per pass, eager
  ours      mllm/sample.py Decoder.image_ids: one batched cond+uncond pass, static KV cache, visual-only logits
  compiled  the same with Decoder(compile=True): the step is one torch.compile graph (CUDA graphs on a
            GPU), compiled in an untimed warm-up call per batch size (--no-compile leaves it out)
  depth     depth codes (DualToken's L = 16 codes per position, groups (8, 8), 16,384 codes per depth, 3-layer
            heads as wide as the LLM): the depth heads' draw of --depth-positions positions for the batch's
            cond+uncond rows, DepthHeads.sample (KV cache over depth) against the loop that re-runs the depth
            transformer over the codes so far for every code (the one before the cache); greedy, so both arms
            must draw the same codes (codes_agree: the share that do)
ours and compiled draw with the same noise from the same weights, and baseline and cached with one seeded
generator from the same logits: in fp32 (CPU) each pair draws the same ids (compiled_ids_agree, cached_ids_agree: the
share of ids that do; in bf16 a last-bit difference may change a draw and every one after it).
Every arm is warmed up at every batch size before it is timed (the loops for --warmup-steps ids: CUDA
kernels and allocator state are then the same for all). Reports images/s and the latency of one batch for
each batch size. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mllm_train import make_model  # noqa: E402

from semhitok.data_pipelines.text_tokenizer import TokenLayout, train_tiny_text_tokenizer  # noqa: E402
from semhitok.mllm.depth_head import DepthHeads  # noqa: E402
from semhitok.mllm.config import SamplingConfig  # noqa: E402
from semhitok.mllm.sample import Decoder, cfg_mix, filter_logits  # noqa: E402

PROMPT = "a photo of a red bus parked next to a green bicycle on a sunny street"


@torch.no_grad()
def baseline_image_ids(decoder: Decoder, captions: list[str], sampling: SamplingConfig, kv_cache: bool = False,
                       steps: int | None = None) -> torch.Tensor:
    """The plain loop, re-running whole sequences (kv_cache False) or feeding one token to a KV cache."""
    model, layout = decoder.model, decoder.layout
    device = model.device
    steps = steps or model.image_grid**2
    cond = torch.tensor([decoder.builder.generation_prompt(c) for c in captions], device=device)
    uncond = torch.tensor([decoder.builder.generation_prompt(decoder.seq_cfg.uncond_prompt)] * len(captions), device=device)
    gen = torch.Generator(device=device).manual_seed(sampling.seed)
    lo = layout.visual_offset
    inputs, caches, out = [cond, uncond], [None, None], []
    for _ in range(steps):
        logits = []
        for i in range(2):  # conditional, unconditional
            if kv_cache:
                o = model.hidden_states(inputs[i], use_cache=True, past_key_values=caches[i])
                caches[i] = o.past_key_values
            else:
                o = model.hidden_states(inputs[i])
            logits.append(model.logits(o.last_hidden_state[:, -1])[:, lo:])
        token = torch.multinomial(filter_logits(cfg_mix(*logits, sampling.cfg_scale), sampling.temperature, sampling.top_k,
                                                sampling.top_p).exp(), 1, generator=gen) + lo
        out.append(token)
        inputs = [token, token] if kv_cache else [torch.cat([x, token], 1) for x in inputs]
    return torch.cat(out, 1) - lo


@torch.no_grad()
def uncached_depth_sample(heads: DepthHeads, hidden: torch.Tensor, pick) -> torch.Tensor:
    """DepthHeads.sample without its cache: every code re-runs the group's transformer over the codes so far."""
    out = torch.empty(hidden.shape[0], len(heads.code_vocab_sizes), dtype=torch.long, device=hidden.device)
    for group, start, n in zip(heads.groups, heads.starts, heads.code_groups):
        for k in range(n):
            feats = group(hidden, out[:, start : start + k])  # [B, k + 1, w]
            out[:, start + k] = pick(group.classifiers[k](feats[:, k]).float(), start + k)
    return out


def depth_arms(d_model: int, rows: int, positions: int, device, dtype) -> dict:
    """Both depth-head draws of `positions` positions for `rows` rows, timed in this run (greedy)."""
    torch.manual_seed(0)
    heads = DepthHeads(d_model, (16384,) * 16, (8, 8), layers=3).to(device, dtype).eval()
    hidden = torch.randn(positions, rows, d_model, device=device, dtype=dtype)

    def greedy(logits: torch.Tensor, l: int) -> torch.Tensor:
        return logits.argmax(-1)

    for fn in (heads.sample, lambda h, p: uncached_depth_sample(heads, h, p)):  # warm-up
        fn(hidden[0], greedy)
    out: dict[str, list[torch.Tensor]] = {"cached": [], "uncached": []}
    cached = timed(lambda: out["cached"].extend(heads.sample(h, greedy) for h in hidden), device)
    uncached = timed(lambda: out["uncached"].extend(uncached_depth_sample(heads, h, greedy) for h in hidden), device)
    agree = (torch.stack(out["cached"]) == torch.stack(out["uncached"])).float().mean().item()
    return {"codes_per_position": 16, "code_groups": [8, 8], "width": heads.spec["width"], "rows": rows, "positions": positions,
            "uncached_s": round(uncached, 3), "cached_s": round(cached, 3), "speedup": round(uncached / cached, 2),
            "codes_agree": agree}


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="1.5b", choices=("1.5b", "tiny"))
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--warmup-steps", type=int, default=4, help="ids generated by each baseline's untimed warm-up")
    ap.add_argument("--depth-positions", type=int, default=256, help="positions drawn by the depth arms (0: leave them out)")
    ap.add_argument("--grid", type=int, default=16, help="image grid: grid**2 ids per image")
    ap.add_argument("--layers", type=int, default=0, help="cut the LLM to this depth (0: the shape's)")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = make_model(args.shape, "sdpa", device, dtype, grid=args.grid, layers=args.layers).eval()
    text_tok = train_tiny_text_tokenizer([PROMPT] * 4, vocab_size=300)  # prompt tokens only; the shape is what matters
    # The prompt is tokenized as one text, so the layout's special ids must be this tokenizer's.
    model.layout = TokenLayout.from_tokenizer(text_tok, model.layout.visual_vocab_size, model.layout.text_vocab_size)
    decoder = Decoder(model, text_tok)
    compiled = None if args.no_compile else Decoder(model, text_tok, compile=True)
    sampling = SamplingConfig(cfg_scale=4.0, temperature=1.0, top_k=0, top_p=1.0, seed=0)
    result = {"bench": "sample", "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "shape": args.shape, "layers": model.lm.config.num_hidden_layers, "ids_per_image": model.image_grid**2,
              "results": []}
    for b in args.batches:
        captions = [PROMPT] * b
        decoder.image_ids(captions, sampling)  # warm-ups at this batch size
        for kv in (False, True):
            baseline_image_ids(decoder, captions, sampling, kv_cache=kv, steps=args.warmup_steps)
        ids = {}  # each arm's ids, kept to compare the pairs that must agree

        def run(arm, fn, c=captions):
            ids[arm] = fn(c).reshape(b, -1)

        ours = timed(lambda: run("ours", lambda c: decoder.image_ids(c, sampling)), device)
        base = timed(lambda: run("baseline", lambda c: baseline_image_ids(decoder, c, sampling)), device)
        cached = timed(lambda: run("cached", lambda c: baseline_image_ids(decoder, c, sampling, kv_cache=True)), device)
        row = {"batch": b, "baseline_latency_s": round(base, 3), "baseline_img_per_s": round(b / base, 3),
               "cached_latency_s": round(cached, 3), "cached_img_per_s": round(b / cached, 3),
               "ours_latency_s": round(ours, 3), "ours_img_per_s": round(b / ours, 3), "speedup": round(base / ours, 2),
               "speedup_vs_cached": round(cached / ours, 2),
               "cached_ids_agree": (ids["cached"] == ids["baseline"]).float().mean().item()}
        print(json.dumps(row), file=sys.stderr, flush=True)  # the eager arms' results, before the compiler's warm-up
        if compiled is not None:
            try:  # a compiler failure is reported in the JSON line, next to the eager results
                row["compile_s"] = round(timed(lambda c=captions: compiled.image_ids(c, sampling), device), 1)  # its warm-up
                fast = timed(lambda: run("compiled", lambda c: compiled.image_ids(c, sampling)), device)
            except Exception as err:  # noqa: BLE001
                row["compiled_error"] = f"{type(err).__name__}: {err}"[:500]
            else:
                row.update(compiled_latency_s=round(fast, 3), compiled_img_per_s=round(b / fast, 3),
                           compiled_speedup=round(base / fast, 2),
                           compiled_ids_agree=(ids["compiled"] == ids["ours"]).float().mean().item())
        if args.depth_positions:
            row["depth"] = depth_arms(model.lm.config.hidden_size, 2 * b, args.depth_positions, device, dtype)
        result["results"].append(row)
    result["target_speedup"] = 4.0
    print(json.dumps(result))


if __name__ == "__main__":
    main()
