"""Building and editing the LLM under DeepSpeed ZeRO-3 partitioning, so no rank ever holds the full model.

`zero3_build(ds_config)` registers the config with transformers' DeepSpeed integration (kept alive for the
whole job, as HF's Trainer does): from then on AutoModelForCausalLM.from_config / from_pretrained build
inside deepspeed.zero.Init in the config's dtype (bf16 when enabled), each rank allocating only its shard
(plus one module at a time while it is initialised). The helpers below edit such a model: every one is a
plain no-op wrapper when ZeRO-3 is off (single process, ZeRO-2, inference).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn as nn


def zero3_build(ds_config: dict | None):
    """An object to keep alive while models are built and trained (None unless ds_config is ZeRO stage 3)."""
    if not ds_config or ds_config.get("zero_optimization", {}).get("stage") != 3:
        return None
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(ds_config)


def zero3() -> bool:
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


def partitioned_init():
    """Context in which new modules are built partitioned under ZeRO-3."""
    if not zero3():
        return nullcontext()
    import deepspeed
    from transformers.integrations import deepspeed_config

    return deepspeed.zero.Init(config_dict_or_path=deepspeed_config())


def gathered(params: list[nn.Parameter], modifier_rank: int | None = 0):
    """Full tensors of partitioned parameters inside the block; edits made by `modifier_rank` are scattered
    back on exit (None: read only)."""
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def full_shape(p: nn.Parameter) -> torch.Size:
    return getattr(p, "ds_shape", p.shape)


def with_rows(old: nn.Embedding | nn.Linear, rows: int, tail=None) -> nn.Embedding | nn.Linear:
    """A copy of an embedding table or bias-free head [n, d] with `rows` rows, same dtype and device,
    partitioned under ZeRO-3: rows [0, min(rows, n)) copied, new rows from tail(old [n, d], lo, hi) -> [hi - lo, d]
    (zeros without one). Only `old` is ever gathered; each rank writes just its own shard of the new matrix."""
    n, d = full_shape(old.weight)
    kw = dict(dtype=old.weight.dtype, device=old.weight.device)
    with partitioned_init():
        if isinstance(old, nn.Embedding):
            new = nn.Embedding(rows, d, padding_idx=old.padding_idx if old.padding_idx is None or old.padding_idx < rows else None, **kw)
        else:
            new = nn.Linear(d, rows, bias=False, **kw)
    keep = min(rows, n)

    def block(lo: int, hi: int) -> torch.Tensor:
        parts = [old.weight[lo : min(hi, keep)]] if lo < keep else []
        if hi > keep:
            start = max(lo, keep)
            parts.append(tail(old.weight, start, hi) if tail else torch.zeros(hi - start, d, device=old.weight.device))
        return torch.cat([p.to(new.weight.dtype) for p in parts])

    with gathered([old.weight], modifier_rank=None), torch.no_grad():
        fill_rows(new.weight, block)
    return new


def fill_rows(param: nn.Parameter, rows_fn, block: int = 8192) -> None:
    """param [R, d] <- rows_fn(lo, hi) [hi - lo, d], `block` rows at a time. Partitioned: ZeRO-3 keeps elements
    [r * s, (r + 1) * s) of the flattened parameter on rank r (s: shard size), so each rank computes only the
    rows that overlap its shard."""
    R, d = full_shape(param)
    if not hasattr(param, "ds_tensor"):
        for lo in range(0, R, block):
            param.data[lo : lo + block] = rows_fn(lo, min(lo + block, R))
        return
    shard = param.ds_tensor.view(-1)  # [s]
    start = torch.distributed.get_rank(group=param.ds_process_group) * shard.numel()
    stop = min(start + shard.numel(), R * d)
    shard.zero_()
    for lo in range(start // d, -(-stop // d), block):
        hi = min(lo + block, -(-stop // d))
        flat = rows_fn(lo, hi).reshape(-1)  # elements [lo * d, hi * d) of the flattened parameter
        a, b = max(start, lo * d), min(stop, hi * d)
        shard[a - start : b - start].copy_(flat[a - lo * d : b - lo * d])
