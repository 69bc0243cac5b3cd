"""The two quantizers of SemHiTok.

EMACodebook: stage 1's semantic-priority codebook. l2-normalised codes updated by EMA (VQKD), k-means
initialised on features gathered across ranks and over the first batches until there are at least K (one
GPU at 256 px sees 32 x 256 = 8,192 < 16,384 per step), dead codes restarted from current features.

HierarchicalCodebook: stage 2's pixel codebook. K sub-codebooks of m codes; a patch whose semantic code
is i is quantized only inside sub-codebook i, so the flattened id is i * m + j. Without semantic ids (the
"w/o sem" ablation) the same K * m codes form one shared codebook searched whole: the id is the code's flat index.

Both searches (nearest code, argmax of cosine similarity) run in fp32 with autocast off, whatever context
they are called from: in bf16 about 0.8% of the argmaxes flip against fp32 at K = 16384.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from semhitok.common import dist as D


def l2norm(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1, eps=1e-6)


@contextmanager
def fp32(device: torch.device):
    """Autocast off on `device`: matmuls inside run in the dtype of their (fp32) inputs."""
    with torch.autocast(device.type, enabled=False):
        yield


def _kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """k-means++ seeding on unit vectors: x [n, d] (n >= k) -> k rows of x, spread out.

    Each pick is an inverse-CDF draw on x's device from uniforms drawn up front, so the k steps never wait
    for the host (one sync per code would cost seconds at K=16384 on a GPU)."""
    n = x.shape[0]
    u = torch.rand(k, generator=generator).to(x.device)
    picks = [(u[:1] * n).long().clamp_(max=n - 1)]
    best = (x @ x[picks[0]].t()).squeeze(1)  # [n] similarity to the nearest chosen centre
    for j in range(1, k):
        cdf = ((2 - 2 * best).clamp_min(0) + 1e-12).cumsum(0)  # squared distances between unit vectors
        i = torch.searchsorted(cdf, u[j : j + 1] * cdf[-1]).clamp_(max=n - 1)
        picks.append(i)
        best = torch.maximum(best, (x @ x[i].t()).squeeze(1))
    return x[torch.cat(picks)]


def spherical_kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """x [n, d] unit vectors -> k unit centroids [k, d]: k-means++ seeding, then Lloyd steps on the sphere
    with empty clusters re-seeded from random points. Needs n >= k (EMACodebook gathers enough first)."""
    n = x.shape[0]
    if n < k:
        raise ValueError(f"k-means needs at least k={k} features, got {n}")
    centroids = _kmeans_plus_plus(x, k, generator)
    for _ in range(iters):
        assign = (x @ centroids.t()).argmax(dim=1)  # [n]
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        empty = torch.bincount(assign, minlength=k) == 0
        reseed = x[torch.randint(n, (k,), generator=generator).to(x.device)]
        centroids = torch.where(empty[:, None], reseed, l2norm(sums))
    return centroids


class EMACodebook(nn.Module):
    def __init__(self, num_codes: int, dim: int, decay: float, dead_threshold: float, kmeans_iters: int,
                 kmeans_features: int = 0):
        super().__init__()
        self.num_codes, self.dim, self.decay = num_codes, dim, decay
        self.dead_threshold, self.kmeans_iters = dead_threshold, kmeans_iters
        # k-means waits until this many features (all ranks together) have been seen; never fewer than K
        self.kmeans_features = max(num_codes, kmeans_features)
        self._pending: list[torch.Tensor] = []  # gathered features [n_i, d] awaiting k-means (not saved)
        self.register_buffer("embed", l2norm(torch.randn(num_codes, dim)))
        self.register_buffer("cluster_size", torch.zeros(num_codes))
        self.register_buffer("embed_sum", self.embed.clone())
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def _gather_for_kmeans(self, z: torch.Tensor) -> bool:
        """Add this step's features (all ranks) to the pool; run k-means once it holds enough. True when done."""
        self._pending.append(D.all_gather_cat(z.float()))
        if sum(x.shape[0] for x in self._pending) < self.kmeans_features:
            return False
        self._init_kmeans(torch.cat(self._pending))
        self._pending = []
        return True

    @torch.no_grad()
    def _init_kmeans(self, gathered: torch.Tensor) -> None:
        """gathered [n, d] features from every rank (n >= K) -> k-means centroids become the codes"""
        centroids = spherical_kmeans(gathered, self.num_codes, self.kmeans_iters)
        D.broadcast(centroids)  # every rank takes rank 0's result
        self.embed.copy_(centroids)
        self.embed_sum.copy_(centroids)
        self.cluster_size.fill_(1.0)
        self.initialized.fill_(True)

    @torch.no_grad()
    def _ema_update(self, z: torch.Tensor, idx: torch.Tensor) -> None:
        counts = torch.bincount(idx, minlength=self.num_codes).to(z.dtype)  # [K]
        sums = torch.zeros_like(self.embed).index_add_(0, idx, z)  # [K, d]
        D.all_reduce_sum(counts)
        D.all_reduce_sum(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        self.embed.copy_(l2norm(self.embed_sum))
        # Dead-code restart: codes whose EMA usage fell below the threshold take random current features.
        dead = self.cluster_size < self.dead_threshold
        n_dead = int(dead.sum())
        if n_dead:
            pool = D.all_gather_cat(z)
            fresh = pool[torch.randint(pool.shape[0], (n_dead,)).to(pool.device)]
            D.broadcast(fresh)
            self.embed[dead] = fresh
            self.embed_sum[dead] = fresh
            self.cluster_size[dead] = 1.0

    def lookup(self, idx: torch.Tensor) -> torch.Tensor:
        """idx [...] -> codes [..., d]"""
        return self.embed[idx]

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """z [n, d] unit vectors -> idx [n] of the most similar code (fp32, autocast off)."""
        with fp32(z.device):
            return (z.detach().float() @ self.embed.float().t()).argmax(dim=1)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z [n, d] unit vectors -> (q [n, d] straight-through, idx [n], commitment loss []).

        Training before k-means has run: the features are pooled for k-means and pass through unquantized
        (q = z, commitment 0, ids of the still-random codes), so the decoder trains on the continuous
        features for those first steps."""
        z = z.float()
        if self.training and not bool(self.initialized) and not self._gather_for_kmeans(z.detach()):
            return z, self.nearest(z), torch.zeros((), device=z.device)
        idx = self.nearest(z)
        q = self.lookup(idx)
        if self.training:
            self._ema_update(z.detach(), idx)
        commit = F.mse_loss(z, q.detach())
        return z + (q - z).detach(), idx, commit


class HierarchicalCodebook(nn.Module):
    """K groups of m learned, l2-normalised codes; quantization restricted to the group of the semantic id."""

    def __init__(self, num_groups: int, codes_per_group: int, dim: int, restart: bool = False):
        super().__init__()
        self.num_groups, self.codes_per_group, self.dim = num_groups, codes_per_group, dim
        self.codes = nn.Parameter(torch.randn(num_groups, codes_per_group, dim))  # [K, m, d]
        # restart: in training, a code of a group seen in the batch whose EMA use (decay 0.99) fell below 1e-3
        # takes a random feature of that group's patches in the batch. Without it, codes that no patch picks at
        # first never get a gradient (only the chosen code moves), and a group collapses onto one or two codes.
        self.restart = restart
        if restart:
            self.register_buffer("usage", torch.zeros(num_groups, codes_per_group))  # [K, m]

    def lookup(self, sem_idx: torch.Tensor, pix_idx: torch.Tensor) -> torch.Tensor:
        """sem_idx, pix_idx [...] -> codes [..., d]"""
        return l2norm(self.codes[sem_idx, pix_idx])

    def forward(
        self, z: torch.Tensor, sem_idx: torch.Tensor | None, beta: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z [n, d], sem_idx [n] -> (q [n, d] straight-through, pix_idx [n] in [0, m), vq loss []).
        sem_idx None: one shared codebook of K * m codes, pix_idx [n] in [0, K * m) (the flat index)."""
        with fp32(z.device):
            z = l2norm(z.float())
            usage = getattr(self, "usage", None)
            if sem_idx is None:
                flat = l2norm(self.codes.float().flatten(0, 1))  # [K*m, d]
                pix_idx = (z.detach() @ flat.detach().t()).argmax(dim=1)
                # restart over one group holding every code
                groups, codes = torch.zeros_like(pix_idx), self.codes.data.view(1, -1, self.dim)
                usage = None if usage is None else usage.view(1, -1)
            else:
                # [n, m, d]: only the patch's own sub-codebook. index_select, not codes[sem_idx]: its backward
                # (index_add) accumulates in a fixed order on CPU, so runs and resumes are bit-reproducible.
                group = l2norm(torch.index_select(self.codes.float(), 0, sem_idx))
                pix_idx = torch.einsum("nd,nmd->nm", z.detach(), group.detach()).argmax(dim=1)
                groups, codes = sem_idx, self.codes.data
            if self.restart and self.training and self.codes.requires_grad:  # (frozen codebooks keep their ids)
                self._restart_dead(z.detach(), groups, pix_idx, codes, usage)
            # [n, d], differentiable in codes (after a restart: the restarted codes are not the chosen ones)
            if sem_idx is None:
                q = l2norm(torch.index_select(self.codes.float().flatten(0, 1), 0, pix_idx))
            else:
                q = group[torch.arange(z.shape[0], device=z.device), pix_idx]
            loss = F.mse_loss(q, z.detach()) + beta * F.mse_loss(z, q.detach())
        return z + (q - z).detach(), pix_idx, loss

    @staticmethod
    @torch.no_grad()
    def _restart_dead(z: torch.Tensor, groups: torch.Tensor, pix_idx: torch.Tensor, codes: torch.Tensor,
                      usage: torch.Tensor) -> None:
        """z [n, d] (normalised), groups, pix_idx [n], codes [G, m, d] and usage [G, m] (views of the module's
        tensors, updated in place): update the use EMA; dead codes of seen groups take a random z of their
        group (the codes the assignment just chose stay as they are for this step's loss)."""
        counts = torch.zeros_like(usage).index_put_((groups, pix_idx), torch.ones_like(z[:, 0]), accumulate=True)
        usage.mul_(0.99).add_(counts, alpha=0.01)
        seen = counts.sum(1) > 0  # [G]
        dead = (usage < 1e-3) & seen[:, None]  # [G, m]
        for g in dead.any(1).nonzero().flatten().tolist():
            rows = (groups == g).nonzero().flatten()
            slots = dead[g].nonzero().flatten()
            pick = rows[torch.randint(len(rows), (len(slots),), device=rows.device)]
            codes[g, slots] = z[pick].to(codes.dtype)
            usage[g, slots] = 1e-2  # a grace period before it can be restarted again
