"""`mllm_train.backend=megatron`: the unified LLM trained with its base as megatron-core's GPTModel.

    semhitok train --config tiny mllm_train.backend=megatron                                  # 1 process
    torchrun --nproc_per_node 8 -m semhitok.cli train --config 256 mllm_train.backend=megatron \\
        mllm_train.tensor_parallel=2                                                          # TP 2 x DP 4

The model is built as for DeepSpeed (mllm/train.py's build_model: a base + the tokenizer, or init_from an export),
then converted on every rank to its TP shard (mllm/megatron/model.py); the packed batches are the same, one
loader per data-parallel replica (every TP rank of a replica reads the same rows). Checkpoints and resume use
mllm/train.py's (per-rank loader position and RNG, a completion marker), the weights gathered to their TP=1
state (mllm/megatron/engine.py). The export at the end is the project's usual one
(SemHiTokLM.save_pretrained), so sampling, chat, eval and push work unchanged. Held-out gap evaluation
(mllm_train.eval_every) runs on the DeepSpeed backend only.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import torch
from tqdm import tqdm

from semhitok.common import dist as D
from semhitok.common.metrics_log import MetricLogger
from semhitok.data_pipelines.loader import PackedLoader, packing_efficiency
from semhitok.data_pipelines.sequences import TASKS
from semhitok.mllm.megatron.convert import megatron_to_hf
from semhitok.mllm.megatron.engine import MegatronEngine
from semhitok.mllm.megatron.model import MegatronLM, from_semhitok, gather_full_state
from semhitok.tokenizer.trainer import warmup_cosine

log = logging.getLogger("semhitok")


def init_parallel(tp: int, pp: int, seed: int) -> D.DistInfo:
    """The process group (torchrun's env, else one rank) and megatron's parallel_state at TP x PP (DP: the rest)."""
    from megatron.core import parallel_state, tensor_parallel

    from semhitok.mllm.megatron import cpu

    dist = D.init_distributed(always=True)
    if dist.world_size % (tp * pp):
        raise ValueError(f"mllm_train.tensor_parallel {tp} x pipeline_parallel {pp} does not divide the {dist.world_size} ranks")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    if torch.cuda.is_available():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        cpu.enable()
    return dist


def export(model: MegatronLM, template, out: Path, text_tokenizer, visual_tokenizer_dir: Path, dist: D.DistInfo) -> None:
    """The trained weights gathered over TP and PP onto the first rank, converted back to transformers' names and written
    by the template SemHiTokLM (the model this run was built from: its config, layout and tokenizers)."""
    full = gather_full_state(model.gpt)
    if dist.is_main:
        lm = template.lm
        rows = lm.get_input_embeddings().weight.shape[0]  # untied: the text rows only
        hf = megatron_to_hf(full, lm.config, template.layout.vocab_size, rows)
        state = {f"lm.{k}": v for k, v in hf.items()}
        state.update({f"adapter.{k}": v.detach().cpu() for k, v in model.adapter.state_dict().items()})
        template.save_pretrained(out, text_tokenizer, visual_tokenizer_dir, state_dict=state)
    D.barrier()


def train_megatron(cfg) -> Path:
    from megatron.core import parallel_state

    from semhitok.mllm.train import NonFiniteLoss, build_model, resume, save_checkpoint

    t = cfg.mllm_train
    out = cfg.mllm_dir
    if t.trainable != "full":
        raise ValueError("mllm_train.backend=megatron trains the whole model (trainable=full); use DeepSpeed for adapter-only")
    dist = init_parallel(t.tensor_parallel, t.pipeline_parallel, t.seed)
    torch.manual_seed(t.seed)
    device = D.default_device(dist.local_rank)
    bf16 = t.precision == "bf16" or (t.precision == "auto" and device.type == "cuda")
    template, text_tokenizer, visual_tokenizer_dir = build_model(cfg, out, dist.is_main, torch.float32)
    layers = template.lm.config.num_hidden_layers
    if layers % t.pipeline_parallel:
        raise ValueError(f"mllm_train.pipeline_parallel {t.pipeline_parallel} does not divide the base's {layers} layers")
    model = from_semhitok(template)
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    dp_group = parallel_state.get_data_parallel_group()
    loader = PackedLoader(cfg.data, text_tokenizer, model.layout, cfg.training_data_dir, dp_rank, dp_size, model.ids)

    adapter = [p for n, p in model.named_parameters() if n.startswith("adapter.")]
    other = [p for n, p in model.named_parameters() if not n.startswith("adapter.")]
    optimizer = torch.optim.AdamW([{"params": adapter, "lr": t.adapter_lr}, {"params": other, "lr": t.lr}],
                                  betas=(0.9, 0.95), weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(t.warmup_steps, t.max_steps, t.min_lr_ratio))
    engine = MegatronEngine(model, optimizer, scheduler, t.gradient_accumulation, t.grad_clip, bf16, device)

    ckpt_root = out / "checkpoints"
    start_step = resume(engine, loader, ckpt_root, dist)
    logger = MetricLogger(out, t.log_backends or ["jsonl", "tensorboard"],
                          {"mllm": dataclasses.asdict(cfg.mllm), "mllm_train": dataclasses.asdict(t), "data": dataclasses.asdict(cfg.data)},
                          enabled=dist.is_main, resume_step=start_step)
    if t.eval_every:
        log.warning("mllm_train.eval_every: the held-out gaps run on the DeepSpeed backend only; not evaluated here")
    log.info("training %s on Megatron-Core (TP %d x PP %d x DP %d, %d rank(s)) from step %d: %s", cfg.mllm.base_model,
             t.tensor_parallel, t.pipeline_parallel, dp_size, dist.world_size, start_step, out)

    task_sums = torch.zeros(2, len(TASKS), device=device)  # [loss sum, tokens] per task since the last log
    weighted = {"task_weights": torch.tensor([t.task_loss_weights.get(k, 1.0) for k in TASKS], device=device)} if t.task_loss_weights else {}
    tokens, window_start = torch.zeros(1, device=device), time.perf_counter()
    batches = loader.batches(cfg.data.prefetch)
    loader_state = loader.state_dict()
    bar = tqdm(range(start_step, t.max_steps), desc="mllm", initial=start_step, total=t.max_steps, disable=not dist.is_main, dynamic_ncols=True)
    for step in bar:
        for _ in range(t.gradient_accumulation):
            batch = next(batches)
            loader_state = batch.pop("loader_state")
            result = engine(input_ids=batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device),
                            labels=batch["labels"].to(device), task_ids=batch["task_ids"].to(device), **weighted)
            bad = D.all_reduce_sum(torch.tensor([float(not torch.isfinite(result["loss"]))], device=device))
            if bad.item() > 0:
                raise NonFiniteLoss(f"non-finite loss at step {step + 1}; last checkpoint: {ckpt_root}")
            engine.backward(result["loss"])
            engine.step()
            task_sums += torch.stack([result["task_loss_sum"], result["task_tokens"]])
            tokens += (batch["task_ids"] >= 0).sum().to(device)
        done = step + 1
        if done % t.log_every == 0 or done == t.max_steps:
            torch.distributed.all_reduce(task_sums, group=dp_group)  # every TP rank of a replica holds the same sums
            torch.distributed.all_reduce(tokens, group=dp_group)
            elapsed = time.perf_counter() - window_start
            per_task = {f"loss_{task}": (task_sums[0, i] / task_sums[1, i]).item() for i, task in enumerate(TASKS) if task_sums[1, i] > 0}
            metrics = {"loss": (task_sums[0].sum() / task_sums[1].sum().clamp(min=1)).item(), **per_task,
                       "lr": scheduler.get_last_lr()[-1], "grad_norm": float(engine.get_global_grad_norm() or 0.0),
                       "tokens_per_s": tokens.item() / elapsed, "supervised_tokens": task_sums[1].sum().item()}
            bar.set_postfix(loss=f"{metrics['loss']:.3f}")
            logger.log(done, metrics)
            task_sums.zero_()
            tokens.zero_()
            window_start = time.perf_counter()
        if done % t.ckpt_every == 0 or done == t.max_steps:
            save_checkpoint(engine, loader_state, ckpt_root, done, t.keep_checkpoints, dist)
    bar.close()
    logger.close()
    export(model, template, out / "final", text_tokenizer, visual_tokenizer_dir, dist)
    if dist.is_main:
        log.info("model exported: %s (packing efficiency %.3f)", out / "final", packing_efficiency(loader_state["stats"]))
    return out / "final"
