"""The modules of DualToken's official variant (dualtoken.variant=official), written from the authors' repo's
architecture (github.com/songweii/DualToken, modeling_rqvaesiglip.py and the VQGAN decoder it configures):

  AttnProjection  tokens [B, N, a] -> [B, N, b], a and b one a multiple of the other:
                  linear skip on LayerNorm(x) + multi-head attention on LayerNorm(x), then + GeGLU MLP.
                  narrowing (a > b): a/b heads of width b whose outputs are averaged over the heads;
                  widening (a < b): heads of width a whose outputs are concatenated to b.
  ConvDecoder     latent [B, C, L, L] -> images [B, 3, L * 2^(levels-1), ...]: the taming-transformers VQGAN
                  decoder (conv in, mid res/attn/res, per level res blocks (+ attention at the latent's
                  resolution) and x2 nearest upsampling, GroupNorm, SiLU, conv out).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class GeGLU(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.gate, self.value, self.out = nn.Linear(width, hidden), nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return self.out(F.gelu(self.gate(x), approximate="tanh") * self.value(x))


class AttnProjection(nn.Module):
    """[B, N, a] -> [B, N, b] (the repo's prequant/postquant projections; heads = max(a, b) // min(a, b))"""

    def __init__(self, a: int, b: int, mlp_ratio: float = 2.0):
        super().__init__()
        if max(a, b) % min(a, b):
            raise ValueError(f"AttnProjection: {a} -> {b}, one width must be a multiple of the other")
        self.a, self.b = a, b
        self.heads = max(a, b) // min(a, b)
        self.head_dim = min(a, b)
        self.norm_attn, self.norm_skip, self.norm_mlp = nn.LayerNorm(a), nn.LayerNorm(a), nn.LayerNorm(b)
        self.qkv = nn.Linear(a, 3 * self.heads * self.head_dim)
        self.attn_out = nn.Linear(b, b)
        self.skip = nn.Linear(a, b)
        self.mlp = GeGLU(b, int(b * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz, n, _ = x.shape
        qkv = self.qkv(self.norm_attn(x)).view(bsz, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(*qkv)  # [B, H, N, hd]
        # narrowing: the heads' mean [B, N, b]; widening: the heads side by side [B, N, H*hd = b]
        y = y.mean(1) if self.a > self.b else y.transpose(1, 2).reshape(bsz, n, self.b)
        x = self.skip(self.norm_skip(x)) + self.attn_out(y)
        return x + self.mlp(self.norm_mlp(x))


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = group_norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = group_norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.shortcut(x) + h


class SpatialAttention(nn.Module):
    """single-head self-attention over the H*W positions of [B, C, H, W]"""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).chunk(3, dim=-1)  # [B, HW, C] each
        y = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.out(y.transpose(1, 2).reshape(b, c, h, w))


class ConvDecoder(nn.Module):
    """latent [B, cin, L, L] -> images [B, 3, L * 2^(len(ch_mult)-1), same]"""

    def __init__(self, cin: int, channels: int, ch_mult: list[int], res_blocks: int):
        super().__init__()
        top = channels * ch_mult[-1]
        self.conv_in = nn.Conv2d(cin, top, 3, padding=1)
        self.mid = nn.Sequential(ResBlock(top, top), SpatialAttention(top), ResBlock(top, top))
        levels, c = [], top
        for level in reversed(range(len(ch_mult))):
            out = channels * ch_mult[level]
            blocks: list[nn.Module] = []
            for _ in range(res_blocks + 1):
                blocks.append(ResBlock(c, out))
                c = out
                if level == len(ch_mult) - 1:  # the latent's resolution (the repo's attn_resolutions [24])
                    blocks.append(SpatialAttention(c))
            if level:
                blocks += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(c, c, 3, padding=1)]
            levels.append(nn.Sequential(*blocks))
        self.up = nn.Sequential(*levels)
        self.norm_out, self.conv_out = group_norm(c), nn.Conv2d(c, 3, 3, padding=1)
        self.upscale = 2 ** (len(ch_mult) - 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.up(self.mid(self.conv_in(z)))
        return self.conv_out(F.silu(self.norm_out(x)))
