"""Losses: stage 1 feature distillation; stage 2 perceptual term and PatchGAN hinge GAN."""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import SiglipVisionModel

log = logging.getLogger("semhitok")


def distill_loss(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """pred, target [B, N, D] -> (1 - cosine similarity [], L1 []), both means over patches."""
    cosine = 1 - F.cosine_similarity(pred.float(), target.float(), dim=-1).mean()
    return cosine, F.l1_loss(pred.float(), target.float())


class SemanticPerceptualLoss(nn.Module):
    """LPIPS-style distance on the hidden states of a frozen SigLIP encoder: features unit-normalised per
    token, squared differences averaged per layer, summed over layers. Chosen with perceptual=semantic (the
    tiny preset; anywhere LPIPS's VGG weights are not available); it uses only weights the tokenizer has."""

    kind = "semantic"

    def __init__(self, encoder: SiglipVisionModel):
        super().__init__()
        self.encoder = encoder

    def forward(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """recon, target [B, 3, H, W] in [-1, 1] -> []"""
        with torch.no_grad():
            ref = self.encoder(pixel_values=target, output_hidden_states=True).hidden_states[1:]
        out = self.encoder(pixel_values=recon, output_hidden_states=True).hidden_states[1:]
        return sum(
            (F.normalize(a.float(), dim=-1) - F.normalize(b.float(), dim=-1)).pow(2).sum(-1).mean()
            for a, b in zip(out, ref)
        ) / len(out)


class LPIPSLoss(nn.Module):
    kind = "lpips"

    def __init__(self):
        super().__init__()
        import lpips  # noqa: PLC0415  (optional dependency, needs torchvision and its VGG16 weights)

        self.net = lpips.LPIPS(net="vgg", verbose=False).eval().requires_grad_(False)

    def forward(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.net(recon.float(), target.float()).mean()


def build_perceptual(kind: str, semantic_encoder: SiglipVisionModel) -> nn.Module | None:
    """kind: auto | lpips | semantic | none -> the loss module (its `.kind` says which term runs) or None.

    auto (the default) is LPIPS, strictly: when LPIPS cannot load, training stops with the fix named instead of
    silently switching term. The tiny preset asks for `semantic` explicitly."""
    if kind == "none":
        return None
    if kind == "semantic":
        return SemanticPerceptualLoss(semantic_encoder)
    if kind not in ("auto", "lpips"):
        raise ValueError(f"tokenizer_train.perceptual={kind!r}: use auto, lpips, semantic or none")
    try:
        return LPIPSLoss()
    except Exception as err:  # ImportError, or a failed weight download when offline
        raise RuntimeError(
            f"tokenizer_train.perceptual={kind} needs LPIPS, which could not load ({type(err).__name__}: {err}). "
            "Install `lpips` with a working torchvision and make its VGG16 weights available (TORCH_HOME), or "
            "choose the term explicitly: tokenizer_train.perceptual=semantic (or none)"
        ) from None


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix's NLayerDiscriminator) with GroupNorm: one real/fake logit per overlapping patch."""

    def __init__(self, channels: int = 64, layers: int = 3):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, layers + 1):
            nxt = channels * min(2**i, 8)
            stride = 2 if i < layers else 1
            mods += [nn.Conv2d(width, nxt, 4, stride, 1), nn.GroupNorm(min(32, nxt // 4), nxt), nn.LeakyReLU(0.2)]
            width = nxt
        mods.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.net = nn.Sequential(*mods)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> patch logits [B, 1, h', w']"""
        return self.net(images)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean())


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return -fake_logits.mean()
