"""Residual vector quantization (RQ-VAE, Lee et al. 2022) with EMA codebooks, as DualToken uses for both
vocabularies.

A feature z [d] becomes D codes: r_0 = z; at depth k the code e_k = argmin_j ||r_{k-1} - C_k[j]|| of
depth k's own codebook C_k [K, d], and r_k = r_{k-1} - e_k. The quantized feature is sum_k e_k.

Codebooks are buffers, not parameters: each depth's codes follow an EMA of the residuals assigned to them
(VQ-VAE-2), start as residuals of the first training batch, and a code whose EMA usage falls below
`dead_threshold` (assignments per step) is restarted from a random residual of the current batch (the
paper's restart of unused codes). The commitment loss ||z - sg(quantize(z))||^2 (paper eq. 1) is the only
gradient: it reaches the encoder through z; the decoder sees q straight-through.
Distances run in fp32 with autocast off (semhitok.tokenizer.quantizers.fp32).

shared=True (DualToken's official repo, RQ-VAE's shared_codebook): one codebook C [K, d] serves every depth;
`embed` is then [1, K, d], its EMA is updated once a step on the residuals of all depths together (assigned
greedily against the codebook before the update, then reassigned), and the first batch seeds K/D codes from
each depth's residuals.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from semhitok.common import dist as D
from semhitok.tokenizer.quantizers import fp32


class ResidualVQ(nn.Module):
    def __init__(self, num_codes: int, dim: int, depth: int, decay: float = 0.99, dead_threshold: float = 0.03,
                 eps: float = 1e-5, shared: bool = False):
        super().__init__()
        self.num_codes, self.dim, self.depth, self.shared = num_codes, dim, depth, shared
        self.decay, self.dead_threshold, self.eps = decay, dead_threshold, eps
        books = 1 if shared else depth
        self.register_buffer("embed", torch.randn(books, num_codes, dim) * 0.02)  # [D or 1, K, d]
        self.register_buffer("cluster_size", torch.ones(books, num_codes))  # [D or 1, K] EMA assignments per step
        self.register_buffer("embed_sum", self.embed.clone())  # [D or 1, K, d] EMA of the assigned residuals' sum
        self.register_buffer("initialized", torch.tensor(False))

    @property
    def vocab_sizes(self) -> tuple[int, ...]:
        return (self.num_codes,) * self.depth

    def book(self, k: int) -> int:
        """the index into `embed` of depth k's codebook"""
        return 0 if self.shared else k

    @property
    def codebooks(self) -> torch.Tensor:
        """[D, K, d]: depth k's codebook at k (the shared one repeated when shared)"""
        return self.embed.expand(self.depth, -1, -1)

    def lookup(self, idx: torch.Tensor) -> torch.Tensor:
        """idx [..., D'] (D' <= D: the first D' depths) -> summed codes [..., d]"""
        codes = [self.embed[self.book(k)][idx[..., k]] for k in range(idx.shape[-1])]
        return torch.stack(codes).sum(0)

    def nearest(self, r: torch.Tensor, k: int) -> torch.Tensor:
        """r [n, d] residuals -> idx [n] of depth k's nearest code (squared L2, fp32)."""
        with fp32(r.device):
            e = self.embed[self.book(k)].float()
            dist = (r.float().pow(2).sum(1, keepdim=True) - 2 * r.float() @ e.t() + e.pow(2).sum(1)[None])
            return dist.argmin(dim=1)

    @torch.no_grad()
    def quantize(self, z: torch.Tensor, update: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z [n, d] -> (q = sum of the chosen codes [n, d], idx [n, D], residual norms [D+1, n]: ||r_0..r_D||).
        update: first fit/EMA-update depth k's codebook on the residuals it receives, then assign."""
        r = z.detach().float()
        norms, ids = [r.norm(dim=1)], []
        q = torch.zeros_like(r)
        if update and not bool(self.initialized):
            self._init_from(r)
        if update and self.shared:  # one EMA step over every depth's residuals, then assign as in eval
            self._ema_update(0, *self._greedy(r))
            update = False
        for k in range(self.depth):
            idx = self.nearest(r, k)
            if update:
                self._ema_update(k, r, idx)
                idx = self.nearest(r, k)  # codes moved: assign against the updated codebook
            code = self.embed[self.book(k)][idx]
            q, r = q + code, r - code
            ids.append(idx)
            norms.append(r.norm(dim=1))
        return q, torch.stack(ids, dim=1), torch.stack(norms)

    def _greedy(self, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """r [n, d] -> (the residuals every depth receives [D*n, d], their assigned codes [D*n])"""
        rs, ids = [], []
        for k in range(self.depth):
            idx = self.nearest(r, k)
            rs.append(r)
            ids.append(idx)
            r = r - self.embed[self.book(k)][idx]
        return torch.cat(rs), torch.cat(ids)

    @torch.no_grad()
    def _init_from(self, r: torch.Tensor) -> None:
        """Depth k's codes start as random residuals of this batch at depth k (greedy through the depths); shared:
        codes [k*K/D, (k+1)*K/D) of the one codebook from depth k's residuals, assigned against those seeded so far."""
        pool = D.all_gather_cat(r)
        if self.shared:
            bounds = [self.num_codes * k // self.depth for k in range(self.depth + 1)]
            for k in range(self.depth):
                lo, hi = bounds[k], bounds[k + 1]
                pick = pool[torch.randint(pool.shape[0], (hi - lo,)).to(pool.device)]
                D.broadcast(pick)
                self.embed[0, lo:hi] = pick
                self.embed_sum[0, lo:hi] = pick
                self.cluster_size[0, lo:hi] = 1.0
                seeded = self.embed[0, :hi]
                with fp32(pool.device):
                    nearest = torch.cdist(pool.float(), seeded.float()).argmin(1)
                pool = pool - seeded[nearest]
            self.initialized.fill_(True)
            return
        for k in range(self.depth):
            pick = pool[torch.randint(pool.shape[0], (self.num_codes,)).to(pool.device)]
            D.broadcast(pick)
            self.embed[k] = pick
            self.embed_sum[k] = pick
            self.cluster_size[k] = 1.0
            pool = pool - self.embed[k][self.nearest(pool, k)]
        self.initialized.fill_(True)

    @torch.no_grad()
    def _ema_update(self, k: int, r: torch.Tensor, idx: torch.Tensor) -> None:
        counts = torch.bincount(idx, minlength=self.num_codes).to(r.dtype)  # [K]
        sums = torch.zeros_like(self.embed[k]).index_add_(0, idx, r)  # [K, d]
        D.all_reduce_sum(counts)
        D.all_reduce_sum(sums)
        self.cluster_size[k].mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum[k].mul_(self.decay).add_(sums, alpha=1 - self.decay)
        # Laplace smoothing keeps a barely used code from dividing by ~0
        size = self.cluster_size[k]
        smoothed = (size + self.eps) / (size.sum() + self.num_codes * self.eps) * size.sum()
        self.embed[k] = self.embed_sum[k] / smoothed[:, None]
        dead = size < self.dead_threshold
        n_dead = int(dead.sum())
        if n_dead:
            pool = D.all_gather_cat(r)
            fresh = pool[torch.randint(pool.shape[0], (n_dead,)).to(pool.device)]
            D.broadcast(fresh)
            self.embed[k][dead] = fresh
            self.embed_sum[k][dead] = fresh
            self.cluster_size[k][dead] = 1.0

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z [n, d] -> (q [n, d] straight-through, idx [n, D], commitment loss []).
        In training mode the codebooks are fit/updated on this batch first (EMA, restarts)."""
        q, idx, _ = self.quantize(z, update=self.training)
        z = z.float()
        commit = F.mse_loss(z, q)  # q carries no gradient: the loss pulls the encoder's z toward its codes
        return z + (q - z).detach(), idx, commit
