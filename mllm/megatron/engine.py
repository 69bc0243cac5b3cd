"""The training step of the Megatron backend: MegatronEngine offers the engine calls mllm/train.py's loop makes
(forward -> {"loss", "task_loss_sum", "task_tokens"}, backward, step, grad norm, save/load of a checkpoint tag) with
DeepSpeed's semantics (backward divides by the accumulation steps; step() at the end of a window averages the
gradients over the data-parallel group, clips by the global norm, steps the optimizer and the scheduler).

Parallelism comes from megatron's parallel_state: tensor parallel inside the GPTModel's layers (and its
vocabulary-parallel cross-entropy), pipeline and data parallel here. Weights and the optimizer stay fp32; bf16 runs
the forward under autocast. Megatron-Core's own DDP, distributed optimizer and pipeline schedules allocate on CUDA
(torch.cuda.current_device(), 'torch.cuda.FloatTensor' checks) and cannot run on CPU, where this backend is tested.

Pipeline parallel (PP > 1) runs each micro-batch through the stages and straight back (the engine's call, then
backward): the hidden states [T, B, d] go forward and their gradients back by point-to-point send/recv (fp32), the
last stage's loss and task sums are broadcast to the pipeline so every rank logs them, and a tied table's two copies
(first stage's embedding, last stage's head) add their gradients before the step. This is exact and simple, not
fast: one stage works at a time (no 1F1B overlap of micro-batches; megatron's schedule is the GPU step after this).

A checkpoint tag holds dist_checkpoint/, written by megatron.core.dist_checkpointing (torch_dist, synchronous):
every rank writes its own shards of the weights and of AdamW's moments, sharded as their parameters, and the common
part holds each parameter's step under a layout-free name, the group hyperparameters and the scheduler. All of it
loads at any TP, PP and DP (the TP-split tensors and the padded vocabulary are resliced, the layers found by global
index): load_checkpoint for a resume, load_weights for the weights alone. (The trainer's resume still asks for
the same layout: its loader position and RNG are per rank, mllm/train.py.) On CPU, mllm/megatron/cpu.py bypasses
the save's two CUDA calls.
"""

from __future__ import annotations

import os
import shutil
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch

from semhitok.common.safe_load import check_pickle, weights_only_loads
from semhitok.data_pipelines.sequences import IGNORE, TASKS
from semhitok.mllm.megatron.model import MegatronLM, global_name

DIST = "dist_checkpoint"  # a checkpoint tag's megatron.core.dist_checkpointing folder (the trainer's files beside it)


def weighted_mean(losses: torch.Tensor, tasks: torch.Tensor | None, task_weights: torch.Tensor | None, count: int) -> torch.Tensor:
    """per-token losses [N] -> the mean SemHiTokLM.forward takes: by task weight (needs tasks [N]), else over count."""
    if task_weights is not None:
        weights = task_weights.to(losses.dtype)[tasks]
        return (losses * weights).sum() / weights.sum().clamp(min=torch.finfo(losses.dtype).tiny)
    return losses.sum() / max(count, 1)


def grad_norm(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """The global L2 norm of the gradients of a TP x PP-sharded model: a TP-split parameter's shard counts on its
    rank, a replicated one (norms, adapter) once, on TP rank 0; summed over the stages."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    total = torch.zeros((), dtype=torch.float32, device=params[0].device if params else "cpu")
    for p in params:  # `shared`: the last PP stage's copy of a tied table, counted on the first stage
        if p.grad is not None and param_is_not_tensor_parallel_duplicate(p) and not getattr(p, "shared", False):
            total += p.grad.float().pow(2).sum()
    torch.distributed.all_reduce(total, group=parallel_state.get_model_parallel_group())
    return total.sqrt()


class MegatronEngine:
    def __init__(self, model: MegatronLM, optimizer: torch.optim.Optimizer, scheduler, gradient_accumulation: int,
                 grad_clip: float, bf16: bool, device: torch.device):
        from megatron.core import parallel_state

        self.module, self.optimizer, self.scheduler = model.to(device), optimizer, scheduler
        self.pp = parallel_state.get_pipeline_model_parallel_world_size()
        self.first, self.last = parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage()
        self._pending = None  # PP > 1: (stage input, stage output) of the micro-batch whose backward comes next
        self.accumulation, self.grad_clip = gradient_accumulation, grad_clip
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.dp_group, self.dp_size = parallel_state.get_data_parallel_group(), parallel_state.get_data_parallel_world_size()
        self.micro_steps, self._grad_norm = 0, None
        self.module.train()

    def __call__(self, input_ids, position_ids, labels, task_ids=None, task_weights=None, **_) -> dict[str, torch.Tensor]:
        """Packed rows [B, T] -> SemHiTokLM.forward's dict (loss: the mean over supervised next tokens). At PP > 1
        every stage is called with the same rows; the loss of the other stages is the last stage's, detached."""
        with self.autocast:
            if self.pp > 1:
                losses = self._stage_forward(input_ids, position_ids, labels)
            else:
                losses = self.module(input_ids, position_ids, labels)  # [B, T]: position t's loss on token t + 1
        out = {}
        if self.last:
            mask = labels[:, 1:] != IGNORE
            losses = losses[:, :-1][mask]  # [N], in SemHiTokLM's order
            tasks = task_ids[:, 1:][mask] if task_ids is not None else None
            out["loss"] = weighted_mean(losses, tasks, task_weights, int(mask.sum()))
            if tasks is not None:
                out["task_loss_sum"] = torch.zeros(len(TASKS), device=losses.device).index_add_(0, tasks, losses.detach())
                out["task_tokens"] = torch.bincount(tasks, minlength=len(TASKS)).float()
        return self._from_last_stage(out, task_ids is not None, input_ids.device) if self.pp > 1 else out

    def _stage_forward(self, input_ids, position_ids, labels) -> torch.Tensor:
        """This stage's part of the forward: the previous stage's hidden states in, this stage's out to the next."""
        from megatron.core import parallel_state

        stage_input = None
        if not self.first:
            stage_input = torch.empty(input_ids.shape[1], input_ids.shape[0], self.module.config.hidden_size,
                                      dtype=torch.float32, device=input_ids.device)  # [T, B, d]
            torch.distributed.recv(stage_input, src=parallel_state.get_pipeline_model_parallel_prev_rank())
            stage_input.requires_grad_()
            self.module.set_input_tensor(stage_input)
        output = self.module(input_ids, position_ids, labels)
        if not self.last:
            output = output.float()
            torch.distributed.send(output.detach().contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank())
        self._pending = (stage_input, output)
        return output

    def _from_last_stage(self, out: dict, with_tasks: bool, device) -> dict[str, torch.Tensor]:
        """The last stage's loss (and task sums) on every stage of the pipeline: one broadcast of [1 (+ 2 x tasks)]."""
        from megatron.core import parallel_state

        n = len(TASKS) if with_tasks else 0
        values = (torch.cat([out["loss"].detach().float().reshape(1), *([out["task_loss_sum"], out["task_tokens"]] if n else [])])
                  if self.last else torch.empty(1 + 2 * n, device=device))
        torch.distributed.broadcast(values, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                    group=parallel_state.get_pipeline_model_parallel_group())
        if self.last:
            return out
        return {"loss": values[0], **({"task_loss_sum": values[1:1 + n], "task_tokens": values[1 + n:]} if n else {})}

    def backward(self, loss: torch.Tensor) -> None:
        # under the forward's autocast: megatron's recompute (tensor_parallel.checkpoint) reruns a block's forward in
        # backward without restoring autocast as torch.utils.checkpoint does, and its fp32 weights met bf16 inputs
        with self.autocast:
            self._backward(loss)

    def _backward(self, loss: torch.Tensor) -> None:
        if self.pp == 1:
            (loss / self.accumulation).backward()
            return
        from megatron.core import parallel_state

        stage_input, output = self._pending
        self._pending = None
        if self.last:
            (loss / self.accumulation).backward()
        else:  # the next stage's gradient of this stage's output
            grad = torch.empty_like(output)
            torch.distributed.recv(grad, src=parallel_state.get_pipeline_model_parallel_next_rank())
            output.backward(grad)
        if not self.first:
            torch.distributed.send(stage_input.grad.contiguous(), dst=parallel_state.get_pipeline_model_parallel_prev_rank())

    def step(self) -> None:
        self.micro_steps += 1
        if self.micro_steps % self.accumulation:
            return
        if self.dp_size > 1:  # the mean gradient over the data-parallel replicas (as DeepSpeed)
            for p in self.params:  # every rank reduces every parameter: one replica's text-only window leaves the
                if p.grad is None:  # adapter without a gradient while another's has one
                    p.grad = torch.zeros_like(p)
                torch.distributed.all_reduce(p.grad, group=self.dp_group)
                p.grad.div_(self.dp_size)
        self._sum_tied_table_grads()
        norm = grad_norm(self.params)
        if self.grad_clip > 0:
            scale = (self.grad_clip / (norm + 1e-6)).clamp(max=1.0)  # torch's clip_grad_norm_ rule
            for p in self.params:
                if p.grad is not None:
                    p.grad.mul_(scale)
        self._grad_norm = float(norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _sum_tied_table_grads(self) -> None:
        """PP > 1 with a tied head: the first stage's table and the last stage's copy take the sum of both gradients
        (at PP=1 the one table gets both uses' gradient), so the two copies stay equal."""
        from megatron.core import parallel_state

        gpt = self.module.gpt
        if self.pp == 1 or not gpt.share_embeddings_and_output_weights or not parallel_state.is_rank_in_embedding_group():
            return
        weight = gpt.shared_embedding_or_output_weight()
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        torch.distributed.all_reduce(weight.grad, group=parallel_state.get_embedding_group())

    def get_global_grad_norm(self) -> float | None:
        return self._grad_norm

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def save_checkpoint(self, root: str, tag: str, client_state: dict) -> None:
        """<root>/<tag>/dist_checkpoint/: this rank's shards of the model and AdamW's moments (every rank writes its
        own; a replica's once), and the common part: per-parameter steps, group hyperparameters, scheduler, client
        state. Called at the end of an accumulation window (the gradients in flight are not saved)."""
        from megatron.core import dist_checkpointing, parallel_state
        from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

        if self.micro_steps % self.accumulation:
            raise RuntimeError(f"a checkpoint inside an accumulation window (micro-step {self.micro_steps})")
        adam = self.optimizer.state  # (a parameter never stepped has none: zero moments, step 0, as a fresh AdamW)
        model = sharded_model_state(self.module)
        moments, params = self._sharded_moments(model, fill=lambda p, key: adam[p].get(key, torch.zeros_like(p)))
        ranks = [None] * torch.distributed.get_world_size()  # the common part is rank 0's: every stage's steps in it
        torch.distributed.all_gather_object(ranks, {name: float(adam[p].get("step", 0)) for name, p in params.items()})
        hyper = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        state = {"model": model, "optimizer": {**moments, "steps": {k: v for r in ranks for k, v in r.items()}, "param_groups": hyper},
                 "scheduler": self.scheduler.state_dict(), "client": client_state,
                 "layout": {"tp": parallel_state.get_tensor_model_parallel_world_size(), "pp": self.pp, "dp": self.dp_size}}
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
        """Weights, AdamW's moments and steps, group hyperparameters and scheduler from <root>/<tag>, at this job's TP,
        PP and DP whichever wrote them; (the tag, its client state)."""
        model = sharded_model_state(self.module)
        moments, params = self._sharded_moments(model, fill=lambda p, key: torch.zeros_like(p))
        loaded = _load(Path(root) / tag, {"model": model, "optimizer": moments})
        _load_model(self.module, loaded["model"])
        saved = loaded["optimizer"]
        for name, p in params.items():
            if saved["steps"][name] > 0:  # (0: never stepped, no state: as a fresh AdamW)
                self.optimizer.state[p] = {"step": torch.tensor(saved["steps"][name], dtype=torch.float32),
                                           **{key: saved[key][name].to(p.device) for key in MOMENTS}}
        for group, hyper in zip(self.optimizer.param_groups, saved["param_groups"], strict=True):
            group.update(hyper)
        self.scheduler.load_state_dict(loaded["scheduler"])
        self.micro_steps = 0
        return str(Path(root) / tag), loaded["client"]

    def _sharded_moments(self, model: dict, fill) -> tuple[dict, dict]:
        """({"exp_avg": {name: ShardedTensor}, "exp_avg_sq": ...}, {name: parameter}) of the trainable parameters:
        each moment sharded as its parameter in `model` (checkpoint key "optimizer.<moment>.<the parameter's>"),
        `fill(p, moment)` its data. `name` is the parameter's at TP=1, PP=1 (global layer index; a tied head's copy on
        the last stage is the table), so steps load at any TP and PP."""
        from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor

        moments, params = {key: {} for key in MOMENTS}, {}
        for local, p in self.module.named_parameters():
            if not p.requires_grad:  # (the adapter's frozen tokenizer features: no state)
                continue
            name = local if local.startswith("adapter.") else "gpt." + global_name(self.module.gpt, local[len("gpt."):])
            params[name] = p
            for key in MOMENTS:
                moments[key][name] = make_sharded_optimizer_tensor(model[local], fill(p, key), prefix=f"optimizer.{key}")
        return moments, params


MOMENTS = ("exp_avg", "exp_avg_sq")
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


def _load(tag: Path, sharded: dict) -> dict:
    """dist_checkpointing.load of <tag>/dist_checkpoint into `sharded`'s layout; the common part comes back too.
    Nothing in it runs: .metadata is checked against DCP_METADATA, every torch.load inside is weights-only."""
    from megatron.core import dist_checkpointing

    folder = tag / DIST
    if not (folder / "metadata.json").is_file():
        raise FileNotFoundError(f"{tag}: no {DIST}/metadata.json: not a checkpoint of the Megatron backend (its former "
                                "weights.safetensors + optim_rank<r>.pt format is not read)")
    check_pickle(folder / ".metadata", DCP_METADATA)
    with weights_only_loads(), warnings.catch_warnings():  # megatron-core 0.16 calls torch APIs torch deprecates
        warnings.simplefilter("ignore", FutureWarning)    # (load_state_dict, ShardedTensor), once per load
        return dist_checkpointing.load(sharded, str(folder))


def _load_model(model: MegatronLM, state: dict) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ValueError(f"checkpoint and model differ: missing {missing[:4]}, unexpected {unexpected[:4]}")


def load_weights(model: MegatronLM, tag: str | Path) -> None:
    """The weights of a checkpoint tag into `model`, at this job's TP and PP (any TP and PP wrote them)."""
    _load_model(model, _load(Path(tag), {"model": sharded_model_state(model)})["model"])
