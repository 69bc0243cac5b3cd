"""DualToken: one SigLIP vision tower, two residual-quantized vocabularies (arXiv 2503.14324, sec. 3.2).

    images [B, 3, H, W] in [-1, 1] -> tower -> hidden_states[pixel_layer]    [B, N, W] -> to_pix -> RVQ (D codes)
                                             hidden_states[semantic_layer] [B, N, W] -> to_sem -> RVQ (D codes)
    ids [B, h, w, 2D]: the D semantic codes, then the D pixel codes, of each of the N = h*w positions
    decode: pixel codes -> summed code vectors -> ViT pixel decoder -> image (the semantic codes are not used)

`initial` is a frozen copy of the tower as loaded (its state F_0 for the semantic loss ||F - F_0||^2 and for
semantic_alignment); it is saved with the model so evaluation needs no hub access. `from_sem` maps the
summed semantic codes back to the tower's width: the tokenizer's prediction of F_0 from its ids.

variant=official (config.py, official.py) changes the parts the paper leaves open: attention projections for
to_sem / from_sem / to_pix (and the shortcut's), one shared codebook per vocabulary, a layer-`shortcut_layer`
shortcut into the pixel features, from_sem's output run through the tower's remaining layers and pooling head
(`pooled`, matched to the initial tower's pooled feature), and a conv decoder on a resized latent.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file
from transformers import SiglipVisionConfig, SiglipVisionModel

from semhitok.common.io import atomic_dir
from semhitok.tokenizer.dualtoken.config import DualTokenConfig
from semhitok.tokenizer.dualtoken.official import AttnProjection, ConvDecoder, ResBlock
from semhitok.tokenizer.dualtoken.quantizer import ResidualVQ
from semhitok.tokenizer.hub import PushToHubMixin
from semhitok.tokenizer.interface import VisualFeatures
from semhitok.tokenizer.saved import load_staged
from semhitok.tokenizer.vit import Transformer, pixel_geometry, resize, unpatchify


def tower_config(cfg: DualTokenConfig) -> SiglipVisionConfig:
    """paper: cfg.siglip_config cut after semantic_layer (the layers above it are unused), without the pooling
    head; official: the whole tower with its pooling head (the pooled semantic loss runs through both)."""
    if cfg.siglip_config is None:
        raise ValueError("DualTokenConfig.siglip_config is unset: build with DualToken.from_teacher or from_pretrained")
    layers = cfg.siglip_config.get("num_hidden_layers", 12)
    if cfg.semantic_layer > layers:
        raise ValueError(f"dualtoken.semantic_layer={cfg.semantic_layer} but the SigLIP tower has {layers} layers")
    if cfg.official:
        return SiglipVisionConfig.from_dict({**cfg.siglip_config, "vision_use_head": True})
    return SiglipVisionConfig.from_dict({**cfg.siglip_config, "num_hidden_layers": cfg.semantic_layer, "vision_use_head": False})


def projection(a: int, b: int, cfg: DualTokenConfig) -> nn.Module:
    """[B, N, a] -> [B, N, b]: linear (paper) or the repo's attention projection (official)"""
    return AttnProjection(a, b) if cfg.official else nn.Linear(a, b)


class PixelDecoder(nn.Module):
    """summed pixel codes [B, N, d] -> images [B, 3, H, W] on the tower's grid (vit.pixel_geometry: 15 px
    patches on a 405 px canvas at so400m/14-384, resized back to 384)."""

    def __init__(self, cfg: DualTokenConfig, image_size: int, grid: int):
        super().__init__()
        self.patch, self.canvas = pixel_geometry(image_size, grid)
        self.grid, self.image_size = grid, image_size
        self.proj_in = nn.Linear(cfg.pix_code_dim, cfg.decoder_width)
        self.decoder = Transformer(cfg.decoder_width, cfg.decoder_layers, cfg.decoder_heads, grid * grid)
        self.to_pixels = nn.Linear(cfg.decoder_width, self.patch * self.patch * 3)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        x = self.to_pixels(self.decoder(self.proj_in(q)))  # [B, N, p*p*3]
        return resize(unpatchify(x, self.patch, self.grid), self.image_size)


class OfficialPixelDecoder(nn.Module):
    """official: summed pixel codes [B, N, d] -> attention projection to the tower's width -> grid x grid map
    resized to decoder_latent^2 -> residual block to conv_in_channels -> ConvDecoder -> images [B, 3, H, W]."""

    def __init__(self, cfg: DualTokenConfig, width: int, image_size: int, grid: int):
        super().__init__()
        self.grid, self.latent = grid, cfg.decoder_latent
        out = cfg.decoder_latent * 2 ** (len(cfg.conv_ch_mult) - 1)
        if out != image_size:
            raise ValueError(f"dualtoken.decoder_latent={cfg.decoder_latent} with {len(cfg.conv_ch_mult)} conv_ch_mult "
                             f"levels decodes {out} px images, the tower takes {image_size} px")
        self.proj_in = AttnProjection(cfg.pix_code_dim, width)
        self.post_quant = ResBlock(width, cfg.conv_in_channels)
        self.conv = ConvDecoder(cfg.conv_in_channels, cfg.conv_channels, cfg.conv_ch_mult, cfg.conv_res_blocks)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        b = q.shape[0]
        x = self.proj_in(q).transpose(1, 2).reshape(b, -1, self.grid, self.grid)  # [B, W, g, g]
        if self.grid != self.latent:
            x = torch.nn.functional.interpolate(x.float(), size=(self.latent, self.latent), mode="bilinear").to(x.dtype)
        return self.conv(self.post_quant(x))


class DualTokenFeatures(VisualFeatures):
    """Frozen ids [n, N, 2D] -> concat(sum of the D semantic code vectors, sum of the D pixel ones) [n, N, ds + dp]:
    the paper's unified visual token (sec. 3.3, semantic and pixel tokens concatenated on channels); one split."""

    per_id = True

    def __init__(self, sem_embed: torch.Tensor, pix_embed: torch.Tensor):
        super().__init__()
        self.register_buffer("sem_embed", sem_embed.detach().float().cpu().contiguous().clone())  # [D, Ks, ds]
        self.register_buffer("pix_embed", pix_embed.detach().float().cpu().contiguous().clone())  # [D, Kp, dp]
        self.depth = sem_embed.shape[0]
        self.splits = (sem_embed.shape[-1] + pix_embed.shape[-1],)
        self.requires_grad_(False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        d = self.depth
        if ids.shape[-1] != 2 * d:
            raise ValueError(f"DualToken ids have {2 * d} codes per position, got shape {list(ids.shape)}")
        sem = sum(self.sem_embed[k][ids[..., k]] for k in range(d))
        pix = sum(self.pix_embed[k][ids[..., d + k]] for k in range(d))
        return torch.cat([sem, pix], dim=-1)


class DualToken(nn.Module, PushToHubMixin):
    kind = "dualtoken"

    def __init__(self, cfg: DualTokenConfig):
        super().__init__()
        self.config = cfg
        siglip = tower_config(cfg)
        width = siglip.hidden_size
        self.image_size = siglip.image_size
        self.grid = siglip.image_size // siglip.patch_size  # 384 // 14 = 27: SigLIP drops the remainder
        self.tower = SiglipVisionModel(siglip)  # trained
        self.initial = SiglipVisionModel(siglip).requires_grad_(False)  # frozen copy of the tower as loaded
        if not cfg.official:  # hidden states are read, never last_hidden_state's final norm (official: the head's input)
            for tower in (self.tower, self.initial):
                tower.post_layernorm = nn.Identity()
        shared = cfg.official
        self.to_sem = projection(width, cfg.sem_code_dim, cfg)
        self.sem_vq = ResidualVQ(cfg.sem_codebook_size, cfg.sem_code_dim, cfg.depth, cfg.ema_decay, cfg.dead_code_threshold,
                                 shared=shared)
        self.from_sem = projection(cfg.sem_code_dim, width, cfg)
        self.to_pix = projection(width, cfg.pix_code_dim, cfg)
        self.pix_vq = ResidualVQ(cfg.pix_codebook_size, cfg.pix_code_dim, cfg.depth, cfg.ema_decay, cfg.dead_code_threshold,
                                 shared=shared)
        if cfg.shortcut_layer:
            self.to_pix_shortcut = projection(width, cfg.pix_code_dim, cfg)
        if cfg.official:
            self.decoder = OfficialPixelDecoder(cfg, width, self.image_size, self.grid)
        else:
            self.decoder = PixelDecoder(cfg, self.image_size, self.grid)
        self.trained_stages: list[int] = []  # [1] once trained (tokenizer/trainer.py's loop marks its stage)

    @classmethod
    def from_teacher(cls, cfg: DualTokenConfig, teacher: SiglipVisionModel) -> "DualToken":
        """A new tokenizer whose tower and frozen initial copy both start as the loaded SigLIP tower (official:
        loaded with its pooling head, load_teacher(cfg, head=cfg.official))."""
        model = cls(dataclasses.replace(cfg, siglip_config=teacher.config.to_dict()))
        state = {k: v for k, v in teacher.state_dict().items() if k in model.tower.state_dict()}
        for tower in (model.tower, model.initial):
            missing, _ = tower.load_state_dict(state, strict=False)
            if missing:
                raise ValueError(f"SigLIP tower lacks {len(missing)} weights of the cut tower (first: {missing[0]})")
        return model

    # -- the contract ------------------------------------------------------------------------------
    @property
    def code_vocab_sizes(self) -> tuple[int, ...]:
        return self.sem_vq.vocab_sizes + self.pix_vq.vocab_sizes

    @property
    def code_groups(self) -> tuple[int, ...]:
        return (self.config.depth, self.config.depth)

    @property
    def device(self) -> torch.device:
        return self.sem_vq.embed.device

    # -- features and quantization -----------------------------------------------------------------
    def features(self, images: torch.Tensor, tower: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, 3, H, W] -> (shallow features [B, N, W], deep features [B, N, W]) of `tower` (default: the trained one)"""
        hidden = self.hidden_states(images, tower)
        return hidden[self.config.pixel_layer], hidden[self.config.semantic_layer]

    def hidden_states(self, images: torch.Tensor, tower: nn.Module | None = None) -> list[torch.Tensor]:
        """images -> [embeddings, layer 1 .. layer semantic_layer outputs], each [B, N, W]"""
        tower = tower or self.tower
        h = tower.embeddings(images)
        hidden = [h]
        for layer in tower.encoder.layers[: self.config.semantic_layer]:
            h = layer(h, None)
            hidden.append(h)
        return hidden

    def pooled(self, deep: torch.Tensor, tower: nn.Module | None = None) -> torch.Tensor:
        """official: features after layer semantic_layer [B, N, W] -> the tower's remaining layers, final norm and
        pooling head -> [B, W]"""
        tower = tower or self.tower
        for layer in tower.encoder.layers[self.config.semantic_layer :]:
            deep = layer(deep, None)
        return tower.head(tower.post_layernorm(deep))

    def quantize(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images -> {deep [B, N, W], q_sem [B, N, ds] / q_pix [B, N, dp] (straight-through), sem_ids / pix_ids
        [B, N, D], sem_commit / pix_commit []}; codebooks update when the quantizers are in training mode."""
        c = self.config
        hidden = self.hidden_states(images)
        deep = hidden[c.semantic_layer]
        b, n, _ = deep.shape
        pix = self.to_pix(hidden[c.pixel_layer])
        if c.shortcut_layer:
            pix = pix + c.shortcut_weight * self.to_pix_shortcut(hidden[c.shortcut_layer])
        out = {"deep": deep}
        for name, vq, z in (("sem", self.sem_vq, self.to_sem(deep)), ("pix", self.pix_vq, pix)):
            q, idx, commit = vq(z.reshape(b * n, -1))
            out[f"q_{name}"], out[f"{name}_ids"], out[f"{name}_commit"] = q.view(b, n, -1), idx.view(b, n, -1), commit
        return out

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training path: quantize's outputs plus recon [B, 3, H, W] decoded from the straight-through pixel codes
        and sem_pred [B, N, W] (every trained module runs inside forward, as DDP needs); official also pooled [B, W],
        sem_pred through the tower's layers above semantic_layer and its head."""
        out = self.quantize(images)
        out["recon"] = self.decoder(out["q_pix"])
        out["sem_pred"] = self.from_sem(out["q_sem"])  # [B, N, W]: the semantic codes' prediction of F_0
        if self.config.official:
            out["pooled"] = self.pooled(out["sem_pred"])
        return out

    @torch.no_grad()
    def targets(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The frozen initial tower's {deep [B, N, W]} (official: and its pooled feature [B, W])"""
        hidden = self.hidden_states(images, self.initial)
        out = {"deep": hidden[self.config.semantic_layer]}
        if self.config.official:
            out["pooled"] = self.pooled(out["deep"], self.initial)
        return out

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [-1, 1] -> ids [B, h, w, 2D] int64 (semantic codes, then pixel codes)"""
        was = self.training
        self.eval()
        out = self.quantize(images.to(self.device))
        self.train(was)
        return torch.cat([out["sem_ids"], out["pix_ids"]], dim=-1).view(-1, self.grid, self.grid, 2 * self.config.depth)

    def _check_ids(self, ids: torch.Tensor) -> None:
        want = (self.grid, self.grid, 2 * self.config.depth)
        if ids.dim() != 4 or tuple(ids.shape[1:]) != want:
            raise ValueError(f"DualToken ids must be [B, {', '.join(map(str, want))}], got {list(ids.shape)}")
        vocab = torch.tensor(self.code_vocab_sizes, device=ids.device)
        if ids.min() < 0 or (ids >= vocab).any():
            raise ValueError(f"DualToken ids out of range: code l must lie in [0, {self.code_vocab_sizes[0]})")

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, h, w, 2D] -> images [B, 3, H, W] in [-1, 1], from the pixel codes"""
        self._check_ids(ids)
        pix = ids[..., self.config.depth :].flatten(1, 2).to(self.device)  # [B, N, D]
        return self.decoder(self.pix_vq.lookup(pix)).float().clamp(-1, 1)

    def input_features(self) -> DualTokenFeatures:
        return DualTokenFeatures(self.sem_vq.codebooks, self.pix_vq.codebooks)

    @torch.no_grad()
    def semantic_alignment(self, images: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """images -> (from_sem(summed semantic codes of encode's ids) [B, N, W], the initial tower's
        layer-`semantic_layer` features [B, N, W]); seed: unused (the initial tower is saved with the model)"""
        images = images.to(self.device)
        d = self.config.depth
        sem = self.encode(images)[..., :d].flatten(1, 2)
        _, target = self.features(images, self.initial)
        return self.from_sem(self.sem_vq.lookup(sem)), target

    # -- persistence -------------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> None:
        """config.json (model_type dualtoken, trained_stages, the DualTokenConfig) + model.safetensors, atomically."""
        with atomic_dir(path) as tmp:
            state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
            save_file(state, str(tmp / "model.safetensors"))
            meta = {"model_type": self.kind, "trained_stages": self.trained_stages, **dataclasses.asdict(self.config)}
            (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> "DualToken":
        """Check config.json and the weights' shapes against each other (a meta-device skeleton) before loading."""
        return load_staged(cls, DualTokenConfig, path, device, stages=(1,))
