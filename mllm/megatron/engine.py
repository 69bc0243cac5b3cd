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

A checkpoint tag holds weights.safetensors (the GPTModel gathered over TP and PP to its TP=1, PP=1 state, and the
adapter: loadable at any TP and PP) and optim_rank<r>.pt (this rank's optimizer, scheduler and client state: resuming needs the same TP x PP x DP).
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
                        "tp": parallel_state.get_tensor_model_parallel_world_size(), "pp": self.pp, "dp": self.dp_size}, tmp)

    def load_checkpoint(self, root: str, tag: str) -> tuple[str | None, dict]:
        from megatron.core import parallel_state

        folder = Path(root) / tag
        rank = torch.distributed.get_rank()
        if not (folder / f"optim_rank{rank}.pt").is_file():
            return None, {}
        state = load_state(folder / f"optim_rank{rank}.pt")  # tensors and containers only: nothing in it runs
        tp = parallel_state.get_tensor_model_parallel_world_size()
        if (state["tp"], state.get("pp", 1), state["dp"]) != (tp, self.pp, self.dp_size):
            raise ValueError(f"{folder}: written at TP {state['tp']} x PP {state.get('pp', 1)} x DP {state['dp']}, this job is "
                             f"TP {tp} x PP {self.pp} x DP {self.dp_size}: resume with the same layout (load_weights reads "
                             "the weights at any TP and PP)")
        load_weights(self.module, folder)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.micro_steps = state["micro_steps"]
        return str(folder), state["client"]


def load_weights(model: MegatronLM, folder: str | Path) -> None:
    """The weights of a checkpoint tag (weights.safetensors: the full TP=1, PP=1 state) into `model`, sliced for this
    job's TP (any TP wrote it)."""
    state = load_file(str(Path(folder) / WEIGHTS))
    load_full_state(model.gpt, {k[len("gpt."):]: v for k, v in state.items() if k.startswith("gpt.")})
    if model.adapter is not None:
        model.adapter.load_state_dict({k[len("adapter."):]: v for k, v in state.items() if k.startswith("adapter.")})
