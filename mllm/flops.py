"""Training FLOPs of one packed batch, for an MFU that does not flatter the trainer.

PaLM's model-FLOPs convention (6 per parameter per token, 12 L d per attended pair, the causal square
counted in full so figures compare with published MFU), with three corrections for packed SemHiTok rows:
  - the LM head (V x d) is charged only for supervised positions: the others never reach it (mllm/loss.py);
  - attention is charged per document, 12 L d sum(n_i^2), n_i each document's own length, not the row's;
  - padding tails cost nothing; the adapter is charged for visual input positions only;
  - depth codes: the depth heads (mllm/depth_head.py) are charged per visual target, each group running its D
    codes through its blocks with attention over the D depths (depth_head_flops).
A ZeRO-3 parameter is counted by its full size (ds_numel), not its local shard.
"""

from __future__ import annotations

import torch


def numel(p: torch.nn.Parameter) -> int:
    """Full element count, also for a ZeRO-3 partitioned parameter (whose local tensor is empty)."""
    return int(getattr(p, "ds_numel", p.numel()))


def parameter_counts(model) -> tuple[int, int, int]:
    """(transformer body incl. final norm, LM head V x d, adapter): the parameters the FLOP counts charge
    (the input table is a lookup, never charged)."""
    body = sum(numel(p) for p in model.lm.model.layers.parameters()) + sum(numel(p) for p in model.lm.model.norm.parameters())
    return body, model.layout.vocab_size * model.lm.config.hidden_size, sum(numel(p) for p in model.adapter.parameters())


def document_lengths(position_ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """position_ids [B, T] restarting at 0 per document, valid [B, T] (False on padding) -> lengths [D]."""
    starts = position_ids == 0
    starts[:, 0] = True
    doc = torch.cumsum(starts.flatten(), 0) - 1  # [B*T] document index of every position
    return torch.bincount(doc[valid.flatten()])


def depth_head_flops(heads, targets: int) -> float:
    """FLOPs of one forward+backward of DepthHeads (or 0 for None) over `targets` visual targets: per group of D
    codes, h_p's projection once, the blocks and final norm at each of the D depths, each depth's classifier
    (V_l x width) once, attention 12 layers width D^2 (the causal square in full, as above); lookups are free."""
    if heads is None:
        return 0.0
    per_target = 0.0
    for group in heads.groups:
        depth, width = len(group.vocab_sizes), group.pos.shape[1]
        blocks = sum(numel(p) for p in group.blocks.parameters()) + sum(numel(p) for p in group.norm.parameters())
        classifiers = sum(v * width for v in group.vocab_sizes)
        per_target += 6.0 * (numel(group.proj.weight) + blocks * depth + classifiers) + 12.0 * len(group.blocks) * width * depth**2
    return per_target * targets


def batch_flops(model, position_ids: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor,
                input_ids: torch.Tensor | None = None) -> float:
    """FLOPs of one forward+backward over a packed batch [B, T]: labels IGNORE (-100) where unsupervised,
    valid False on padding, input_ids (optional) to charge the adapter for visual positions only."""
    c = model.lm.config
    body, head, adapter = parameter_counts(model)
    tokens = int(valid.sum())
    supervised = int((labels[:, 1:] != -100).sum())
    visual = int((input_ids >= model.layout.visual_offset).sum()) if input_ids is not None else tokens
    attn_width = c.num_attention_heads * (getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
    pairs = float((document_lengths(position_ids, valid).double() ** 2).sum())
    visual_targets = int((labels[:, 1:] >= model.layout.visual_offset).sum())
    return (6.0 * (body * tokens + head * supervised + adapter * visual) + 12.0 * c.num_hidden_layers * attn_width * pairs
            + depth_head_flops(model.visual_head, visual_targets))


def row_flops(model, tokens: int, seq_len: int) -> float:
    """The formula logged before the corrections: 6 (body + adapter + head) per token + 12 L d T, for
    comparison only (it charges the head at every position and attention over the whole row)."""
    c = model.lm.config
    n = sum(parameter_counts(model))
    return tokens * (6.0 * n + 12.0 * c.num_hidden_layers * c.hidden_size * seq_len)
