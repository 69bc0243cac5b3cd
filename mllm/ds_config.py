"""DeepSpeed JSONs with HF/LLaVA-style "auto" values, filled in from the training config.

`"auto"` is how HF Trainer and LLaVA's zero2/zero3.json leave a value to the trainer; DeepSpeed itself
rejects it. Every "auto" is resolved here (an "auto" this file does not know is an error that names its
key). The trainer builds its own AdamW (per-group learning rates) and warmup-cosine schedule, so a JSON
"optimizer"/"scheduler" section is resolved for the record, then dropped with a warning.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("semhitok")


def auto_values(cfg, bf16: bool, world_size: int, hidden_size: int | None) -> dict[str, Any]:
    """dotted key (a suffix of the JSON path) -> the value the training config gives it"""
    t, micro = cfg.mllm_train, cfg.data.micro_batch_size
    values: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": t.gradient_accumulation,
        "train_batch_size": micro * t.gradient_accumulation * world_size,
        "gradient_clipping": t.grad_clip,
        "bf16.enabled": bf16,
        "fp16.enabled": False,  # the trainer runs bf16 or fp32
        "optimizer.params.lr": t.lr,
        "optimizer.params.weight_decay": t.weight_decay,
        "optimizer.params.betas": [0.9, 0.95],
        "optimizer.params.eps": 1e-8,
        "scheduler.params.warmup_min_lr": 0.0,
        "scheduler.params.warmup_max_lr": t.lr,
        "scheduler.params.warmup_num_steps": t.warmup_steps,
        "scheduler.params.total_num_steps": t.max_steps,
    }
    if hidden_size:  # HF Trainer's choices for the bucket sizes
        values.update({"zero_optimization.reduce_bucket_size": hidden_size * hidden_size,
                       "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
                       "zero_optimization.stage3_param_persistence_threshold": 10 * hidden_size})
    return values


def resolve_auto(node: Any, values: dict[str, Any], where: str = "") -> Any:
    """Replace every "auto" in a parsed DeepSpeed JSON; `where` is the dotted path of `node`."""
    if isinstance(node, dict):
        return {k: resolve_auto(v, values, f"{where}.{k}" if where else k) for k, v in node.items()}
    if isinstance(node, list):
        return [resolve_auto(v, values, f"{where}[{i}]") for i, v in enumerate(node)]
    if node == "auto":
        if where not in values:
            raise ValueError(f"DeepSpeed config: cannot resolve \"auto\" at {where} (known: {sorted(values)})")
        return values[where]
    return node


def load_deepspeed_config(path: str | Path, cfg, bf16: bool, world_size: int = 1, hidden_size: int | None = None) -> dict:
    """The JSON at `path` with "auto" resolved and the batch, accumulation, clipping and precision keys set
    from the training config (explicit values in the JSON for these are overridden: the trainer's are
    authoritative)."""
    path = Path(path)
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    values = auto_values(cfg, bf16, world_size, hidden_size)
    ds = resolve_auto(ds, values)
    for section in ("optimizer", "scheduler"):
        if ds.pop(section, None) is not None:
            log.warning("%s: its %r section is ignored: the trainer builds its own from mllm_train.*", path, section)
    ds.update(train_micro_batch_size_per_gpu=values["train_micro_batch_size_per_gpu"],
              gradient_accumulation_steps=values["gradient_accumulation_steps"],
              train_batch_size=values["train_batch_size"], gradient_clipping=values["gradient_clipping"],
              bf16={**ds.get("bf16", {}), "enabled": bf16})
    if ds.get("fp16", {}).get("enabled"):
        raise ValueError(f"{path}: fp16 is not supported by this trainer (mllm_train.precision: bf16 or fp32)")
    return ds
