"""`mllm_train.backend=megatron`: the unified LLM trained with its base as megatron-core's GPTModel.

    semhitok train --config tiny mllm_train.backend=megatron                                  # 1 process
    torchrun --nproc_per_node 8 -m semhitok.cli train --config 256 mllm_train.backend=megatron \\
        mllm_train.tensor_parallel=2                                                          # TP 2 x DP 4

The model is built as for DeepSpeed (mllm/train.py's build_model: a base + the tokenizer, or init_from an export),
then converted on every rank to its TP shard (mllm/megatron/model.py); the packed batches are the same, one
loader per data-parallel replica (every TP and PP rank of a replica reads the same rows). The training loop,
checkpoints and resume are mllm/train.py's (train_steps; per-rank loader position and RNG, a completion marker
listing each rank's data-parallel replica), the engine's state in megatron.core.dist_checkpointing's format
(mllm/megatron/engine.py); a resume may change TP and PP, not the number of replicas. The export at the end is the
project's usual one (SemHiTokLM.save_pretrained), so sampling, chat, eval and push work unchanged. Held-out gap
evaluation (mllm_train.eval_every) runs on the DeepSpeed backend only.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from semhitok.common import dist as D
from semhitok.data_pipelines.loader import PackedLoader, packing_efficiency
from semhitok.mllm.megatron.convert import megatron_to_hf, recompute
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

    from semhitok.mllm.train import build_model, resume, train_steps

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
    model = from_semhitok(template, **recompute(t.activation_checkpointing, layers // t.pipeline_parallel))
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    dp_group = parallel_state.get_data_parallel_group()
    loader = PackedLoader(cfg.data, text_tokenizer, model.layout, cfg.training_data_dir, dp_rank, dp_size, model.ids)

    engine = MegatronEngine(model, t.lr, t.adapter_lr, t.weight_decay, warmup_cosine(t.warmup_steps, t.max_steps, t.min_lr_ratio),
                            t.grad_clip, bf16, device)

    ckpt_root = out / "checkpoints"
    replicas = [None] * dist.world_size  # each rank's data-parallel replica, for the checkpoints' marker
    torch.distributed.all_gather_object(replicas, dp_rank)
    start_step = resume(engine, loader, ckpt_root, dist, replica=(dp_rank, dp_size))
    if t.eval_every:
        log.warning("mllm_train.eval_every: the held-out gaps run on the DeepSpeed backend only; not evaluated here")
    log.info("training %s on Megatron-Core (TP %d x PP %d x DP %d, %d rank(s)) from step %d: %s", cfg.mllm.base_model,
             t.tensor_parallel, t.pipeline_parallel, dp_size, dist.world_size, start_step, out)

    loader_state = train_steps(cfg, engine, engine.scheduler, loader, template, dist, device, start_step, sum_group=dp_group,
                               replicas=replicas)
    export(model, template, out / "final", text_tokenizer, visual_tokenizer_dir, dist)
    if dist.is_main:
        log.info("model exported: %s (packing efficiency %.3f)", out / "final", packing_efficiency(loader_state["stats"]))
    return out / "final"
