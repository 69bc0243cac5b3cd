"""Cross-entropy over a large vocabulary without materialising [tokens, vocab] logits.

`chunked_cross_entropy(hidden [N, d], weight [V, d], targets [N], chunk) -> per-token loss [N]` (fp32;
fp64 for fp64 inputs) computes the logits of `chunk` rows at a time in forward, keeps only their
log-sum-exp, and recomputes them in backward (grad = softmax - onehot). Only supervised positions are
passed in, so prompts and padding cost nothing.

Transient memory of one chunk: the product in the input dtype plus its fp32 copy, edited in place from then
on: `logit_bytes(dtype)` = 6 bytes per logit in bf16 (2 + 4), 4 in fp32. Measured on CPU (peak RSS, bf16,
256 tokens x 348,544 rows, forward + backward, `benchmarks/mllm_memory.py --loss-chunk 256`): 6.43 bytes
per logit, 0.53 GiB, i.e. 2.1 GiB at 1,024 tokens (the old out-of-place version: 10 bytes per logit,
3.3 GiB by count). `chunk_for_budget` picks the chunk from a byte budget.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def logit_bytes(dtype: torch.dtype) -> int:
    """Peak transient bytes per (token, vocabulary row) pair of one chunk, for inputs of `dtype`."""
    acc = torch.promote_types(dtype, torch.float32)
    size, acc_size = torch.empty(0, dtype=dtype).element_size(), torch.empty(0, dtype=acc).element_size()
    return acc_size + (size if dtype != acc else 0)


def chunk_for_budget(chunk: int, budget_gb: float, vocab_size: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """`chunk` when > 0, else the most tokens whose chunk transients fit budget_gb GiB (at least 1)."""
    if chunk > 0:
        return chunk
    return max(1, int(budget_gb * 2**30) // (logit_bytes(dtype) * vocab_size))


class _ChunkedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, frozen_rows: int):
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32 accumulation for bf16/fp16 inputs
        lse = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
        target_logit = torch.empty_like(lse)
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk]
            logits = (h @ weight.t()).to(acc)  # [c, V]; the input-dtype product is freed here
            target_logit[start : start + chunk] = logits.gather(1, targets[start : start + chunk, None]).squeeze(1)
            top = logits.amax(dim=1, keepdim=True)  # log-sum-exp in place: no second [c, V] buffer
            lse[start : start + chunk] = logits.sub_(top).exp_().sum(dim=1).log_() + top.squeeze(1)
            del logits
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk, ctx.frozen_rows = chunk, frozen_rows
        return lse - target_logit

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, targets, lse = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        acc = lse.dtype
        # accumulated in the weight's dtype, as Liger-Kernel does: an fp32 [V, d] buffer plus a converted copy
        # per chunk would cost ~5 GB at 348K x 1536 (each chunk's GEMM still accumulates in fp32)
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], ctx.chunk):
            sl = slice(start, start + ctx.chunk)
            h = hidden[sl]
            probs = (h @ weight.t()).to(acc).sub_(lse[sl, None]).exp_()  # softmax [c, V], edited in place
            probs[torch.arange(len(h), device=h.device), targets[sl]] -= 1.0
            probs *= grad_loss[sl, None].to(acc)
            g = probs.to(hidden.dtype)
            del probs  # g is probs itself when the input is fp32
            if grad_hidden is not None:
                grad_hidden[sl] = g @ weight
            if grad_weight is not None:  # rows below frozen_rows get no gradient
                grad_weight[ctx.frozen_rows :].addmm_(g[:, ctx.frozen_rows :].t(), h)
        return grad_hidden, grad_weight, None, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                          frozen_rows: int = 0) -> torch.Tensor:
    """hidden [N, d], head weight [V, d], targets [N] in [0, V) -> per-token loss [N] (fp32, or fp64 for fp64 in).

    frozen_rows: weight rows [0, frozen_rows) receive a zero gradient (adapter-only training keeps the text
    rows of the head fixed while its visual rows learn)."""
    return _ChunkedCE.apply(hidden, weight, targets, chunk, frozen_rows)


class ChunkedLMHead(nn.Linear):
    """The LM head; given targets it returns per-token losses through the chunked cross-entropy.

    Computing the loss inside the head's own forward keeps ZeRO-3's gather of its weight in effect."""

    chunk = 1024  # tokens per chunk; the trainer sets it from its config (mllm.loss.chunk_for_budget)
    frozen_rows = 0  # rows [0, frozen_rows) get no gradient (set by SemHiTokLM.freeze_text)

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [N, d] -> logits [N, V]; with targets [N]: per-token loss [N] fp32"""
        if targets is None:
            return super().forward(hidden)
        return chunked_cross_entropy(hidden, self.weight, targets, self.chunk, self.frozen_rows)
