"""Depth heads: the visual output of the unified LLM when each image position carries L > 1 codes.

The depth codes format (tokenizer/codec.py DepthCodes) hands these heads the hidden states. A tokenizer with residual depth (DualToken: 8 semantic residual codes then 8 pixel ones per position,
code_groups (8, 8)) cannot list its ids as vocabulary rows (16384^8 combinations). As in DualToken
(arXiv 2503.14324, sec. 3.3, after RQ-VAE's depth transformer), the LLM's hidden state h_p at the position
before a visual token goes to one small causal transformer per code group, which predicts that group's D
codes one after the other:

    input at depth 1:      I_1 = W h_p                                 (W: d_model -> width)
    input at depth k > 1:  I_k = sum_{j<k} e_j(r_j)                    (eq. 5: the embeddings of the codes so far)
    x_k = I_k + pos_k;  3 pre-norm causal blocks over the D depths;  logits_k = classifier_k(norm(x_k))

h_p reaches the deeper steps through causal attention to depth 1 (eq. 5 adds no h_p term). Each depth has its
own classifier (the paper's "separate classification heads") and its own code embedding e_j (codebooks may
differ per depth in the VisualTokenizer contract). Groups are independent: the semantic head never sees the
pixel codes and vice versa. A position's loss is the summed NLL of all L codes (eq. 8).

`forward(hidden [M, d], codes [M, L]) -> [M]` is the teacher-forced loss (called as a module so ZeRO-3 gathers
the weights); `loss` is the same. M may be 0 (a batch without visual targets): every parameter still gets a
(zero) gradient, so ZeRO-3 ranks stay in step. The MLLM (SemHiTokLM.visual_head) adds it at the positions
whose next token is visual, on top of the flat head's loss for the placeholder row. `sample(hidden [B, d], pick) -> codes [B, L]` decodes step by step
with a KV cache over depth: each code runs one position through the blocks, attending to the keys and values
of the depths before it (the teacher-forced forward's causal attention, one row at a time).
Classifiers are ChunkedLMHead's: no [M, V] logits are kept for backward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from semhitok.mllm.config import MLLMConfig
from semhitok.mllm.loss import ChunkedLMHead

# pick(logits [B, V_l] fp32, l: the code's index in [0, L)) -> ids [B]: the caller's CFG / temperature / top-k / top-p
Pick = Callable[[torch.Tensor, int], torch.Tensor]


class DepthBlock(nn.Module):
    """Pre-norm transformer block, causal over the depth axis."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"depth head width {width} is not a multiple of its {heads} attention heads")
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, cache: list[torch.Tensor] | None = None) -> torch.Tensor:
        """[M, k, w] -> [M, k, w], causal over k. cache: the keys and values of the depths before x ([M, heads,
        j, w/heads] each, appended to in place; empty at the first depth), x then being the next depth(s)."""
        m, k, w = x.shape
        q, kk, v = self.qkv(self.norm1(x)).view(m, k, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        if cache is not None:
            if cache:
                kk, v = torch.cat([cache[0], kk], dim=2), torch.cat([cache[1], v], dim=2)
            cache[:] = [kk, v]
        # one new depth sees every cached one; several new ones (or no cache) attend causally
        attn = F.scaled_dot_product_attention(q, kk, v, is_causal=k > 1)  # [M, heads, k, w/heads]
        x = x + self.out(attn.transpose(1, 2).reshape(m, k, w))
        return x + self.mlp(self.norm2(x))


class DepthTransformer(nn.Module):
    """One code group: h_p [M, d] and its first codes -> features at each depth [M, k, width]."""

    def __init__(self, d_model: int, vocab_sizes: tuple[int, ...], layers: int, width: int, heads: int):
        super().__init__()
        self.vocab_sizes = tuple(vocab_sizes)
        depth = len(vocab_sizes)
        self.proj = nn.Linear(d_model, width)
        self.embeds = nn.ModuleList(nn.Embedding(v, width) for v in vocab_sizes[:-1])  # e_j: the last code is never an input
        self.pos = nn.Parameter(torch.zeros(depth, width))
        self.blocks = nn.ModuleList(DepthBlock(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.classifiers = nn.ModuleList(ChunkedLMHead(width, v, bias=False) for v in vocab_sizes)
        for module in self.modules():  # GPT-style small init: h_p's projection and the code embeddings start alike
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, hidden: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """hidden [M, d], codes [M, k - 1] (the group's first k - 1 codes, k <= D) -> features [M, k, width]"""
        first = self.proj(hidden.to(self.proj.weight.dtype))[:, None]  # [M, 1, w]
        if codes.shape[1]:
            embs = torch.stack([self.embeds[j](codes[:, j]) for j in range(codes.shape[1])], dim=1)  # [M, k-1, w]
            first = torch.cat([first, embs.cumsum(dim=1)], dim=1)  # I_k = sum_{j<k} e_j(r_j)
        x = first + self.pos[: first.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def step(self, inputs: torch.Tensor, k: int, cache: list[list[torch.Tensor]]) -> torch.Tensor:
        """Depth k's input I_k [M, d or width] (k == 0: h_p, projected here; else the code embeddings' sum) and
        each block's cache of depths < k (appended to) -> depth k's features [M, width]"""
        x = (self.proj(inputs.to(self.proj.weight.dtype)) if k == 0 else inputs)[:, None] + self.pos[k]
        for block, kv in zip(self.blocks, cache):
            x = block(x, kv)
        return self.norm(x)[:, 0]


class DepthHeads(nn.Module):
    """One DepthTransformer per code group (DualToken: semantic head, pixel head)."""

    def __init__(self, d_model: int, code_vocab_sizes: tuple[int, ...], code_groups: tuple[int, ...], layers: int = 3,
                 width: int = 0, heads: int = 0):
        """width 0: d_model; heads 0: width // 64 (at least 1)."""
        super().__init__()
        if sum(code_groups) != len(code_vocab_sizes) or min(code_groups, default=0) < 1:
            raise ValueError(f"code_groups {tuple(code_groups)} must be positive and sum to L = {len(code_vocab_sizes)}")
        width = width or d_model
        heads = heads or max(1, width // 64)
        self.code_vocab_sizes, self.code_groups = tuple(code_vocab_sizes), tuple(code_groups)
        self.starts = [sum(code_groups[:i]) for i in range(len(code_groups))]  # first code index of each group
        self.spec = {"d_model": d_model, "code_vocab_sizes": list(code_vocab_sizes), "code_groups": list(code_groups),
                     "layers": layers, "width": width, "heads": heads}  # the constructor's arguments (saved as JSON)
        self.groups = nn.ModuleList(DepthTransformer(d_model, self.code_vocab_sizes[s : s + n], layers, width, heads)
                                    for s, n in zip(self.starts, code_groups))

    @classmethod
    def for_ids(cls, cfg: MLLMConfig, d_model: int, code_vocab_sizes: tuple[int, ...], code_groups: tuple[int, ...]) -> DepthHeads | None:
        """The heads a model needs for a tokenizer's ids: None when L == 1 (the flat head predicts them)."""
        if len(code_vocab_sizes) == 1:
            return None
        return cls(d_model, tuple(code_vocab_sizes), tuple(code_groups), cfg.depth_layers, cfg.depth_width, cfg.depth_heads)

    @classmethod
    def from_spec(cls, spec: dict, where: str) -> DepthHeads:
        """`spec` (as saved) -> new heads, or one line naming `where` the spec is wrong."""
        try:
            return cls(**spec)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: bad depth_heads {spec!r} ({err})") from None

    def set_loss_chunk(self, chunk: int) -> None:
        """Positions per chunk of the classifiers' chunked cross-entropy."""
        for group in self.groups:
            for classifier in group.classifiers:
                classifier.chunk = chunk

    def forward(self, hidden: torch.Tensor, codes: torch.Tensor, logits: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """Teacher forcing: hidden [M, d], codes [M, L] -> summed NLL of the L codes per position [M] fp32;
        logits=True: the logits of every code instead, L tensors [M, V_l] fp32."""
        negative = codes.numel() > 0 and bool((codes < 0).any())
        if codes.shape[1:] != (len(self.code_vocab_sizes),) or negative:
            raise ValueError(f"the depth heads need {len(self.code_vocab_sizes)} codes >= 0 per visual target, got codes "
                             f"[{', '.join(map(str, codes.shape))}]" + (" holding -1 (a position that is not visual)" if negative else ""))
        total = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        every: list[torch.Tensor] = []
        for group, start, n in zip(self.groups, self.starts, self.code_groups):
            target = codes[:, start : start + n]
            feats = group(hidden, target[:, :-1])  # [M, n, w]
            for k in range(n):
                if logits:
                    every.append(group.classifiers[k](feats[:, k]).float())
                else:
                    total = total + group.classifiers[k](feats[:, k], target[:, k]).float()
        return every if logits else total

    def loss(self, hidden: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """= forward, through the module call (ZeRO-3 gathers the weights on it): [M, d], [M, L] -> [M]"""
        return self(hidden, codes)

    def logits(self, hidden: torch.Tensor, codes: torch.Tensor) -> list[torch.Tensor]:
        """Teacher-forced logits of every code: hidden [M, d], codes [M, L] -> L tensors [M, V_l] fp32."""
        return self(hidden, codes, logits=True)

    @torch.no_grad()
    def sample(self, hidden: torch.Tensor, pick: Pick) -> torch.Tensor:
        """hidden [B, d] -> codes [B, L], one code at a time: the logits of code l go to pick(logits, l), whose
        ids feed the following depths (for CFG the caller's rows are cond then uncond and pick returns the
        guided id for both)."""
        out = torch.empty(hidden.shape[0], len(self.code_vocab_sizes), dtype=torch.long, device=hidden.device)
        for group, start, n in zip(self.groups, self.starts, self.code_groups):
            cache: list[list[torch.Tensor]] = [[] for _ in group.blocks]
            inputs = hidden
            for k in range(n):
                feats = group.step(inputs, k, cache)  # [B, w]: one position through the blocks
                out[:, start + k] = pick(group.classifiers[k](feats).float(), start + k)
                if k + 1 < n:  # I_{k+1} = sum_{j<=k} e_j(r_j)
                    e = group.embeds[k](out[:, start + k])
                    inputs = e if k == 0 else inputs + e
        return out

