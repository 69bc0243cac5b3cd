"""One training run of the Megatron backend on the packed test batches, for tests/mllm/test_megatron_train.py:

    python tests/mllm/megatron_worker.py OUT.json [--tp N] [--steps S] [--save-at K] [--resume] [--ckpt DIR]
    python -m torch.distributed.run --nproc_per_node 2 tests/mllm/megatron_worker.py OUT.json --tp 2   # or --pp 2
    python tests/mllm/megatron_worker.py --jobs '[{"argv": ["OUT.json", "--tp", "2"], "nproc": 2}, ...]'

--jobs runs several such runs side by side from one process: it imports torch, megatron-core and the backend once, then
forks each run's ranks with torchrun's environment (RANK, WORLD_SIZE, MASTER_PORT, ...), so each rank is its own process
on its own gloo group as under torchrun, without paying the ~7 s of imports per process (a third of the tests' time).

A tiny Qwen2 SemHiTokLM (seed 0) converted to Megatron at TP=N and PP=M, the engine's AdamW (the trainer's two groups, clipping),
S steps of 2 micro-batches each (split over the data-parallel replicas: the ranks left over by TP x PP); rank 0 writes {"losses": [...], "grad_norms": [...]} (per step) and eval_loss
(a held-out batch after training); --export writes the weights back in SemHiTokLM's names (safetensors). --save-at K
writes a checkpoint tag after step K into --ckpt; --resume loads the newest tag there first and continues;
--weights-from TAG loads a tag's weights alone (written at any TP) and continues from its step with a fresh optimizer;
--resume-from TAG loads all of a tag written at any TP and PP (weights, the distributed optimizer's state, scheduler).
"""

import argparse
import functools
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: tests.* imports

from tests.mllm.megatron_common import TINY_QWEN2, init_megatron, packed_batch, tiny_semhitok  # noqa: E402
from tests.zygote import fork_ranks, torchrun_env, wait_ranks  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--save-at", type=int, default=0)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--ckpt", default="")
    ap.add_argument("--export", default="", help="write the trained weights, converted back to transformers' names, here")
    ap.add_argument("--weights-from", default="", help="a checkpoint tag: its weights only (any TP), from its step on")
    ap.add_argument("--resume-from", default="", help="a checkpoint tag (any TP and PP): weights, optimizer, scheduler")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    init_megatron(args.tp, args.pp)
    from megatron.core import parallel_state

    from semhitok.mllm.megatron.engine import MegatronEngine
    from semhitok.mllm.megatron.model import from_semhitok

    model = tiny_semhitok(TINY_QWEN2)
    mg = from_semhitok(model)
    engine = MegatronEngine(mg, lr=1e-3, adapter_lr=3e-3, weight_decay=0.01, lr_lambda=lambda step: min(1.0, (step + 1) / 2),
                            grad_clip=1.0, bf16=False, device=torch.device("cpu"))
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    per_rank = 2 // dp  # each step's two micro-batches, split over the data-parallel replicas
    start = 0
    if args.resume:
        tag = sorted(p.name for p in Path(args.ckpt).glob("step*"))[-1]
        _, client = engine.load_checkpoint(args.ckpt, tag)
        start = client["step"]
    if args.resume_from:
        _, client = engine.load_checkpoint(str(Path(args.resume_from).parent), Path(args.resume_from).name)
        start = client["step"]
    if args.weights_from:
        from semhitok.mllm.megatron.engine import load_weights

        load_weights(mg, args.weights_from)
        start = int(Path(args.weights_from).name[4:])
    losses, norms = [], []
    for step in range(start, args.steps):
        results = engine.train_window([packed_batch(mg.layout, seed=10 * step + micro)
                                       for micro in range(dp_rank * per_rank, (dp_rank + 1) * per_rank)])
        total = sum(r["loss"] for r in results) / 2
        torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group())  # the step's mean over replicas
        losses.append(float(total))
        norms.append(engine.get_global_grad_norm())
        if args.save_at and step + 1 == args.save_at:
            engine.save_checkpoint(args.ckpt, f"step{step + 1:08d}", {"step": step + 1})
    with torch.no_grad():  # after training, on a batch it never saw
        eval_loss = float(engine(**packed_batch(mg.layout, seed=999))["loss"])
    if args.export:
        from safetensors.torch import save_file

        from semhitok.mllm.megatron.convert import megatron_to_hf
        from semhitok.mllm.megatron.model import gather_full_state

        full = gather_full_state(mg.gpt)
        if torch.distributed.get_rank() == 0:
            hf = megatron_to_hf(full, model.lm.config, mg.layout.vocab_size)
            hf.pop("lm_head.weight")  # tied
            save_file({**{f"lm.{k}": v for k, v in hf.items()}, **{f"adapter.{k}": v.contiguous() for k, v in mg.adapter.state_dict().items()}},
                      args.export)
    if torch.distributed.get_rank() == 0:
        Path(args.out).write_text(json.dumps({"losses": losses, "grad_norms": norms, "start": start, "eval_loss": eval_loss,
                                              "tp": parallel_state.get_tensor_model_parallel_world_size(),
                                              "pp": parallel_state.get_pipeline_model_parallel_world_size(), "dp": dp}))
    torch.distributed.barrier()
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


def run_rank(job: dict, port: int, rank: int) -> int:
    """One forked rank of a job: torchrun's environment, then the run"""
    os.environ.update(torchrun_env(rank, job["nproc"]), MASTER_PORT=str(port))
    main(job["argv"])
    return 0


def launch(jobs: list[dict]) -> int:
    """Each job {"argv": [...], "nproc": n}: main(argv) on n ranks forked from this process, its gloo group at a port
    of its own; jobs side by side. A failed rank stops its job's other ranks (as torchrun does). -> 0, or 1 naming
    the failed jobs."""
    import megatron.core.dist_checkpointing  # noqa: F401  (what every rank imports, imported once before forking)
    from semhitok.common.dist import free_port
    from semhitok.mllm.megatron import convert, engine, model  # noqa: F401

    status = wait_ranks([fork_ranks(job["nproc"], functools.partial(run_rank, job, free_port())) for job in jobs])
    for job, code in zip(jobs, status, strict=True):
        if code:
            print(f"megatron_worker: job {job['argv']} on {job['nproc']} rank(s) failed ({code})", file=sys.stderr)
    return 1 if any(status) else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--jobs"]:
        sys.exit(launch(json.loads(sys.argv[2])))
    main()
