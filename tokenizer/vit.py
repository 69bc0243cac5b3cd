"""A plain pre-norm transformer, used by the semantic decoder and the pixel encoder/decoder."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, N, C] -> [B, N, C]"""
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v)  # [B, H, N, C/H]
        x = x + self.proj(attn.transpose(1, 2).reshape(b, n, c))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, num_tokens: int):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, num_tokens, width) * 0.02)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, N, C] (N == num_tokens) -> [B, N, C]"""
        x = x + self.pos
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def pixel_geometry(image_size: int, grid: int, patch: int = 0) -> tuple[int, int]:
    """The pixel branch's (patch, canvas) for an image of `image_size` px under the teacher's grid x grid ids.

    The pixel branch works on the teacher's grid: pixel id (r, c) and semantic id (r, c) describe the same
    region of the image up to the teacher's rounding. When image_size is a multiple of the grid (256 px / 16 =
    16) the canvas is the image itself and the two coincide. Otherwise (384 px under SigLIP so400m/14: a 27x27
    grid, since the patch embedding drops 384 - 27*14 = 6 px) the patch is rounded up (15) and the branch works
    on a canvas of grid*patch px (405): the whole 384 image is resized onto it before patchify, and the
    decoder's 405 px output is resized back to 384. Nothing is cropped, and the decoder has at least as many
    output samples as the image. The ids then do not see exactly the same pixels: SigLIP's patches cover
    [14 r, 14 r + 14) of [0, 378), the pixel patches [384 r / 27, 384 (r + 1) / 27) of [0, 384), so the pixel
    patch drifts by 6 r / 27 px, 5.8 px at the last row (59% of its SigLIP patch overlapped).
    patch > 0 sets the patch instead (16 at 384: TokenFlow's 432 px canvas; the same drift)."""
    patch = patch or -(-image_size // grid)
    return patch, grid * patch


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """[B, 3, H, W] -> [B, 3, size, size]; bilinear with antialiasing (in fp32), identity when already that size."""
    if images.shape[-2:] == (size, size):
        return images
    out = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.to(images.dtype)


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, 3, H, W] -> [B, (H/p)*(W/p), p*p*3]"""
    b, c, h, w = images.shape
    x = images.view(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(tokens: torch.Tensor, patch: int, grid: int) -> torch.Tensor:
    """[B, grid*grid, p*p*3] -> [B, 3, grid*p, grid*p]"""
    b = tokens.shape[0]
    x = tokens.view(b, grid, grid, patch, patch, 3)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, 3, grid * patch, grid * patch)
