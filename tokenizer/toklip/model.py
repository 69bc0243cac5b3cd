"""TokLIP: a frozen VQGAN's code embeddings -> 2-layer MLP -> causal ViT token encoder (the SigLIP teacher's
transformer layers, attention made causal) -> features an LLM reads; the ids themselves are the VQGAN's.

    ids [B, h, w] --VQGAN codebook--> codes [B, N, 8] --MLP--> [B, N, c] + pos --causal SigLIP layers-->
    features [B, N, c] --post-LN--> (per position, concatenated with codes: what the MLLM adapter reads)
    --SigLIP MAP head--> z [B, c]

z is trained against the teacher's text features (InfoNCE at a learned logit scale) and its image features
(MSE) (train.py). The frozen teacher vision tower is kept (and saved) so `semantic_alignment` works from a
saved directory alone.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import SiglipConfig, SiglipModel, SiglipVisionConfig, SiglipVisionModel
from transformers.models.siglip.modeling_siglip import SiglipEncoder, SiglipMultiheadAttentionPoolingHead

from semhitok.common.config_io import from_dict
from semhitok.tokenizer.hub import PushToHubMixin
from semhitok.tokenizer.interface import VisualFeatures
from semhitok.tokenizer.siglip import RANDOM_TEACHER, load_complete
from semhitok.tokenizer.toklip.config import TokLIPConfig
from semhitok.tokenizer.toklip.vqgan import VQGAN, load_checked, read_dir, save_dir
from semhitok.tokenizer.vit import resize


def load_siglip(cfg: TokLIPConfig) -> SiglipModel:
    """The frozen SigLIP teacher (text + vision towers, both with heads), by HF name / local path, or a random
    one of cfg.vision_config / cfg.text_config. Every weight of a named teacher must load."""
    if cfg.teacher == RANDOM_TEACHER:
        model = SiglipModel(SiglipConfig(text_config=cfg.text_config, vision_config=cfg.vision_config))
    else:
        model = load_complete(SiglipModel, cfg.teacher, "toklip.teacher")
    return model.eval().requires_grad_(False)


def _vision_config(cfg: TokLIPConfig) -> SiglipVisionConfig:
    vision = SiglipVisionConfig.from_dict({**cfg.vision_config, "vision_use_head": True})
    vision._attn_implementation = "sdpa"
    return vision


def causal_mask(n: int, device: torch.device) -> torch.Tensor:
    """[1, 1, n, n] additive mask: position t attends to positions <= t"""
    future = torch.ones(n, n, dtype=torch.bool, device=device).triu(1)
    return torch.zeros(n, n, device=device).masked_fill(future, torch.finfo(torch.float32).min)[None, None]


class TokenEncoder(nn.Module):
    """codes [n, N, d] -> features [n, N, c]: 2-layer MLP (d -> mlp_ratio*c -> c), learned positions, the
    SigLIP encoder layers (causal or not), SigLIP's post layer norm."""

    def __init__(self, code_dim: int, vision: SiglipVisionConfig, grid: int, mlp_ratio: int, causal: bool):
        super().__init__()
        c = vision.hidden_size
        self.causal = causal
        self.mlp = nn.Sequential(nn.Linear(code_dim, mlp_ratio * c), nn.GELU(), nn.Linear(mlp_ratio * c, c))
        self.pos = nn.Parameter(torch.zeros(1, grid * grid, c))
        self.encoder = SiglipEncoder(vision)
        self.post_layernorm = nn.LayerNorm(c, eps=vision.layer_norm_eps)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [n, N', d] of the first N' <= N positions (a partial image while it is generated) -> [n, N', c];
        causal: equal to the whole image's features at those positions"""
        if codes.shape[1] > self.pos.shape[1]:
            raise ValueError(f"{codes.shape[1]} positions, the token encoder has {self.pos.shape[1]}")
        x = self.mlp(codes) + self.pos[:, : codes.shape[1]]  # [n, N', c]
        mask = causal_mask(x.shape[1], x.device).to(x.dtype) if self.causal else None
        return self.post_layernorm(self.encoder(inputs_embeds=x, attention_mask=mask).last_hidden_state)

    @torch.no_grad()
    def init_from(self, tower: SiglipVisionModel) -> None:
        """Copy the teacher's transformer layers and post-LN; its position embeddings resized to this grid."""
        self.encoder.load_state_dict(tower.encoder.state_dict())
        self.post_layernorm.load_state_dict(tower.post_layernorm.state_dict())
        pos = tower.embeddings.position_embedding.weight  # [P, c], P = g*g
        g, grid, c = int(pos.shape[0] ** 0.5), int(self.pos.shape[1] ** 0.5), pos.shape[1]
        grid_pos = pos.t().reshape(1, c, g, g)
        if g != grid:
            grid_pos = F.interpolate(grid_pos, size=(grid, grid), mode="bicubic", align_corners=False)
        self.pos.copy_(grid_pos.reshape(c, grid * grid).t()[None])


class TokLIPFeatures(VisualFeatures):
    """The paper's generation input (Table 7, "concatenation"): ids [n, N', 1] (whole images, N' = N, or the
    first N' positions of partial ones) -> [n, N', c + d]: the token encoder's feature [c] (contextual: position t
    depends on positions <= t) then the position's VQ code vector [d]. Two splits, so the MLLM adapter gives each
    its own MLP and concatenates their outputs; adapter_inputs=semantic keeps the encoder's alone (the paper's
    understanding input)."""

    split_names = ("encoder", "code")  # the adapter's encoder_mlp and code_mlp
    per_id = False

    def __init__(self, codes: torch.Tensor, encoder: TokenEncoder):
        super().__init__()
        self.register_buffer("codes", codes.clone())  # [V, d] the VQGAN's unit code vectors
        self.encoder = encoder
        self.splits = (encoder.post_layernorm.normalized_shape[0], codes.shape[1])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dim() != 3 or ids.shape[-1] != 1:
            raise ValueError(f"TokLIP features take ids [n, N, 1], got {list(ids.shape)}")
        codes = self.codes[ids[..., 0]]  # [n, N', d]
        return torch.cat([self.encoder(codes), codes], dim=-1)


class VQCodeFeatures(VisualFeatures):
    """The plain-VQGAN baseline of the paper's Table 7 (toklip.llm_inputs=vqgan): id -> its VQ code vector [d]."""

    split_names = ("code",)
    per_id = True

    def __init__(self, codes: torch.Tensor):
        super().__init__()
        self.register_buffer("codes", codes.clone())  # [V, d]
        self.splits = (codes.shape[1],)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [n, N, 1] (or [n, N]) -> [n, N, d]"""
        return self.codes[ids[..., 0] if ids.dim() == 3 else ids]

    def table(self) -> torch.Tensor:
        return self.codes


class TokLIP(nn.Module, PushToHubMixin):
    kind = "toklip"

    def __init__(self, cfg: TokLIPConfig):
        super().__init__()
        if cfg.vision_config is None:
            raise ValueError("TokLIPConfig.vision_config is unset: build with TokLIP.from_teacher or from_pretrained")
        self.config = cfg
        vision = _vision_config(cfg)
        self.vqgan = VQGAN(cfg.vqgan).requires_grad_(False)
        self.image_size, self.grid = cfg.vqgan.image_size, cfg.vqgan.grid
        self.encoder = TokenEncoder(cfg.vqgan.code_dim, vision, self.grid, cfg.mlp_ratio, cfg.causal)
        self.head = SiglipMultiheadAttentionPoolingHead(vision)  # z: the pooled feature the losses see
        self.teacher = SiglipVisionModel(vision).requires_grad_(False)  # frozen: distillation target, alignment
        # InfoNCE's learned log logit scale (the repo's CLIP.logit_scale): exp() multiplies the cosine similarities
        self.logit_scale = nn.Parameter(torch.tensor(math.log(cfg.logit_scale_init)))
        self.trained_stages: list[int] = []  # 1: VQGAN, 2: token encoder

    @classmethod
    def from_teacher(cls, cfg: TokLIPConfig, vqgan: VQGAN, siglip: SiglipModel) -> "TokLIP":
        """A new TokLIP around a trained VQGAN, its token encoder and head initialised from the teacher's vision tower."""
        cfg = dataclasses.replace(cfg, vqgan=vqgan.config, vision_config=siglip.config.vision_config.to_dict(),
                                  text_config=siglip.config.text_config.to_dict())
        model = cls(cfg)
        model.vqgan.load_state_dict(vqgan.state_dict())
        model.teacher.load_state_dict(siglip.vision_model.state_dict())
        model.encoder.init_from(siglip.vision_model)
        model.head.load_state_dict(siglip.vision_model.head.state_dict())
        model.trained_stages = [1]
        return model

    # -- the VisualTokenizer contract ------------------------------------------------------------
    @property
    def code_vocab_sizes(self) -> tuple[int, ...]:
        return (self.config.vqgan.codebook_size,)

    @property
    def code_groups(self) -> tuple[int, ...]:
        return (1,)

    @property
    def vocab_size(self) -> int:
        return self.config.vqgan.codebook_size

    @property
    def device(self) -> torch.device:
        return self.head.probe.device

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [-1, 1] -> VQGAN ids [B, h, w]"""
        return self.vqgan.encode(images)

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """VQGAN ids [B, h, w] -> images [B, 3, H, W] in [-1, 1] (the VQGAN decoder)"""
        return self.vqgan.decode(ids)

    def features(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [B, N] -> (token features [B, N, c], pooled z [B, c]); differentiable in the encoder and head"""
        hidden = self.encoder(self.vqgan.quantizer.lookup(ids))
        return hidden, self.head(hidden)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.features(ids)

    def input_features(self) -> TokLIPFeatures | VQCodeFeatures:
        """What the MLLM reads (toklip.llm_inputs): a frozen fp32 CPU copy of the code table (and the MLP and token
        encoder for "concat")."""
        codes = self.vqgan.quantizer.codes().detach().cpu()
        if self.config.llm_inputs == "vqgan":
            return VQCodeFeatures(codes).requires_grad_(False)
        feats = TokLIPFeatures(codes, copy.deepcopy(self.encoder).cpu().float())
        return feats.eval().requires_grad_(False)

    @torch.no_grad()
    def teacher_features(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> the teacher's pooled image features [B, c] (images resized to its input size)"""
        size = self.teacher.config.image_size
        return self.teacher(pixel_values=resize(images.to(self.device), size)).pooler_output

    @torch.no_grad()
    def semantic_alignment(self, images: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """images -> (z from the VQGAN ids [B, 1, c], the teacher's pooled image features [B, 1, c]); seed: unused
        (the teacher is saved with the model)"""
        _, z = self.features(self.encode(images).flatten(1))
        return z[:, None], self.teacher_features(images)[:, None]

    # -- persistence -------------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> None:
        save_dir(self, path, {"model_type": self.kind, "trained_stages": self.trained_stages, **dataclasses.asdict(self.config)})

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> "TokLIP":
        meta, stages, config_file, weights = read_dir(path, cls)
        cfg = from_dict(TokLIPConfig, meta, where=str(config_file))
        model = load_checked(lambda: cls(cfg), config_file, weights)
        model.trained_stages = list(stages)
        return model.to(device).eval()
