"""Text-to-image sampling speed: our decoder against a plain generate-style loop, in the same run.

    python benchmarks/sample.py --shape 1.5b                 # GPU: batch 1 and 64 (the issue's target: >= 4x)
    python benchmarks/sample.py --shape tiny --batches 1 4   # CPU smoke

Random weights at Qwen2.5-1.5B shape with the 348,544-row vocabulary and a 16x16 image (256 ids).
  baseline  what a straightforward loop does: every step re-runs the whole sequence (no KV cache), the
            conditional and unconditional prompts in two separate forward passes, logits over the full
            vocabulary, then CFG and sampling restricted to visual ids
  ours      mllm/sample.py Decoder.image_ids: one batched cond+uncond pass, static KV cache, visual-only logits
  compiled  the same with Decoder(compile=True): the step is one torch.compile graph (CUDA graphs on a
            GPU), compiled in an untimed warm-up call per batch size (--no-compile leaves it out)
Reports images/s and the latency of one batch for each batch size. Prints one JSON line.
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

from semhitok.data_pipelines.text_tokenizer import train_tiny_text_tokenizer  # noqa: E402
from semhitok.mllm.sample import Decoder, SamplingConfig, cfg_mix, filter_logits  # noqa: E402

PROMPT = "a photo of a red bus parked next to a green bicycle on a sunny street"


@torch.no_grad()
def baseline_image_ids(decoder: Decoder, captions: list[str], sampling: SamplingConfig) -> torch.Tensor:
    model, layout = decoder.model, decoder.layout
    device = model.device
    cond = torch.tensor([decoder.builder.generation_prompt(c) for c in captions], device=device)
    uncond = torch.tensor([decoder.builder.generation_prompt(decoder.seq_cfg.uncond_prompt)] * len(captions), device=device)
    gen = torch.Generator(device=device).manual_seed(sampling.seed)
    lo = layout.visual_offset
    for _ in range(model.image_grid**2):
        logits_c = model.logits(model.hidden_states(cond).last_hidden_state[:, -1])
        logits_u = model.logits(model.hidden_states(uncond).last_hidden_state[:, -1])
        logits = cfg_mix(logits_c[:, lo:], logits_u[:, lo:], sampling.cfg_scale)
        token = torch.multinomial(filter_logits(logits, sampling.temperature, sampling.top_k, sampling.top_p).exp(), 1, generator=gen) + lo
        cond, uncond = torch.cat([cond, token], 1), torch.cat([uncond, token], 1)
    return cond[:, -model.image_grid**2 :] - lo


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
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = make_model(args.shape, "sdpa", device, dtype).eval()
    text_tok = train_tiny_text_tokenizer([PROMPT] * 4, vocab_size=300)  # prompt tokens only; the shape is what matters
    decoder = Decoder(model, text_tok)
    compiled = None if args.no_compile else Decoder(model, text_tok, compile=True)
    sampling = SamplingConfig(cfg_scale=4.0, temperature=1.0, top_k=0, top_p=1.0, seed=0)
    result = {"bench": "sample", "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "shape": args.shape, "ids_per_image": model.image_grid**2, "results": []}
    decoder.image_ids([PROMPT], sampling)  # warm-up
    for b in args.batches:
        captions = [PROMPT] * b
        ours = timed(lambda c=captions: decoder.image_ids(c, sampling), device)
        base = timed(lambda c=captions: baseline_image_ids(decoder, c, sampling), device)
        row = {"batch": b, "baseline_latency_s": round(base, 3), "baseline_img_per_s": round(b / base, 3),
               "ours_latency_s": round(ours, 3), "ours_img_per_s": round(b / ours, 3), "speedup": round(base / ours, 2)}
        if compiled is not None:
            try:  # a compiler failure is reported in the JSON line, next to the eager results
                row["compile_s"] = round(timed(lambda c=captions: compiled.image_ids(c, sampling), device), 1)
                fast = timed(lambda c=captions: compiled.image_ids(c, sampling), device)
            except Exception as err:  # noqa: BLE001
                row["compiled_error"] = f"{type(err).__name__}: {err}"[:500]
            else:
                row.update(compiled_latency_s=round(fast, 3), compiled_img_per_s=round(b / fast, 3),
                           compiled_speedup=round(base / fast, 2))
        result["results"].append(row)
    result["target_speedup"] = 4.0
    print(json.dumps(result))


if __name__ == "__main__":
    main()
