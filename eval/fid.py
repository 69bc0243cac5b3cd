"""Fréchet Inception Distance: streaming feature statistics and the Fréchet distance between Gaussians.

Features come from pytorch-fid's Inception-v3 (pool3, 2048-d; the TF-ported FID weights) when the package,
a torchvision that imports beside torch, and its weights are available. rFID (tokenizer) and gFID
(generation) share this code.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import linalg

FID_SETUP = (
    "FID needs pytorch-fid's Inception weights: `pip install pytorch-fid` next to a torchvision that imports "
    "with your torch, then put pt_inception-2015-12-05-6726825d.pth (github.com/mseitzer/pytorch-fid releases) "
    "in $TORCH_HOME/hub/checkpoints/"
)


class FIDUnavailable(RuntimeError):
    pass


class GaussianStats:
    """Running mean and covariance of feature vectors, in float64."""

    def __init__(self, dim: int):
        self.n, self.sum, self.outer = 0, np.zeros(dim), np.zeros((dim, dim))

    def update(self, feats: np.ndarray) -> None:
        """feats [n, dim]"""
        feats = feats.astype(np.float64)
        self.n += feats.shape[0]
        self.sum += feats.sum(0)
        self.outer += feats.T @ feats

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ValueError("FID needs at least 2 images per set")
        mu = self.sum / self.n
        cov = (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return mu, cov


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(C1 + C2 - 2 (C1 C2)^(1/2))"""
    covmean = linalg.sqrtm(cov1 @ cov2)
    if not np.isfinite(covmean).all():
        offset = np.eye(cov1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((cov1 + offset) @ (cov2 + offset))
    covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * np.trace(covmean))


class InceptionFeatures:
    """images [B, 3, H, W] in [-1, 1] -> pool3 features [B, 2048] (numpy)."""

    dim = 2048

    def __init__(self, device: torch.device):
        try:
            from pytorch_fid.inception import InceptionV3  # noqa: PLC0415 (optional dependency)

            self.net = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).to(device).eval()
        except Exception as err:  # ImportError (no package / broken torchvision) or a failed weight download
            raise FIDUnavailable(f"{FID_SETUP} ({type(err).__name__}: {err})".splitlines()[0]) from None
        self.device = device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        x = (images.to(self.device).float() + 1) / 2  # pytorch-fid takes [0, 1]
        return self.net(x)[0].flatten(1).cpu().numpy()
