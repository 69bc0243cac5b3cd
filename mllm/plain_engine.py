"""`mllm_train.deepspeed_config=none`: the training loop on plain PyTorch, one process, no DeepSpeed.

PlainEngine offers the few engine calls train.py makes (forward, backward, step, grad norm, save/load of a
checkpoint tag) with DeepSpeed's semantics: backward divides the loss by the accumulation steps; step()
clips, steps the optimizer and the scheduler at the end of every accumulation window. Weights stay fp32;
bf16 runs the forward under autocast. A checkpoint tag holds model.safetensors (tied weights stored once)
and plain_state.pt (optimizer, scheduler, client state), beside the loader position and RNG train.py adds.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_model, save_model

from semhitok.common.io import atomic_path
from semhitok.common.safe_load import load_state


class PlainEngine:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, gradient_accumulation: int,
                 grad_clip: float, bf16: bool, device: torch.device):
        self.module, self.optimizer, self.scheduler = model.to(device), optimizer, scheduler
        self.accumulation, self.grad_clip = gradient_accumulation, grad_clip
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
        self.micro_steps, self._grad_norm = 0, None
        self.module.train()

    def __call__(self, **batch):
        with self.autocast:
            return self.module(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation).backward()

    def step(self) -> None:
        self.micro_steps += 1
        if self.micro_steps % self.accumulation:
            return
        params = [p for p in self.module.parameters() if p.grad is not None]
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")  # 0: no clipping (as in DeepSpeed)
        self._grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def get_global_grad_norm(self) -> float | None:
        return self._grad_norm

    def save_checkpoint(self, root: str, tag: str, client_state: dict) -> None:
        folder = Path(root) / tag
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / "model.safetensors") as tmp:
            save_model(self.module, str(tmp))
        with atomic_path(folder / "plain_state.pt") as tmp:
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "micro_steps": self.micro_steps, "client": client_state}, tmp)

    def load_checkpoint(self, root: str, tag: str) -> tuple[str | None, dict]:
        folder = Path(root) / tag
        if not (folder / "plain_state.pt").is_file():
            return None, {}
        missing, unexpected = load_model(self.module, str(folder / "model.safetensors"), strict=True)
        state = load_state(folder / "plain_state.pt")  # tensors and containers only: nothing in it runs
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.micro_steps = state["micro_steps"]
        return str(folder), state["client"]
