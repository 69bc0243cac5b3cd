"""The training step of the Megatron backend: MegatronEngine offers the engine calls mllm/train.py's loop makes
(forward -> {"loss", "task_loss_sum", "task_tokens"}, backward, step, grad norm, save/load of a checkpoint tag) with
DeepSpeed's semantics (backward divides by the accumulation steps; step() at the end of a window averages the
gradients over the data-parallel group, clips by the global norm, steps the optimizer and the scheduler).

Parallelism comes from megatron's parallel_state: tensor parallel inside the GPTModel's layers (and its
vocabulary-parallel cross-entropy), data parallel here. Weights and the optimizer stay fp32; bf16 runs the forward
under autocast. Megatron-Core's own DDP, distributed optimizer and pipeline schedules allocate on CUDA
(torch.cuda.current_device(), 'torch.cuda.FloatTensor' checks) and cannot run on CPU, where this backend is tested;
pipeline parallelism needs them and is refused until a GPU test covers it.

A checkpoint tag holds weights.safetensors (the GPTModel gathered over TP to its TP=1 state, and the adapter: loadable
at any TP) and optim_rank<r>.pt (this rank's optimizer, scheduler and client state: resuming needs the same TP x DP).
megatron.core.dist_checkpointing is not used: its torch_dist strategy in 0.16 synchronises CUDA when preloading,
broadcasts CUDA tensors when finishing a save and loads shards into CUDA tensors, so it cannot run on CPU where this
backend is tested; gathering to one file costs a full copy on the first rank per checkpoint (the next step for
multi-node sizes is dist_checkpointing on GPU, tested there).
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from semhitok.common.io import atomic_path
from semhitok.common.safe_load import load_state
from semhitok.data_pipelines.sequences import IGNORE, TASKS
from semhitok.mllm.megatron.model import MegatronLM, gather_full_state, load_full_state

WEIGHTS = "weights.safetensors"  # a checkpoint tag's weights: GPTModel gathered to TP=1 (gpt.*) and the adapter (adapter.*)


def weighted_mean(losses: torch.Tensor, tasks: torch.Tensor | None, task_weights: torch.Tensor | None, count: int) -> torch.Tensor:
    """per-token losses [N] -> the mean SemHiTokLM.forward takes: by task weight (needs tasks [N]), else over count."""
    if task_weights is not None:
        weights = task_weights.to(losses.dtype)[tasks]
        return (losses * weights).sum() / weights.sum().clamp(min=torch.finfo(losses.dtype).tiny)
    return losses.sum() / max(count, 1)


def grad_norm(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """The global L2 norm of the gradients of a TP-sharded model: a TP-split parameter's shard counts on its rank,
    a replicated one (norms, adapter) once, on TP rank 0."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    total = torch.zeros((), dtype=torch.float32, device=params[0].device if params else "cpu")
    for p in params:
        if p.grad is not None and param_is_not_tensor_parallel_duplicate(p):
            total += p.grad.float().pow(2).sum()
    torch.distributed.all_reduce(total, group=parallel_state.get_model_parallel_group())
    return total.sqrt()


class MegatronEngine:
    def __init__(self, model: MegatronLM, optimizer: torch.optim.Optimizer, scheduler, gradient_accumulation: int,
                 grad_clip: float, bf16: bool, device: torch.device):
        from megatron.core import parallel_state

        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            raise NotImplementedError("mllm_train.pipeline_parallel > 1: the pipeline schedule needs megatron-core's "
                                      "CUDA-only schedules; use tensor and data parallelism")
        self.module, self.optimizer, self.scheduler = model.to(device), optimizer, scheduler
        self.accumulation, self.grad_clip = gradient_accumulation, grad_clip
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.dp_group, self.dp_size = parallel_state.get_data_parallel_group(), parallel_state.get_data_parallel_world_size()
        self.micro_steps, self._grad_norm = 0, None
        self.module.train()

    def __call__(self, input_ids, position_ids, labels, task_ids=None, task_weights=None, **_) -> dict[str, torch.Tensor]:
        """Packed rows [B, T] -> SemHiTokLM.forward's dict (loss: the mean over supervised next tokens)."""
        with self.autocast:
            losses = self.module(input_ids, position_ids, labels)  # [B, T]: position t's loss on token t + 1
        mask = labels[:, 1:] != IGNORE
        losses = losses[:, :-1][mask]  # [N], in SemHiTokLM's order
        tasks = task_ids[:, 1:][mask] if task_ids is not None else None
        out = {"loss": weighted_mean(losses, tasks, task_weights, int(mask.sum()))}
        if tasks is not None:
            out["task_loss_sum"] = torch.zeros(len(TASKS), device=losses.device).index_add_(0, tasks, losses.detach())
            out["task_tokens"] = torch.bincount(tasks, minlength=len(TASKS)).float()
        return out

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation).backward()

    def step(self) -> None:
        self.micro_steps += 1
        if self.micro_steps % self.accumulation:
            return
        if self.dp_size > 1:  # the mean gradient over the data-parallel replicas (as DeepSpeed)
            for p in self.params:
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad, group=self.dp_group)
                    p.grad.div_(self.dp_size)
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

    def get_global_grad_norm(self) -> float | None:
        return self._grad_norm

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def save_checkpoint(self, root: str, tag: str, client_state: dict) -> None:
        from megatron.core import parallel_state

        folder = Path(root) / tag
        folder.mkdir(parents=True, exist_ok=True)
        full = gather_full_state(self.module.gpt)  # every rank takes part; the first writes
        rank = torch.distributed.get_rank()
        if rank == 0:
            with atomic_path(folder / WEIGHTS) as tmp:
                save_file({**{f"gpt.{k}": v.contiguous() for k, v in full.items()},
                           **{f"adapter.{k}": v.detach().contiguous().cpu() for k, v in self.module.adapter.state_dict().items()}}, str(tmp))
        with atomic_path(folder / f"optim_rank{rank}.pt") as tmp:
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "micro_steps": self.micro_steps, "client": client_state,
                        "tp": parallel_state.get_tensor_model_parallel_world_size(), "dp": self.dp_size}, tmp)

    def load_checkpoint(self, root: str, tag: str) -> tuple[str | None, dict]:
        from megatron.core import parallel_state

        folder = Path(root) / tag
        rank = torch.distributed.get_rank()
        if not (folder / f"optim_rank{rank}.pt").is_file():
            return None, {}
        state = load_state(folder / f"optim_rank{rank}.pt")  # tensors and containers only: nothing in it runs
        tp = parallel_state.get_tensor_model_parallel_world_size()
        if (state["tp"], state["dp"]) != (tp, self.dp_size):
            raise ValueError(f"{folder}: written at TP {state['tp']} x DP {state['dp']}, this job is TP {tp} x DP "
                             f"{self.dp_size}: resume with the same layout (load_weights reads the weights at any TP)")
        load_weights(self.module, folder)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.micro_steps = state["micro_steps"]
        return str(folder), state["client"]


def load_weights(model: MegatronLM, folder: str | Path) -> None:
    """The weights of a checkpoint tag (weights.safetensors: the full TP=1 state) into `model`, sliced for this
    job's TP (any TP wrote it)."""
    state = load_file(str(Path(folder) / WEIGHTS))
    load_full_state(model.gpt, {k[len("gpt."):]: v for k, v in state.items() if k.startswith("gpt.")})
    if model.adapter is not None:
        model.adapter.load_state_dict({k[len("adapter."):]: v for k, v in state.items() if k.startswith("adapter.")})
