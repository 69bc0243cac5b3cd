"""The training step of the Megatron backend: MegatronEngine runs mllm/train.py's accumulation windows through
megatron-core's own machinery:
  - DistributedDataParallel: the gradients accumulate in fp32 buffers (param.main_grad), reduce-scattered over the
    data-parallel replicas at the end of the window (averaged: DeepSpeed's mean over DP);
  - the distributed optimizer: AdamW (torch's, or transformer-engine's / apex's fused one where installed) whose
    moments and fp32 main weights are sharded over DP (ZeRO-1); gradients clipped by the global norm (TP- and
    PP-aware, a tied table's second copy and TP duplicates counted once); the updated shards all-gathered back;
  - the pipeline schedules: at PP 1 the micro-batches one after another with the gradient sync held to the last; at
    PP > 1 1F1B (each stage runs the next micro-batch's forward while later stages work, the hidden states [T, B, d]
    fp32 sent forward and their gradients back), then the tied table's two copies (first stage's embedding, last
    stage's head) summed.
A window's loss is the mean of its micro-batches' losses (each the mean over its supervised next tokens, or by task
weight): DeepSpeed's semantics. The last stage's per-micro-batch losses and task sums are broadcast over the
pipeline so every rank logs them. Weights and the optimizer stay fp32; bf16 runs the forward (and any recomputed
block in backward) under autocast. On CPU, where this backend is tested, those megatron calls run inside
cpu.cuda_on_cpu(); on a GPU as they are.

A checkpoint tag holds dist_checkpoint/, written by megatron.core.dist_checkpointing (torch_dist, synchronous): the
model's shards and the distributed optimizer's state in its "fully_reshardable" form (each parameter's moments and
fp32 main weights as whole tensors, sharded as the parameter), so it loads at any TP, PP and DP: load_checkpoint for
a resume, load_weights for the weights alone (the trainer resumes at another TP and PP, with the same number of
data-parallel replicas: mllm/train.py's resume). On CPU the save runs inside cpu.cuda_on_cpu() too.
"""

from __future__ import annotations

import os
import shutil
import warnings
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch

from semhitok.common.safe_load import check_pickle, weights_only_loads
from semhitok.data_pipelines.sequences import IGNORE, TASKS
from semhitok.mllm.megatron import cpu
from semhitok.mllm.megatron.model import MegatronLM

DIST = "dist_checkpoint"  # a checkpoint tag's megatron.core.dist_checkpointing folder (the trainer's files beside it)
# The distributed optimizer's state as one tensor per parameter and moment, gathered on DP rank 0 at save (over gloo,
# on the host: "mem_efficient"; without it every DP rank all-gathers the whole state) and sliced by every rank at load,
# so it loads at any TP, PP and DP. ("fully_sharded_model_space", written by every DP rank in parallel, fails in
# megatron-core 0.16.1: "ShardedTensor.flattened_range is not supported"; "dp_reshardable" loads at another DP only.)
OPTIMIZER_SHARDING = {"distrib_optim_sharding_type": "fully_reshardable", "distrib_optim_fully_reshardable_mem_efficient": True}
FORMAT = "megatron-distributed-optimizer-1"  # in a tag's common part: what load_checkpoint reads


def weighted_mean(losses: torch.Tensor, tasks: torch.Tensor | None, task_weights: torch.Tensor | None, count: int) -> torch.Tensor:
    """per-token losses [N] -> the mean SemHiTokLM.forward takes: by task weight (needs tasks [N]), else over count."""
    if task_weights is not None:
        weights = task_weights.to(losses.dtype)[tasks]
        return (losses * weights).sum() / weights.sum().clamp(min=torch.finfo(losses.dtype).tiny)
    return losses.sum() / max(count, 1)


class GroupLR:
    """torch's LambdaLR over megatron's parameter groups (which torch's schedulers cannot take: megatron's optimizer is
    not a torch.optim.Optimizer): each group's lr = its max_lr x lr_lambda(step)."""

    def __init__(self, optimizer, lr_lambda):
        self.optimizer, self.lr_lambda, self.last_epoch = optimizer, lr_lambda, 0
        self._apply()

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = group["max_lr"] * self.lr_lambda(self.last_epoch)

    def step(self) -> None:
        self.last_epoch += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        """the groups' learning rates, the adapter's first and the model's last (as the other backends' scheduler)"""
        return [g["lr"] for g in sorted(self.optimizer.param_groups, key=lambda g: g["default_config"])]

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.last_epoch = state["last_epoch"]
        self._apply()


def _keep_step_on_load(optimizer) -> None:
    """megatron-core 0.16.1's DistributedOptimizer with torch's AdamW (no transformer-engine or apex) fails to load a
    fully_reshardable checkpoint: it restores AdamW's "step" from the parameter groups, drops it from each parameter's
    loaded tensors, then copies every key of the parameter's state from those (KeyError: 'step'). Here the copy is
    given the step already in place."""
    set_states, get_states = optimizer._set_main_param_and_optimizer_states, optimizer._get_main_param_and_optimizer_states

    def set_main_param_and_optimizer_states(model_param, tensors):
        if "step" not in tensors and "step" in (current := get_states(model_param)):
            tensors = {**tensors, "step": current["step"]}
        return set_states(model_param, tensors)

    optimizer._set_main_param_and_optimizer_states = set_main_param_and_optimizer_states


def check_one_bucket_per_buffer(ddp) -> None:
    """Refuse (one line) a DDP whose gradient buffers are split into buckets with padding between them: megatron-core
    0.16.1's fully_reshardable save (OPTIMIZER_SHARDING) joins the buckets without that padding, so every weight after
    it would be saved with another's optimizer state and main weight (its log: "param range exceeds unpadded buffer
    ... data corruption"). Without overlap a buffer is one bucket, but for a tied table's own bucket at PP > 1."""
    for buffer in ddp.buffers + ddp.expert_parallel_buffers:
        for bucket, after in zip(buffer.buckets, buffer.buckets[1:], strict=False):  # (consecutive pairs)
            if bucket.offset + bucket.numel_unpadded != after.offset:
                raise ValueError(f"Megatron backend: a gradient bucket of {bucket.numel_unpadded} weights is padded by "
                                 f"{after.offset - bucket.offset - bucket.numel_unpadded}, which megatron-core's fully_reshardable "
                                 "checkpoint would misplace: the optimizer state could not be saved faithfully")


class MegatronEngine:
    """model: this rank's MegatronLM; AdamW at lr (adapter_lr for the adapter's parameters), betas (0.9, 0.95),
    weight_decay on every parameter (as the other backends), lr_lambda(step) the schedule's factor."""

    def __init__(self, model: MegatronLM, lr: float, adapter_lr: float, weight_decay: float, lr_lambda, grad_clip: float,
                 bf16: bool, device: torch.device):
        from megatron.core import parallel_state
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, ParamKey, get_megatron_optimizer

        if any(hasattr(p, "main_grad") for p in model.parameters()):  # DDP's gradient buffer views: a second DDP's
            # hooks on the same weights would each take the gradient from the other (the adapter is the template's)
            raise ValueError("MegatronEngine: the model's weights already belong to another engine (a MegatronLM shares "
                             "its adapter with the SemHiTokLM it was converted from): convert a new SemHiTokLM")
        self.model = model.to(device)
        self.megatron_call = nullcontext if device.type == "cuda" else cpu.cuda_on_cpu
        self.pp = parallel_state.get_pipeline_model_parallel_world_size()
        self.last = parallel_state.is_pipeline_last_stage()
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
        with self.megatron_call():
            # not overlapped (overlap_grad_reduce, overlap_param_gather): with them megatron-core 0.16.1 splits the
            # buffers into 40M-weight buckets, which its fully_reshardable save shifts (check_one_bucket_per_buffer),
            # and replicas with and without images all-gather the buckets in different orders (the adapter's forward
            # hooks), a collective mismatch
            self.ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(
                grad_reduce_in_fp32=True, use_distributed_optimizer=True), model)
            check_one_bucket_per_buffer(self.ddp)
            # config_overrides: the adapter's own learning rate, marked "decoupled" (megatron tells groups apart by
            # their multipliers and that flag, not by their rates, when it loads a checkpoint); given (not None), it
            # keeps weight decay on biases and norms, as torch's AdamW in the other backends does
            self.optimizer = get_megatron_optimizer(
                OptimizerConfig(optimizer="adam", lr=lr, weight_decay=weight_decay, adam_beta1=0.9, adam_beta2=0.95,
                                adam_eps=1e-8, clip_grad=grad_clip, use_distributed_optimizer=True, params_dtype=torch.float32),
                [self.ddp], config_overrides={ParamKey(name="*adapter.*"): {"max_lr": adapter_lr, "is_decoupled_lr": True}})
        for opt in self._distributed_optimizers():
            _keep_step_on_load(opt)
        model.config.no_sync_func = self.ddp.no_sync  # the schedules hold the gradient sync to a window's last micro-batch
        model.config.finalize_model_grads_func = finalize_model_grads  # DP reduce-scatter, the tied table's copies summed
        self.scheduler = GroupLR(self.optimizer, lr_lambda)
        self._grad_norm = None
        self.ddp.train()

    def train_window(self, batches: list[dict]) -> list[dict[str, torch.Tensor]]:
        """One optimizer step over an accumulation window's micro-batches (packed rows [B, T] each, as SemHiTokLM.forward
        takes them) -> per micro-batch SemHiTokLM.forward's {"loss", "task_loss_sum", "task_tokens"} (detached)."""
        with self.megatron_call():
            self.ddp.zero_grad_buffer()
            self.optimizer.zero_grad()
            results = self._schedule(batches, forward_only=False)
            _, norm, _ = self.optimizer.step()
        self._grad_norm = norm
        self.scheduler.step()
        return results

    def __call__(self, **batch) -> dict[str, torch.Tensor]:
        """One micro-batch's forward alone (evaluation; call it under torch.no_grad()): its loss dict on every rank."""
        with self.megatron_call():
            return self._schedule([batch], forward_only=True)[0]

    def _schedule(self, batches: list[dict], forward_only: bool) -> list[dict[str, torch.Tensor]]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        rows, length = batches[0]["input_ids"].shape
        if any(b["input_ids"].shape != (rows, length) for b in batches):  # the stages exchange [T, B, d] of one shape
            raise ValueError(f"a window's micro-batches differ in shape: {[tuple(b['input_ids'].shape) for b in batches]}")

        def forward_step(data_iterator, model):
            batch = next(data_iterator)
            output = model(batch["input_ids"], batch["position_ids"], batch["labels"])
            if not self.last:
                return output.float(), None  # hidden states [T, B, d] to the next stage, in the pipeline's dtype
            return output, partial(self._loss, batch)

        with self.autocast:
            reports = get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter(batches), model=[self.ddp], num_microbatches=len(batches),
                seq_length=length, micro_batch_size=rows, forward_only=forward_only)
        return self._from_last_stage(reports, len(batches), "task_ids" in batches[0], batches[0]["input_ids"].device)

    @staticmethod
    def _loss(batch: dict, losses: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The last stage's per-token losses [B, T] (position t's on token t + 1) -> (the micro-batch's loss, its report)"""
        labels, task_ids = batch["labels"], batch.get("task_ids")
        mask = labels[:, 1:] != IGNORE
        losses = losses[:, :-1][mask]  # [N], in SemHiTokLM's order
        tasks = task_ids[:, 1:][mask] if task_ids is not None else None
        loss = weighted_mean(losses, tasks, batch.get("task_weights"), int(mask.sum()))
        report = {"loss": loss.detach().clone()}  # (the schedule divides the loss it returns in place)
        if tasks is not None:
            report["task_loss_sum"] = torch.zeros(len(TASKS), device=losses.device).index_add_(0, tasks, losses.detach())
            report["task_tokens"] = torch.bincount(tasks, minlength=len(TASKS)).float()
        return loss, report

    def _from_last_stage(self, reports: list[dict], count: int, with_tasks: bool, device) -> list[dict[str, torch.Tensor]]:
        """The last stage's reports on every stage of the pipeline: one broadcast of [count, 1 (+ 2 x tasks)]."""
        if self.pp == 1:
            return reports
        from megatron.core import parallel_state

        n = len(TASKS) if with_tasks else 0
        values = (torch.stack([torch.cat([r["loss"].float().reshape(1), *([r["task_loss_sum"], r["task_tokens"]] if n else [])])
                               for r in reports]) if self.last else torch.empty(count, 1 + 2 * n, device=device))
        torch.distributed.broadcast(values, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                    group=parallel_state.get_pipeline_model_parallel_group())
        if self.last:
            return reports
        return [{"loss": v[0], **({"task_loss_sum": v[1:1 + n], "task_tokens": v[1 + n:]} if n else {})} for v in values]

    def get_global_grad_norm(self) -> float | None:
        return self._grad_norm

    def _distributed_optimizers(self) -> list:
        return getattr(self.optimizer, "chained_optimizers", [self.optimizer])  # (megatron chains dense and expert ones)

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def save_checkpoint(self, root: str, tag: str, client_state: dict) -> None:
        """<root>/<tag>/dist_checkpoint/: this rank's shards of the model and of the distributed optimizer's state
        (every rank writes its own pieces; a model replica's once), and the common part: the optimizer's group
        hyperparameters and steps, the scheduler, the client state. Called between windows."""
        from megatron.core import dist_checkpointing, parallel_state
        from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

        with self.megatron_call():
            model = sharded_model_state(self.model)
            state = {"format": FORMAT, "model": model,
                     "optimizer": self.optimizer.sharded_state_dict(model, is_loading=False, metadata=OPTIMIZER_SHARDING),
                     "scheduler": self.scheduler.state_dict(), "client": client_state,
                     "layout": {"tp": parallel_state.get_tensor_model_parallel_world_size(), "pp": self.pp,
                                "dp": parallel_state.get_data_parallel_world_size()}}
            folder = Path(root) / tag / DIST
            tmp = folder.with_name(f".{DIST}.tmp")  # renamed when every rank has written: DIST exists only whole
            if torch.distributed.get_rank() == 0:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            torch.distributed.barrier()
            # thread_count=1: one file per rank (the default forks two writers per rank and splits the shards over them)
            dist_checkpointing.save(state, str(tmp), sharded_strategy=TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=1))
        if torch.distributed.get_rank() == 0:  # (save ends with a barrier: every rank's files are there)
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
        torch.distributed.barrier()

    def load_checkpoint(self, root: str, tag: str) -> tuple[str | None, dict]:
        """Weights, the optimizer's state and the scheduler from <root>/<tag>, at this job's TP, PP and DP whichever
        wrote them; (the tag, its client state)."""
        with self.megatron_call():
            for opt in self._distributed_optimizers():
                if not opt.optimizer.state:  # torch's AdamW has no state (no step) before its first step, and
                    # DistributedOptimizer.state_dict asks for one: megatron's dummy step (zero gradients), whose
                    # moments, step and weight-decayed weights the load then replaces
                    opt._init_optimizer_states_with_dummy_values()
            model = sharded_model_state(self.model)
            optimizer = self.optimizer.sharded_state_dict(model, is_loading=True, metadata=OPTIMIZER_SHARDING)
            loaded = _load(Path(root) / tag, {"model": model, "optimizer": optimizer}, whole=True)
            _load_model(self.model, loaded["model"])
            self.optimizer.load_state_dict(loaded["optimizer"])
            for opt in self._distributed_optimizers():  # (megatron-core 0.16.1 hands torch's AdamW one "step" tensor for
                for state in opt.optimizer.state.values():  # every parameter, which AdamW increments in place, once per
                    if "step" in state:  # parameter: each its own; TE's and apex's FusedAdam keep it in the group)
                        state["step"] = state["step"].clone()
        self.scheduler.load_state_dict(loaded["scheduler"])
        return str(Path(root) / tag), loaded["client"]


# What torch.distributed.checkpoint's .metadata pickle holds (torch 2.13; dist_checkpointing's torch_dist format):
# FileSystemReader.read_metadata unpickles it with pickle.load, so it is checked first (common/safe_load.py).
DCP_METADATA = {("torch", "Size"), ("torch.serialization", "_get_layout"),
                *(("torch.distributed.checkpoint.metadata", n) for n in (
                    "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata", "ChunkStorageMetadata",
                    "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")),
                *(("torch.distributed.checkpoint.planner", n) for n in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData")),
                ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
                *(("torch", n) for n in dir(torch) if isinstance(getattr(torch, n, None), torch.dtype))}


def sharded_model_state(model: MegatronLM) -> dict:
    """This rank's weights as dist_checkpointing's ShardedTensors, keyed as model.state_dict(): the GPTModel's own
    (TP slices of the full tensors, layers by global index, the vocabulary padding reshaped on load, a tied head on the
    last stage a replica of the first stage's table) and the adapter (first stage, replicated over TP and DP). The
    layers' _extra_state (None in the local spec; transformer-engine's fp8 state) is left out: no pickled object in
    the shards."""
    from megatron.core.utils import make_sharded_tensor_for_checkpoint

    state = {k: v for k, v in model.gpt.sharded_state_dict(prefix="gpt.").items() if not k.endswith("_extra_state")}
    if model.adapter is not None:
        state.update({f"adapter.{k}": make_sharded_tensor_for_checkpoint(v, f"adapter.{k}")
                      for k, v in model.adapter.state_dict(keep_vars=True).items()})
    return state


def _load(tag: Path, sharded: dict, whole: bool = False) -> dict:
    """dist_checkpointing.load of <tag>/dist_checkpoint into `sharded`'s layout; the common part comes back too.
    whole: the engine's whole state is asked for, so the tag must hold the distributed optimizer's (FORMAT).
    Nothing in it runs: .metadata is checked against DCP_METADATA, every torch.load inside is weights-only."""
    from megatron.core import dist_checkpointing

    folder = tag / DIST
    if not (folder / "metadata.json").is_file():
        raise FileNotFoundError(f"{tag}: no {DIST}/metadata.json: not a checkpoint of the Megatron backend (its former "
                                "weights.safetensors + optim_rank<r>.pt format is not read)")
    check_pickle(folder / ".metadata", DCP_METADATA)
    with weights_only_loads(), warnings.catch_warnings():  # megatron-core 0.16 calls torch APIs torch deprecates
        warnings.simplefilter("ignore", FutureWarning)    # (load_state_dict, ShardedTensor), once per load
        if whole and dist_checkpointing.load_common_state_dict(str(folder)).get("format") != FORMAT:
            raise ValueError(f"{tag}: its optimizer state predates the distributed optimizer (format {FORMAT}); "
                             "its weights alone load (load_weights, mllm_train.init_from of an export)")
        return dist_checkpointing.load(sharded, str(folder))


def _load_model(model: MegatronLM, state: dict) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ValueError(f"checkpoint and model differ: missing {missing[:4]}, unexpected {unexpected[:4]}")


def load_weights(model: MegatronLM, tag: str | Path) -> None:
    """The weights of a checkpoint tag into `model`, at this job's TP and PP (any TP and PP wrote them)."""
    _load_model(model, _load(Path(tag), {"model": sharded_model_state(model)})["model"])
