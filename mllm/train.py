"""Train the unified LLM with DeepSpeed (ZeRO-3 by default) on packed understanding/generation/text rows.

    semhitok train --config tiny                                     # 1 process (CPU or one GPU)
    torchrun --nproc_per_node 8 -m semhitok.cli train --config 256   # one node; SLURM: launch_scripts/

Layout of <run_dir>/mllm/:
    checkpoints/<tag>/     DeepSpeed states + loader_rank<r>.json + rng_rank<r>.pt + COMPLETE.json (written last:
                           every file's size); DeepSpeed's `latest` is written but not trusted
    final/                 SemHiTokLM.save_pretrained: a plain HF Qwen2 directory + adapter + tokenizers
    metrics.jsonl (+ tensorboard/, wandb/); loss_curves.png, gaps.png (conditioning gaps, mllm/gaps.py)
A restarted job resumes from the newest checkpoint whose COMPLETE.json matches its files (damaged newer ones
are skipped with a warning): weights, optimizer, scheduler, data position and RNG, so the next losses equal
those of the uninterrupted run. No state is unpickled beyond tensors, containers and DeepSpeed's few types
(common/safe_load.py): a checkpoint asking for more is refused with one line naming the file.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from semhitok.common import dist as D
from semhitok.common.hub import resolve_pretrained
from semhitok.common.io import MANIFEST, atomic_path, intact_dirs, read_json, write_json, write_manifest
from semhitok.common.metrics_log import MetricLogger, NonFiniteLoss
from semhitok.common.resources import shipped
from semhitok.common.run_dir import refuse_other_config
from semhitok.common.safe_load import load_state, weights_only_loads
from semhitok.data_pipelines.loader import PackedLoader, packing_efficiency
from semhitok.data_pipelines.sequences import TASKS, SequenceBuilder
from semhitok.data_pipelines.text_tokenizer import load_text_tokenizer, resolve_text_tokenizer
from semhitok.mllm.ds_config import load_deepspeed_config
from semhitok.mllm.flops import batch_flops, numel
from semhitok.mllm.gaps import conditioning_gaps, flat_metrics, load_pairs, plot_training
from semhitok.mllm.hf_export import text_config
from semhitok.mllm.loss import chunk_for_budget
from semhitok.mllm.model import SemHiTokLM, apply_fused_kernels, random_base_config
from semhitok.mllm.partition import zero3_build
from semhitok.mllm.plain_engine import PlainEngine
from semhitok.tokenizer.interface import load_visual_tokenizer
from semhitok.tokenizer.trainer import warmup_cosine

log = logging.getLogger("semhitok")
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, per GPU


def setup_distributed() -> D.DistInfo:
    """The process group of every run (common/dist.py: torchrun/srun's, else one process), adopted by DeepSpeed."""
    import deepspeed

    info = D.init_distributed(always=True)
    if not torch.cuda.is_available():
        # DeepSpeed's CPU backend JIT-builds its shared-memory all-reduce on first use per environment (two C++ files,
        # ~67 CPU-s here). Only its inference all-reduce uses it; training's collectives go to torch.distributed.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    # DeepSpeed 0.19 calls collectives torch marks deprecated, once per step
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")  # wraps the group above
    return info


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((tf * 1e12 for key, tf in PEAK_BF16_TFLOPS.items() if key in name), None)


def build_model(cfg, out: Path, main: bool, dtype: torch.dtype = torch.float32):
    """(model, text tokenizer, visual tokenizer directory) for a new run or from mllm_train.init_from, in
    `dtype`; inside mllm.partition.zero3_build every rank holds only its ZeRO-3 shard."""
    t = cfg.mllm_train
    if t.init_from:
        init_from = resolve_pretrained(t.init_from)  # a directory or a Hub id
        model = SemHiTokLM.from_pretrained(init_from, dtype=dtype).train()  # train(): activation checkpointing acts
        model.sequence_config = cfg.data
        return model, load_text_tokenizer(str(init_from)), init_from / "visual_tokenizer"
    tokenizer_dir = resolve_pretrained(t.tokenizer) if t.tokenizer else cfg.tokenizer_dir
    if main:  # "tiny" trains a tokenizer once; the other ranks wait for it
        resolve_text_tokenizer(cfg.mllm.text_tokenizer or cfg.mllm.base_model, out / "text_tokenizer", cfg.mllm.text_corpus)
    D.barrier()
    text_tokenizer = resolve_text_tokenizer(cfg.mllm.text_tokenizer or cfg.mllm.base_model, out / "text_tokenizer", cfg.mllm.text_corpus)
    model = SemHiTokLM.build(cfg.mllm, load_visual_tokenizer(tokenizer_dir), text_tokenizer, cfg.data, dtype=dtype)
    return model, text_tokenizer, tokenizer_dir


def deepspeed_config(cfg, bf16: bool, world_size: int = 1, hidden_size: int | None = None) -> dict:
    path = Path(shipped(cfg.mllm_train.deepspeed_config))
    if not path.is_file():
        raise FileNotFoundError(f"mllm_train.deepspeed_config: {path} not found (shipped: configs/deepspeed/zero3.json, zero2.json)")
    return load_deepspeed_config(path, cfg, bf16, world_size, hidden_size)


def base_hidden_size(cfg) -> int | None:
    """The LLM's hidden size from its config alone (for DeepSpeed's "auto" bucket sizes); None if unreadable
    here (the model build then reports the real problem)."""
    from transformers import AutoConfig

    try:
        if cfg.mllm_train.init_from:
            return text_config(resolve_pretrained(cfg.mllm_train.init_from)).hidden_size  # an export's base LLM
        if cfg.mllm.base_model == "random":
            return random_base_config(cfg.mllm).hidden_size
        return AutoConfig.from_pretrained(cfg.mllm.base_model).hidden_size
    except (OSError, ValueError, RuntimeError):  # RuntimeError: a Hub id offline (WeightsUnavailable)
        return None


def _checkpoint_dirs(root: Path) -> list[Path]:
    """step<n> directories, oldest first"""
    return sorted(p for p in root.glob("step*") if p.is_dir() and p.name[4:].isdigit())


def save_checkpoint(engine, loader_state: dict, root: Path, step: int, keep: int, dist: D.DistInfo,
                    identity: dict | None = None, replicas: list[int] | None = None) -> None:
    """Per-rank data position and RNG, then the engine's states, then (rank 0, after every rank is done) the
    completion marker listing every file with its size: resume trusts only marked, matching directories.
    replicas: each rank's data-parallel replica (Megatron, whose TP and PP ranks read one replica's rows), kept in
    the marker so a job at another TP and PP finds each replica's position."""
    tag = f"step{step:08d}"
    if dist.is_main and (root / tag).exists():  # left by an interrupted save: no stale file may mix in
        shutil.rmtree(root / tag)
    D.barrier()
    (root / tag).mkdir(parents=True, exist_ok=True)
    write_json(root / tag / f"loader_rank{dist.rank}.json", loader_state)
    with atomic_path(root / tag / f"rng_rank{dist.rank}.pt") as tmp:
        torch.save({"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.zeros(0, dtype=torch.uint8)}, tmp)
    engine.save_checkpoint(str(root), tag=tag, client_state={"step": step})
    D.barrier()
    if dist.is_main:
        write_manifest(root / tag, {"step": step, "world_size": dist.world_size, "resume": identity or {"world_size": dist.world_size},
                                    **({"replicas": replicas} if replicas is not None else {})})
        for old in _checkpoint_dirs(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    D.barrier()


def resume_identity(cfg, world_size: int) -> dict:
    """What a checkpoint's states depend on besides the step (saved in its marker): a job with other values cannot
    load them, and check_resume refuses it before anything is recorded."""
    t = cfg.mllm_train
    engine = t.backend if t.backend == "megatron" else "plain" if t.deepspeed_config.strip().lower() == "none" else "deepspeed"
    # Megatron's states load at any TP and PP (mllm/megatron/engine.py) and its loader positions are per data-parallel
    # replica: only the number of replicas must stay
    ranks = {"data_parallel": world_size // (t.tensor_parallel * t.pipeline_parallel)} if engine == "megatron" else {"world_size": world_size}
    return {**ranks, "engine": engine,
            "trainable": t.trainable, "mixture_components": len(cfg.data.mixture), "init_from": t.init_from,
            "mllm": {k: v for k, v in dataclasses.asdict(cfg.mllm).items() if k not in ("text_corpus", "attn_implementation")}}


def check_resume(cfg) -> None:
    """Refuse (ValueError, one line) a job whose newest intact checkpoint another configuration wrote (world size,
    engine, trainable part, mixture components, the model's config), before a command records anything: a refused
    resume leaves the run's config.yaml, run.json and runs.jsonl as they were. (A marker of an older save holds
    the world size only.)"""
    chosen, _ = newest_intact_checkpoint(cfg.mllm_dir / "checkpoints")
    if chosen is None:
        return
    manifest = read_json(chosen / MANIFEST)
    saved = manifest.get("resume") or {"world_size": manifest.get("world_size")}
    now = resume_identity(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    refuse_other_config(chosen, saved, {k: v for k, v in now.items() if k in saved}, "another mllm_dir")


def newest_intact_checkpoint(root: Path) -> tuple[Path | None, list[str]]:
    """(the newest step directory whose completion marker matches its files, or None; what was skipped).
    DeepSpeed's own `latest` file is not read: it is rewritten in place, and a kill can leave it empty."""
    skipped: list[str] = []
    newest = next(intact_dirs(reversed(_checkpoint_dirs(root)), skipped), None)
    return (newest[0] if newest else None), skipped


def deepspeed_state_types() -> list[type]:
    """What DeepSpeed's states hold besides tensors, containers and primitives: the loss scaler and the ZeRO
    stage (optim_states), the fp32 partitions' slice addresses (ZeRO-1/2)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def load_engine_checkpoint(engine, root: Path, tag: str) -> dict:
    """engine.load_checkpoint without unpickling code: DeepSpeed's checkpoint engine loads with
    torch.load(weights_only=False), so its reads go through load_state (a refusal names the file), and any
    other torch.load inside (universal checkpoints, MoE experts) is forced weights-only. Client state back."""
    allow = deepspeed_state_types() if hasattr(engine, "checkpoint_engine") else []
    if allow:
        engine.checkpoint_engine.load = lambda path, map_location=None: load_state(path, allow, map_location)
    with weights_only_loads(allow):
        load_path, client = engine.load_checkpoint(str(root), tag=tag)
    if load_path is None:
        raise FileNotFoundError(f"DeepSpeed could not load checkpoint {root / tag}")
    return client


def resume(engine, loader: PackedLoader, root: Path, dist: D.DistInfo, replica: tuple[int, int] | None = None) -> int:
    """Load the newest intact checkpoint if there is one (rank 0 picks it, every rank loads that tag);
    the step to continue from. Damaged newer ones are skipped with a warning; with none intact, step 0.
    replica: (this rank's data-parallel replica, their number) for Megatron, whose checkpoints resume at another TP
    and PP: this rank takes the data position and RNG its replica had (from the first rank that read its rows)."""
    chosen, skipped = newest_intact_checkpoint(root) if dist.is_main else (None, [])
    device = D.default_device(dist.local_rank)  # (NCCL broadcasts CUDA tensors only)
    step = int(D.broadcast(torch.tensor([int(chosen.name[4:]) if chosen else -1], device=device))[0])
    if dist.is_main and skipped:
        log.warning("skipped damaged checkpoint(s): %s%s", "; ".join(skipped), "" if chosen else f"; none intact in {root}: starting from step 0")
    if step < 0:
        return 0
    tag = f"step{step:08d}"
    manifest = read_json(root / tag / MANIFEST)
    source = dist.rank  # the rank whose data position and RNG this one continues
    replicas = manifest.get("replicas") if replica is not None else None  # (a marker from before 2026-12-04 has none:
    if replicas is None and manifest.get("world_size") != dist.world_size:  # the same ranks, as the other engines)
        raise ValueError(f"checkpoint {root / tag} was written by {manifest.get('world_size')} rank(s), this job has "
                         f"{dist.world_size}: resume with the same world size")
    if replicas is not None:
        if len(set(replicas)) != replica[1] or replica[0] not in replicas:
            raise ValueError(f"checkpoint {root / tag} was written by {len(set(replicas))} data-parallel replica(s), this "
                             f"job has {replica[1]}: resume with the same number (tensor and pipeline parallel may change)")
        source = replicas.index(replica[0])
    client = load_engine_checkpoint(engine, root, tag)
    state = root / tag / f"loader_rank{source}.json"  # (read with the depth limit; a bad one is one line naming it)
    loader.load_state_dict(read_json(state), str(state))
    rng = load_state(root / tag / f"rng_rank{source}.pt")
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available() and rng["cuda"].numel():
        torch.cuda.set_rng_state(rng["cuda"])
    log.info("resumed from %s (step %d)", root / tag, client["step"])
    return int(client["step"])


def export(engine, model: SemHiTokLM, out: Path, text_tokenizer, visual_tokenizer_dir: Path, dist: D.DistInfo) -> None:
    """Write a from_pretrained directory on rank 0 in the training dtype (bf16: half the bytes of fp32).
    ZeRO-3 weights are gathered one module at a time onto rank 0's CPU, never the whole model per rank."""
    partitioned = getattr(engine, "zero_optimization_partition_weights", lambda: False)()
    if partitioned:
        state = engine._zero3_consolidated_16bit_state_dict()  # rank 0: {name: CPU tensor}; others: None
    else:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()} if dist.is_main else None
    if dist.is_main:
        if partitioned and engine.device.type == "cpu":  # gathered CPU tensors may share storage with the re-partitioned ones
            copies: dict[int, torch.Tensor] = {}  # keeps a tied head tied
            state = {k: copies.setdefault(id(v), v.clone()) for k, v in state.items()}
        model.save_pretrained(out, text_tokenizer, visual_tokenizer_dir, state_dict=state)
    D.barrier()


def held_out_gaps(cfg, model: SemHiTokLM, text_tokenizer, visual_tokenizer_dir: Path, device):
    """A function returning the conditioning gaps on mllm_train.eval_data as flat metrics (None: eval_every=0).
    The held-out images are encoded once, here, with the run's visual tokenizer."""
    t = cfg.mllm_train
    if t.eval_every <= 0:
        return None
    pairs = load_pairs(t.eval_data, load_visual_tokenizer(visual_tokenizer_dir, device), t.eval_limit)
    builder = SequenceBuilder(text_tokenizer, model.layout, cfg.data, model.ids)
    return lambda: flat_metrics(conditioning_gaps(model, builder, pairs, cfg.data.micro_batch_size * 4))


def train_window(engine, inputs: list[dict]) -> list[dict]:
    """One optimizer step over an accumulation window's micro-batches -> each one's loss dict. MegatronEngine runs the
    window itself (its pipeline schedule interleaves the micro-batches); DeepSpeed's engine and PlainEngine take
    forward, backward and step per micro-batch (step() acts at the window's end)."""
    if hasattr(engine, "train_window"):
        return engine.train_window(inputs)
    results = []
    for batch in inputs:
        out = engine(**batch)
        engine.backward(out["loss"])
        engine.step()
        results.append({k: out[k].detach() for k in ("loss", "task_loss_sum", "task_tokens")})  # (no logits kept)
    return results


def train_steps(cfg, engine, scheduler, loader: PackedLoader, model: SemHiTokLM, dist: D.DistInfo, device, start_step: int,
                gap_eval=None, sum_group=None, replicas: list[int] | None = None) -> dict:
    """The training loop of both backends, from start_step to mllm_train.max_steps: micro-batches through the engine
    (DeepSpeed's, PlainEngine or MegatronEngine), metrics every log_every steps into <mllm_dir>/metrics.jsonl (and its
    plots at the end), checkpoints every ckpt_every, the held-out gaps every eval_every (gap_eval: None for none);
    returns the last loader state.
    model: the SemHiTokLM the FLOPs are counted on. sum_group: the ranks whose batches differ (default: all; Megatron's
    data-parallel group, since its TP and PP ranks read the same rows); replicas: save_checkpoint's."""
    t, out = cfg.mllm_train, cfg.mllm_dir
    ckpt_root, peak = out / "checkpoints", peak_flops()
    logger = MetricLogger(out, t.log_backends or ["jsonl", "tensorboard"],
                          {"mllm": dataclasses.asdict(cfg.mllm), "mllm_train": dataclasses.asdict(t), "data": dataclasses.asdict(cfg.data)},
                          enabled=dist.is_main, resume_step=start_step)
    task_sums = torch.zeros(2, len(TASKS), device=device)  # [loss sum, tokens] per task since the last log
    weighted = {"task_weights": torch.tensor([t.task_loss_weights.get(k, 1.0) for k in TASKS], device=device)} if t.task_loss_weights else {}
    tokens, window_start = torch.zeros(2, device=device), time.perf_counter()  # [tokens, training FLOPs]
    # non-finite losses are counted on the device and checked where values are reduced anyway (logging, checkpoints,
    # evaluation): no host sync per micro-step. [non-finite micro-steps, the first one's step] since the last check
    health, window_origins, checked = torch.zeros(2, device=device), {}, start_step
    batches = loader.batches(cfg.data.prefetch)  # built in a background process, resumable by loader_state
    loader_state = loader.state_dict()
    bar = tqdm(range(start_step, t.max_steps), desc="mllm", initial=start_step, total=t.max_steps, disable=not dist.is_main, dynamic_ncols=True)
    for step in bar:
        window = [next(batches) for _ in range(t.gradient_accumulation)]
        loader_state = window[-1].pop("loader_state")
        inputs = [{"input_ids": b["input_ids"].to(device), "position_ids": b["position_ids"].to(device), "labels": b["labels"].to(device),
                   "task_ids": b["task_ids"].to(device), **({"visual_codes": b["visual_codes"].to(device)} if "visual_codes" in b else {}),
                   **weighted} for b in window]
        for batch, result in zip(window, train_window(engine, inputs), strict=True):
            bad = ~torch.isfinite(result["loss"].detach())
            health[1] = torch.where((health[0] == 0) & bad, float(step + 1), health[1])
            health[0] += bad.float()
            window_origins.setdefault(step + 1, []).extend(batch["origins"][:4])
            task_sums += torch.stack([result["task_loss_sum"], result["task_tokens"]])
            valid = batch["task_ids"] >= 0
            tokens += torch.tensor([float(valid.sum()), batch_flops(model, batch["position_ids"], batch["labels"], valid, batch["input_ids"])],
                                   device=device)
        done = step + 1
        metrics = {}
        if done % t.log_every == 0 or done % t.ckpt_every == 0 or done == t.max_steps or (gap_eval and done % t.eval_every == 0):
            bad_here, first = health.tolist()  # (every rank checks at the same steps)
            if D.all_reduce_sum(health[:1].clone()).item() > 0:
                at, where = (f"step {int(first)}", f"this rank's batch: {window_origins[int(first)][:4]}") if bad_here else \
                    (f"a step in {checked + 1}-{done}", "another rank's batch")
                raise NonFiniteLoss(f"non-finite loss at {at} ({where}); last checkpoint: {ckpt_root}")
            health.zero_()
            window_origins.clear()
            checked = done
        if done % t.log_every == 0 or done == t.max_steps:
            D.all_reduce_sum(task_sums, sum_group)
            D.all_reduce_sum(tokens, sum_group)
            elapsed = time.perf_counter() - window_start
            per_task = {f"loss_{task}": (task_sums[0, i] / task_sums[1, i]).item() for i, task in enumerate(TASKS) if task_sums[1, i] > 0}
            tokens_per_s = tokens[0].item() / elapsed
            metrics = {"loss": (task_sums[0].sum() / task_sums[1].sum().clamp(min=1)).item(), **per_task,
                       "lr": scheduler.get_last_lr()[-1], "grad_norm": float(engine.get_global_grad_norm() or 0.0),
                       "tokens_per_s": tokens_per_s, "supervised_tokens": task_sums[1].sum().item()}
            if peak:
                metrics["mfu"] = tokens[1].item() / elapsed / (peak * dist.world_size)  # mllm/flops.py
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{tokens_per_s:.0f}")
            task_sums.zero_()
            tokens.zero_()
            window_start = time.perf_counter()
        if gap_eval and (done % t.eval_every == 0 or done == t.max_steps):
            began = time.perf_counter()
            metrics.update(gap_eval())  # every rank computes (ZeRO-3 gathers), the main one writes
            window_start += time.perf_counter() - began  # throughput leaves the evaluation out
        if metrics:  # one row per step: the training metrics and/or the gaps
            logger.log(done, metrics)
        if done % t.ckpt_every == 0 or done == t.max_steps:
            save_checkpoint(engine, loader_state, ckpt_root, done, t.keep_checkpoints, dist, resume_identity(cfg, dist.world_size),
                            replicas)
    bar.close()
    logger.close()
    if dist.is_main:
        plot_training(out / "metrics.jsonl", out)
    return loader_state


def train_mllm(cfg) -> Path:
    if cfg.mllm_train.backend == "megatron":  # the base as megatron-core's GPTModel, tensor parallel (docs/megatron.md)
        from semhitok.mllm.megatron.train import train_megatron

        return train_megatron(cfg)
    import deepspeed  # (also for export: gathering is a no-op on plain parameters)

    t = cfg.mllm_train
    out = cfg.mllm_dir
    plain = t.deepspeed_config.strip().lower() == "none"  # plain PyTorch, one process (mllm/plain_engine.py)
    if plain and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("mllm_train.deepspeed_config=none trains in one process; give a DeepSpeed config to run several")
    dist = D.DistInfo(0, 1, 0) if plain else setup_distributed()
    torch.manual_seed(t.seed)
    device = D.default_device(dist.local_rank)
    bf16 = t.precision == "bf16" or (t.precision == "auto" and device.type == "cuda")

    # Resolved before the model exists: transformers builds it partitioned under this config (ZeRO-3).
    ds_config = None if plain else deepspeed_config(cfg, bf16, dist.world_size, base_hidden_size(cfg))
    hf_ds = zero3_build(ds_config)  # noqa: F841 (kept alive: transformers builds partitioned while it lives)
    dtype = torch.bfloat16 if bf16 and not plain else torch.float32  # plain: fp32 weights (PlainEngine's own bf16)
    model, text_tokenizer, visual_tokenizer_dir = build_model(cfg, out, dist.is_main, dtype)
    model.lm.lm_head.chunk = chunk_for_budget(t.loss_chunk, t.loss_memory_gb, model.layout.vocab_size, dtype)
    if model.visual_head is not None:  # L > 1: the depth heads' classifiers (mllm/depth_head.py)
        model.visual_head.set_loss_chunk(chunk_for_budget(t.loss_chunk, t.loss_memory_gb, max(model.visual_head.code_vocab_sizes), dtype))
    if t.trainable == "adapter":
        model.freeze_text()
    model.enable_activation_checkpointing(t.activation_checkpointing)
    if t.fused_kernels:
        log.info("Liger-Kernel RMSNorm/RoPE/SwiGLU: %s", "applied" if apply_fused_kernels(model) else "not applied (needs CUDA and liger-kernel)")
    loader = PackedLoader(cfg.data, text_tokenizer, model.layout, cfg.training_data_dir, dist.rank, dist.world_size, model.ids)

    new_modules = ("adapter.", "visual_head.")  # randomly initialised: adapter_lr
    adapter_params = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith(new_modules)]
    other_params = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith(new_modules)]
    # Frozen text rows sit in the trainable head in adapter mode: no weight decay there, or they would shrink.
    optimizer = torch.optim.AdamW([{"params": adapter_params, "lr": t.adapter_lr},
                                   {"params": other_params, "lr": t.lr, "weight_decay": 0.0 if model.text_frozen else t.weight_decay}],
                                  betas=(0.9, 0.95), weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(t.warmup_steps, t.max_steps, t.min_lr_ratio))
    if plain:
        engine = PlainEngine(model, optimizer, scheduler, t.gradient_accumulation, t.grad_clip, bf16, device)
    else:
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)

    ckpt_root = out / "checkpoints"
    start_step = resume(engine, loader, ckpt_root, dist)
    gap_eval = held_out_gaps(cfg, model, text_tokenizer, visual_tokenizer_dir, device)
    log.info("training %s (%.1fM parameters, %s) on %d rank(s) from step %d: %s",
             cfg.mllm.base_model, sum(numel(p) for p in model.parameters()) / 1e6, t.trainable, dist.world_size, start_step, out)

    loader_state = train_steps(cfg, engine, scheduler, loader, model, dist, device, start_step, gap_eval)
    export(engine, model, out / "final", text_tokenizer, visual_tokenizer_dir, dist)
    if dist.is_main:
        log.info("model exported: %s (packing efficiency %.3f)", out / "final", packing_efficiency(loader_state["stats"]))
    return out / "final"
