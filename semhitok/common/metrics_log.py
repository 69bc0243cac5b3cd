"""Metric logging: always a metrics.jsonl, plus tensorboard and/or wandb when asked and installed.

wandb defaults to offline mode so a run on a machine without network or API key never fails on logging.
A wandb run is named after its directory (the last three path parts, or $WANDB_NAME) and its id is kept
in <out_dir>/wandb_run_id, so a restarted or requeued job resumes the same wandb run.
A run that resumes at step s first drops the rows past s (logged after that checkpoint by the interrupted
job), so metrics.jsonl has one row set per step.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from semhitok.common.io import atomic_path

log = logging.getLogger("semhitok")


class NonFiniteLoss(RuntimeError):
    """A training loss that is NaN or inf, found where the logged values are reduced (torch-free: the CLI catches it)."""


def wandb_identity(out_dir: Path, new_id) -> dict[str, str]:
    """{"name", "id"} for wandb.init: the id is created once (new_id()) and stored in out_dir/wandb_run_id."""
    from semhitok.common.io import atomic_path

    id_file = out_dir / "wandb_run_id"
    if not id_file.is_file():
        with atomic_path(id_file) as tmp:
            tmp.write_text(new_id() + "\n")
    name = os.environ.get("WANDB_NAME") or "/".join(out_dir.resolve().parts[-3:])
    return {"name": name, "id": id_file.read_text().strip()}


class MetricLogger:
    def __init__(self, out_dir: str | Path, backends: list[str], run_config: dict, enabled: bool = True,
                 resume_step: int | None = None):
        """resume_step: the step the run continues from (0: a fresh start); rows logged past it by an
        interrupted job are dropped first, atomically."""
        self.enabled = enabled
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            drop_rows_after(out_dir / "metrics.jsonl", resume_step)
        self._jsonl = open(out_dir / "metrics.jsonl", "a")
        for backend in backends:
            if backend == "tensorboard":
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:
                    log.warning("tensorboard logging asked for but not installed (pip install tensorboard); skipping it")
                    continue
                self._tb = SummaryWriter(str(out_dir / "tensorboard"))
            elif backend == "wandb":
                try:
                    import wandb
                except ImportError:
                    log.warning("wandb logging asked for but not installed (pip install wandb); skipping it")
                    continue
                os.environ.setdefault("WANDB_MODE", "offline")
                self._wandb = wandb.init(project="semhitok", dir=str(out_dir), config=run_config, resume="allow",
                                         **wandb_identity(out_dir, wandb.util.generate_id))
            elif backend != "jsonl":
                raise ValueError(f"unknown log backend {backend!r}; use jsonl, tensorboard or wandb")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def drop_rows_after(path: Path, step: int) -> int:
    """Keep the rows of `path` with step <= `step` (a fresh start, step 0, keeps none: its step-0 rows are
    logged again); unreadable lines (a write cut by a kill) go too. Returns the rows dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
            keep = step > 0 and int(row["step"]) <= step
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        with atomic_path(path) as tmp:
            tmp.write_text("".join(f"{line}\n" for line in kept))
        log.info("%s: dropped %d row(s) past step %d (logged after the checkpoint the run resumes from)", path, dropped, step)
    return dropped
