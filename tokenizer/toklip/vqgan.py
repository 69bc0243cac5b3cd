"""LlamaGen's VQ-16 (FoundationVision/LlamaGen, tokenizer/tokenizer_image/vq_model.py) as our own code:
conv encoder -> 1x1 conv to code_dim -> l2-normalised nearest-code quantization -> 1x1 conv -> conv decoder.

The layout is VQ-16's, so its released weights load through tokenizer/toklip/llamagen.py (names differ):
  encoder: 3x3 conv_in; per level (widths channels * channel_mult) res_blocks ResNet blocks, each followed by
           a self-attention block at the lowest resolution only, then (not after the last level) a stride-2
           3x3 conv on the input zero-padded by one row and column at the bottom/right (asymmetric);
           mid = ResNet, attention, ResNet; GroupNorm, SiLU, 3x3 conv_out to z_channels.
  decoder: 3x3 conv_in from z_channels; mid; levels from the lowest resolution up, res_blocks + 1 ResNet blocks
           each (attention after each at the lowest resolution), then (not after the last) nearest x2 + 3x3 conv;
           GroupNorm, SiLU, 3x3 conv_out to RGB.
With VQ-16's res_blocks=2 that is 2 + 1 attention blocks in the encoder and 3 + 1 in the decoder, all at 1/16.
Attention is single-head over the h*w positions with separate 1x1 q, k, v and output convs. GroupNorm has 32
groups as LlamaGen's (gcd(32, c) groups below 32 channels: the tiny preset's 16-channel levels).
Images are [B, 3, H, W] in [-1, 1]; ids [B, h, w] with h = H / downsample.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from semhitok.common.config_io import from_dict
from semhitok.common.io import atomic_dir
from semhitok.tokenizer.quantizers import fp32, l2norm
from semhitok.tokenizer.saved import check_weights, read_config
from semhitok.tokenizer.toklip.config import VQGANConfig


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, c), c, eps=1e-6)


class ResBlock(nn.Module):
    """x + conv(SiLU(GN(conv(SiLU(GN(x)))))), with a 1x1 conv on the skip when the width changes."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, c_in, h, w] -> [B, c_out, h, w]
        h = self.conv1(F.silu(self.norm1(x)))
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions: separate 1x1 q, k, v convs, softmax(q k^T / sqrt(c)) v."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = _norm(c)
        self.q, self.k, self.v, self.proj = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, c, h, w] -> same
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (m(y).flatten(2).transpose(1, 2) for m in (self.q, self.k, self.v))  # [B, hw, c] each
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj(out)


class Downsample(nn.Module):
    """x2 down: zero-pad one column right and one row below, then a 3x3 stride-2 conv without padding."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, c, h, w] -> [B, c, h/2, w/2]
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """x2 up: nearest neighbour, then a 3x3 conv."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, c, h, w] -> [B, c, 2h, 2w]
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution: n ResNet blocks (the first c_in -> c_out), each followed by attention when `attn`, then
    the resampling (Downsample, Upsample or nothing)."""

    def __init__(self, c_in: int, c_out: int, n: int, attn: bool, resample: type[nn.Module] | None):
        super().__init__()
        self.res = nn.ModuleList(ResBlock(c_in if i == 0 else c_out, c_out) for i in range(n))
        self.attn = nn.ModuleList(AttnBlock(c_out) for _ in range(n if attn else 0))
        self.resample = resample(c_out) if resample is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.res):
            x = block(x)
            if self.attn:
                x = self.attn[i](x)
        return self.resample(x)


def _mid(c: int) -> nn.Sequential:
    return nn.Sequential(ResBlock(c, c), AttnBlock(c), ResBlock(c, c))


class Encoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        widths = [cfg.channels * m for m in cfg.channel_mult]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(3, cfg.channels, 3, 1, 1)
        self.levels = nn.ModuleList(
            Level(cfg.channels if i == 0 else widths[i - 1], w, cfg.res_blocks, attn=i == last,
                  resample=Downsample if i < last else None)
            for i, w in enumerate(widths))
        self.mid = _mid(widths[-1])
        self.norm_out, self.conv_out = _norm(widths[-1]), nn.Conv2d(widths[-1], cfg.z_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] -> [B, z, h, w]
        x = self.conv_in(x)
        for level in self.levels:
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(self.mid(x))))


class Decoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        widths = [cfg.channels * m for m in reversed(cfg.channel_mult)]  # lowest resolution first
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(cfg.z_channels, widths[0], 3, 1, 1)
        self.mid = _mid(widths[0])
        self.levels = nn.ModuleList(
            Level(widths[max(i - 1, 0)], w, cfg.res_blocks + 1, attn=i == 0, resample=Upsample if i < last else None)
            for i, w in enumerate(widths))
        self.norm_out, self.conv_out = _norm(widths[-1]), nn.Conv2d(widths[-1], 3, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # [B, z, h, w] -> [B, 3, H, W]
        x = self.mid(self.conv_in(z))
        for level in self.levels:
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class VectorQuantizer(nn.Module):
    """l2-normalised codes and features; nearest code = largest cosine (fp32, autocast off)."""

    def __init__(self, num_codes: int, dim: int):
        super().__init__()
        init = torch.empty(num_codes, dim).uniform_(-1 / num_codes, 1 / num_codes)
        self.embedding = nn.Parameter(l2norm(init))  # unit rows from the start, as LlamaGen's

    def codes(self) -> torch.Tensor:
        """[V, d] unit code vectors (what the ids stand for)"""
        return l2norm(self.embedding.float())

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [...] -> unit codes [..., d]"""
        return self.codes()[ids]

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """z [n, d] -> ids [n] of the nearest unit code to l2norm(z)"""
        with fp32(z.device):
            return (l2norm(z.detach().float()) @ self.codes().detach().t()).argmax(dim=1)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """z [B, d, h, w] -> (q [B, d, h, w] straight-through, ids [B, h, w], codebook loss [], commitment loss [])"""
        b, d, h, w = z.shape
        with fp32(z.device):
            flat = l2norm(z.float().permute(0, 2, 3, 1).reshape(-1, d))  # [n, d]
            ids = self.nearest(flat)
            q = self.lookup(ids)  # differentiable in the codebook
            codebook_loss = F.mse_loss(q, flat.detach())
            commit_loss = F.mse_loss(flat, q.detach())
            q = flat + (q - flat).detach()  # the encoder gets the decoder's gradient unchanged
        return q.view(b, h, w, d).permute(0, 3, 1, 2), ids.view(b, h, w), codebook_loss, commit_loss


class VQGAN(nn.Module):
    kind = "vqgan"

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.config, self.image_size, self.grid = cfg, cfg.image_size, cfg.grid
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.code_dim, 1)
        self.quantizer = VectorQuantizer(cfg.codebook_size, cfg.code_dim)
        self.post_quant_conv = nn.Conv2d(cfg.code_dim, cfg.z_channels, 1)
        self.trained_stages: list[int] = []  # [1] once trained (the Trainer's convention)

    @property
    def device(self) -> torch.device:
        return self.quant_conv.weight.device

    def forward(self, images: torch.Tensor):
        """images [B, 3, H, W] -> (reconstruction [B, 3, H, W], ids [B, h, w], codebook loss [], commitment loss [])"""
        q, ids, codebook_loss, commit_loss = self.quantizer(self.quant_conv(self.encoder(images)))
        return self.decoder(self.post_quant_conv(q)), ids, codebook_loss, commit_loss

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [-1, 1] -> ids [B, h, w] int64"""
        z = self.quant_conv(self.encoder(images.to(self.device)))
        b, d, h, w = z.shape
        return self.quantizer.nearest(z.permute(0, 2, 3, 1).reshape(-1, d)).view(b, h, w)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, h, w] -> images [B, 3, H, W] in [-1, 1]"""
        if ids.dim() != 3 or ids.shape[1:] != (self.grid, self.grid):
            raise ValueError(f"ids must be [B, {self.grid}, {self.grid}], got {list(ids.shape)}")
        if ids.min() < 0 or ids.max() >= self.config.codebook_size:
            raise ValueError(f"ids must lie in [0, {self.config.codebook_size}), got [{int(ids.min())}, {int(ids.max())}]")
        q = self.quantizer.lookup(ids.to(self.device)).permute(0, 3, 1, 2)  # [B, d, h, w]
        return self.decoder(self.post_quant_conv(q)).float().clamp(-1, 1)

    def save_pretrained(self, path: str | Path) -> None:
        save_dir(self, path, {"model_type": self.kind, "trained_stages": self.trained_stages,
                              **dataclasses.asdict(self.config)})

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> "VQGAN":
        meta, stages, config_file, weights = read_dir(path, cls)
        cfg = from_dict(VQGANConfig, meta, where=str(config_file))
        model = load_checked(lambda: cls(cfg), config_file, weights)
        model.trained_stages = stages
        return model.to(device).eval()


# -- directories: config.json (model_type + config) + model.safetensors, shared with TokLIP -----------------
def save_dir(model: nn.Module, path: str | Path, meta: dict) -> None:
    """Write config.json + model.safetensors into `path` atomically."""
    with atomic_dir(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")


def read_dir(path: str | Path, cls) -> tuple[dict, list[int], Path, Path]:
    """A `cls.kind` directory -> (its config fields, its trained stages, config file, weights file); one-line errors."""
    meta, config_file, weights = read_config(path, cls.kind, cls.__name__)
    stages = meta.pop("trained_stages", None)
    if not isinstance(stages, list) or not all(s in (1, 2) and not isinstance(s, bool) for s in stages):
        raise ValueError(f"{config_file}: trained_stages must be a list of stages (1, 2), got {stages!r}")
    return meta, stages, config_file, weights


def load_checked(build, config_file: Path, weights: Path) -> nn.Module:
    """build() -> a model, loaded from `weights` once every name and shape is checked (tokenizer/saved.py)."""
    check_weights(build, config_file, weights)
    model = build()
    model.load_state_dict(load_file(str(weights)))
    return model
