"""Image-quality metrics on [-1, 1] images: PSNR and SSIM (Gaussian window, as Wang et al. 2004)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """pred, target [B, 3, H, W] in [-1, 1] -> mean PSNR in dB over the batch, on the [0, 1] scale."""
    mse = ((pred.float() - target.float()) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return (10 * torch.log10(1 / mse)).mean()


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).float()


def ssim(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """pred, target [B, 3, H, W] in [-1, 1] -> mean SSIM over batch and channels, on the [0, 1] scale,
    with an 11x11 Gaussian window (sigma 1.5), K1=0.01, K2=0.03, valid (unpadded) windows."""
    x, y = (pred.float() + 1) / 2, (target.float() + 1) / 2
    c = x.shape[1]
    win = _gaussian_window().to(x.device).expand(c, 1, 11, 11)
    blur = lambda t: F.conv2d(t, win, groups=c)  # noqa: E731
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.mean()
