"""Peak host memory per rank while building the unified LLM: today's path against ZeRO-3 partitioned building.

    python benchmarks/mllm_memory.py --shape 1.5b --nproc 2 --old-layers 1 3   # CPU, 2 ranks (gloo)
    python benchmarks/mllm_memory.py --shape tiny --nproc 2 --old-layers 1 2 --jobs 2   # smoke

Same shape in both arms (Qwen2.5-1.5B config by default: hidden 1536, 28 layers, 12/2 heads, intermediate
8960, 151,936 text + 196,608 visual rows, tied), random weights, the real build steps:
  old  what the trainer did before: every rank builds the whole model in fp32 (transformers from_config),
       resize_token_embeddings to 348,544 rows, a full-size head wrapper, then the visual head rows. Run in
       one process (the figure is per rank: every rank did the same) at the cut depths --old-layers, and
       extrapolated linearly per layer to the full depth (building it at full depth needs ~9.4 GiB).
  new  SemHiTokLM.from_base under mllm.partition.zero3_build (deepspeed.zero.Init via transformers), bf16,
       --nproc ranks on gloo: each rank holds its shard, plus one module/gathered matrix at a time.
  loss one chunk of the chunked cross-entropy (--loss-chunk tokens x the full vocabulary, bf16, forward +
       backward) in its own process: peak RSS above the inputs, less the head gradient, per logit.
Peak RSS is each process's ru_maxrss (includes ~0.5 GiB of imported libraries), so the old arm's processes may
run side by side (--jobs; at 1.5B each holds several GiB). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mllm_train import SHAPES, VISUAL  # noqa: E402

from semhitok.common.dist import free_port  # noqa: E402
from semhitok.data_pipelines.text_tokenizer import TokenLayout  # noqa: E402
from semhitok.mllm.config import MLLMConfig  # noqa: E402

# the model's modules (transformers) are imported by the workers that build it, not by the parent process


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def parts(shape: str, layers: int | None):
    k, m = VISUAL[shape]
    fields = {**SHAPES[shape], **({"num_hidden_layers": layers} if layers else {})}
    text = fields["vocab_size"]
    layout = TokenLayout(text, k * m, 151652 % text, 151653 % text, 151644 % text, 151645 % text, 151643 % text)
    cfg = MLLMConfig(base_model="random", base_config=fields, attn_implementation="sdpa")
    return cfg, layout, torch.randn(k, 32), torch.randn(k * m, 8), m


def old_arm(shape: str, layers: int) -> dict:
    """The pre-ZeRO-Init build, step for step (fp32, full model in this process)."""
    from semhitok.mllm.model import SemHiTokLM, VisualAdapter, load_base_lm
    from semhitok.tokenizer.interface import IdStructure
    from semhitok.tokenizer.semhitok.model import SemHiTokFeatures

    cfg, layout, sem, pix, m = parts(shape, layers)
    lm = load_base_lm(cfg, torch.float32)
    lm.resize_token_embeddings(layout.vocab_size, mean_resizing=False)
    full_head = torch.nn.Linear(lm.config.hidden_size, layout.vocab_size, bias=False)  # the old wrapper's own weight
    del full_head
    d = lm.config.hidden_size
    ids = IdStructure("semhitok", 16, (layout.visual_vocab_size,), (1,))
    model = SemHiTokLM(lm, VisualAdapter(SemHiTokFeatures(sem, pix, m), d, d), layout, cfg, ids)
    with torch.no_grad():  # the old _init_visual_head_rows, on the full head
        weight = model.lm.lm_head.weight
        text_norm = weight[: layout.text_vocab_size].norm(dim=1).mean()
        for start in range(0, layout.visual_vocab_size, 65536):
            ids = torch.arange(start, min(start + 65536, layout.visual_vocab_size))
            rows = model.adapter(ids).float()
            weight[layout.visual_offset + ids] = rows / rows.norm(dim=1, keepdim=True) * text_norm
    return {"layers": layers, "peak_rss_gib": round(peak_rss_gib(), 3), "params": sum(p.numel() for p in model.parameters())}


def new_arm(shape: str) -> dict:
    from semhitok.mllm.flops import numel
    from semhitok.mllm.model import SemHiTokLM, load_base_lm
    from semhitok.mllm.partition import zero3_build
    from semhitok.mllm.train import setup_distributed

    info = setup_distributed()
    ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}, "bf16": {"enabled": True}}
    keep = zero3_build(ds)  # noqa: F841
    torch.manual_seed(0)
    cfg, layout, sem, pix, m = parts(shape, None)
    model = SemHiTokLM.from_base(load_base_lm(cfg, torch.bfloat16), layout, sem, pix, m, 16, cfg)
    local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())  # this rank's shard
    rows = model.lm.get_input_embeddings().weight.ds_shape[0]
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    return {"rank": info.rank, "peak_rss_gib": round(peak_rss_gib(), 3), "local_params": local,
            "params": sum(numel(p) for p in model.parameters()), "input_rows": rows, "dtypes": dtypes}


def current_rss_gib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def loss_arm(shape: str, chunk: int) -> dict:
    from semhitok.mllm.loss import chunked_cross_entropy, logit_bytes

    k, m = VISUAL[shape]
    vocab, d = SHAPES[shape]["vocab_size"] + k * m, SHAPES[shape]["hidden_size"]
    weight = torch.empty(vocab, d, dtype=torch.bfloat16).normal_().requires_grad_()  # filled in place: no temporaries
    hidden = torch.empty(chunk, d, dtype=torch.bfloat16).normal_().requires_grad_()
    targets = torch.randint(0, vocab, (chunk,))
    before = current_rss_gib()
    chunked_cross_entropy(hidden, weight, targets, chunk).sum().backward()
    transient = (peak_rss_gib() - before) * 2**30 - weight.numel() * 2  # less the head gradient [V, d] bf16
    return {"chunk": chunk, "vocab": vocab, "transient_gib": round(transient / 2**30, 3),
            "bytes_per_logit": round(transient / (chunk * vocab), 2), "model_bytes_per_logit": logit_bytes(torch.bfloat16)}


def run_json(cmd: list[str], env: dict) -> list[dict]:
    """Run worker(s) writing one JSON file each -> their rows."""
    return run_jsons([cmd], env, 1)[0]


def run_jsons(cmds: list[list[str]], env: dict, jobs: int) -> list[list[dict]]:
    """run_json of every command, up to `jobs` at a time -> their rows, in the commands' order."""
    rows: list[list[dict]] = []
    for i in range(0, len(cmds), jobs):
        with tempfile.TemporaryDirectory() as tmp:
            outs = [Path(tmp) / str(j) for j in range(len(cmds[i : i + jobs]))]
            procs = []
            for cmd, out in zip(cmds[i : i + jobs], outs):
                out.mkdir()
                procs.append((cmd, subprocess.Popen([*cmd, "--out", str(out)], stdout=subprocess.DEVNULL,
                                                    stderr=subprocess.PIPE, text=True, env=env)))
            for (cmd, proc), out in zip(procs, outs):
                _, err = proc.communicate()
                if proc.returncode:
                    raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
                rows.append([json.loads(p.read_text()) for p in sorted(out.glob("*.json"))])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="1.5b", choices=sorted(SHAPES))
    ap.add_argument("--nproc", type=int, default=2, help="ranks of the new arm (0: skip it)")
    ap.add_argument("--old-layers", type=int, nargs="*", default=[1, 3], help="cut depths for the old arm (none: skip it)")
    ap.add_argument("--loss-chunk", type=int, default=0, help="also measure one loss chunk of this many tokens")
    ap.add_argument("--jobs", type=int, default=1, help="old-arm processes run at a time")
    ap.add_argument("--worker", choices=("old", "new", "loss"), help=argparse.SUPPRESS)
    ap.add_argument("--layers", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        row = {"old": lambda: old_arm(args.shape, args.layers), "new": lambda: new_arm(args.shape),
               "loss": lambda: loss_arm(args.shape, args.loss_chunk)}[args.worker]()
        (Path(args.out) / f"{args.worker}{row.get('rank', args.layers)}.json").write_text(json.dumps(row))
        return

    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    here = str(Path(__file__).resolve())
    full = SHAPES[args.shape]["num_hidden_layers"]
    result = {"bench": "mllm_memory", "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "shape": args.shape, "layers": full, "nproc": args.nproc}
    old = [rows[0] for rows in run_jsons([[sys.executable, here, "--worker", "old", "--shape", args.shape, "--layers", str(n)]
                                          for n in args.old_layers], env, max(args.jobs, 1))]
    if old:
        result["old"] = {"dtype": "float32", "cut_depths": old}
        if len(old) >= 2:
            per_layer = (old[-1]["peak_rss_gib"] - old[0]["peak_rss_gib"]) / (old[-1]["layers"] - old[0]["layers"])
            result["old"].update(per_layer_gib=round(per_layer, 3),
                                 peak_rss_gib_per_rank=round(old[0]["peak_rss_gib"] + per_layer * (full - old[0]["layers"]), 3))
    if args.nproc:
        port = free_port()
        ranks = run_json([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc), "--master_port",
                          str(port), here, "--worker", "new", "--shape", args.shape], env)
        ranks.sort(key=lambda r: r["rank"])
        result["new"] = {"dtype": "bfloat16", "ranks": ranks, "peak_rss_gib_per_rank": max(r["peak_rss_gib"] for r in ranks)}
    if args.loss_chunk:
        result["loss"] = run_json([sys.executable, here, "--worker", "loss", "--shape", args.shape, "--loss-chunk", str(args.loss_chunk)], env)[0]
    if "peak_rss_gib_per_rank" in result.get("old", {}) and "new" in result:
        result["ratio"] = round(result["new"]["peak_rss_gib_per_rank"] / result["old"]["peak_rss_gib_per_rank"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
