"""A compact VQGAN after LlamaGen's VQ-16 (FoundationVision/LlamaGen tokenizer/tokenizer_image/vq_model.py):
conv encoder -> 1x1 conv to code_dim -> l2-normalised nearest-code quantization -> 1x1 conv -> conv decoder.

Our own code, not a port: the block layout follows LlamaGen's (ResNet blocks per level, stride-2 downsampling,
mid block with one self-attention, nearest-neighbour upsampling), sizes come from VQGANConfig.
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
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.body = nn.Sequential(_norm(c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, 1, 1),
                                  _norm(c_out), nn.SiLU(), nn.Conv2d(c_out, c_out, 3, 1, 1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, c_in, h, w] -> [B, c_out, h, w]
        return self.skip(x) + self.body(x)


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions."""

    def __init__(self, c: int):
        super().__init__()
        self.norm, self.qkv, self.proj = _norm(c), nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).chunk(3, dim=-1)  # [B, hw, c] each
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj(out)


def _mid(c: int) -> nn.Sequential:
    return nn.Sequential(ResBlock(c, c), AttnBlock(c), ResBlock(c, c))


class Encoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        widths = [cfg.channels * m for m in cfg.channel_mult]
        layers: list[nn.Module] = [nn.Conv2d(3, cfg.channels, 3, 1, 1)]
        c = cfg.channels
        for i, w in enumerate(widths):
            for _ in range(cfg.res_blocks):
                layers.append(ResBlock(c, w))
                c = w
            if i < len(widths) - 1:
                layers.append(nn.Conv2d(c, c, 3, 2, 1))  # downsample x2
        layers += [_mid(c), _norm(c), nn.SiLU(), nn.Conv2d(c, cfg.z_channels, 3, 1, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] -> [B, z, h, w]
        return self.net(x)


class Decoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        widths = [cfg.channels * m for m in reversed(cfg.channel_mult)]
        c = widths[0]
        layers: list[nn.Module] = [nn.Conv2d(cfg.z_channels, c, 3, 1, 1), _mid(c)]
        for i, w in enumerate(widths):
            for _ in range(cfg.res_blocks + 1):
                layers.append(ResBlock(c, w))
                c = w
            if i < len(widths) - 1:
                layers += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(c, c, 3, 1, 1)]
        layers += [_norm(c), nn.SiLU(), nn.Conv2d(c, 3, 3, 1, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # [B, z, h, w] -> [B, 3, H, W]
        return self.net(z)


class VectorQuantizer(nn.Module):
    """l2-normalised codes and features; nearest code = largest cosine (fp32, autocast off)."""

    def __init__(self, num_codes: int, dim: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(num_codes, dim).uniform_(-1 / num_codes, 1 / num_codes))

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
