"""SemHiTok: a semantic branch (SigLIP student + semantic-priority codebook) and a pixel branch
(ViT encoder + semantic-guided hierarchical codebook + ViT decoder).

Images enter as [B, 3, H, W] in [-1, 1] (SigLIP's normalisation: mean 0.5, std 0.5). Each patch gets a
semantic id i in [0, K) and a pixel id j in [0, m); the flattened visual id is h = i * m + j.
"""

from __future__ import annotations

import dataclasses
import json
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file
from transformers import SiglipVisionConfig, SiglipVisionModel

from semhitok.common.io import atomic_dir
from semhitok.tokenizer.config import TokenizerConfig
from semhitok.tokenizer.hub import PushToHubMixin, write_tokenizer_card
from semhitok.tokenizer.interface import VisualFeatures
from semhitok.tokenizer.quantizers import EMACodebook, HierarchicalCodebook, l2norm
from semhitok.tokenizer.saved import load_staged
from semhitok.tokenizer.siglip import load_teacher, teacher_features
from semhitok.tokenizer.vit import Transformer, patchify, pixel_geometry, resize, unpatchify


class SemanticBranch(nn.Module):
    def __init__(self, cfg: TokenizerConfig, siglip: SiglipVisionConfig, num_tokens: int):
        super().__init__()
        width = siglip.hidden_size
        self.encoder = SiglipVisionModel(siglip)  # the student; its weights come from the teacher
        self.to_code = nn.Linear(width, cfg.sem_code_dim)
        self.codebook = EMACodebook(
            cfg.sem_codebook_size, cfg.sem_code_dim, cfg.sem_ema_decay, cfg.sem_dead_code_threshold, cfg.sem_kmeans_iters,
            cfg.sem_kmeans_features,
        )
        self.decoder_in = nn.Linear(cfg.sem_code_dim, width)
        self.decoder = Transformer(width, cfg.sem_decoder_layers, siglip.num_attention_heads, num_tokens)
        self.decoder_out = nn.Linear(width, width)

    def code_features(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> unit code features [B, N, c]"""
        return l2norm(self.to_code(self.encoder(pixel_values=images).last_hidden_state))

    def quantize(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """images [B, 3, H, W] -> (semantic codes [B, N, c] straight-through, semantic ids [B, N], commitment loss [])"""
        z = self.code_features(images)
        b, n, c = z.shape
        q, idx, commit = self.codebook(z.reshape(b * n, c))
        return q.view(b, n, c), idx.view(b, n), commit

    def predict(self, q: torch.Tensor) -> torch.Tensor:
        """semantic codes [B, N, c] -> teacher-feature prediction [B, N, D]"""
        return self.decoder_out(self.decoder(self.decoder_in(q)))

    def forward(self, images: torch.Tensor, with_codes: bool = False):
        """images [B, 3, H, W] -> (teacher-feature prediction [B, N, D], semantic ids [B, N], commitment loss [])
        and, with_codes, the semantic codes [B, N, c] (straight-through) as a fourth element."""
        q, idx, commit = self.quantize(images)
        return (self.predict(q), idx, commit, q) if with_codes else (self.predict(q), idx, commit)


class PixelBranch(nn.Module):
    """Encoder side (patch_embed, encoder, to_code, codebook: what fixes the ids) and decoder side
    (DECODER_SIDE: fusion projection, decoder, pixel head), each with its own width, heads and depth."""

    DECODER_SIDE = ("fuse", "sem_in", "decoder", "to_pixels")

    def __init__(self, cfg: TokenizerConfig, image_size: int, grid: int):
        super().__init__()
        # patch x patch pixels per id on a canvas of grid * patch px (see vit.pixel_geometry: 16 / 256 at 256 px,
        # 15 / 405 at 384 px, or tokenizer.pix_patch=16: 16 / 432; the image is resized onto the canvas and the
        # output back to image_size)
        patch, self.canvas = pixel_geometry(image_size, grid, cfg.pix_patch)
        self.fusion, self.patch, self.grid, self.image_size = cfg.fusion, patch, grid, image_size
        self.codes_per_group, self.shared_codebook = cfg.codes_per_group, cfg.pix_codebook == "shared"
        self.code_dim, n = cfg.pix_code_dim, grid * grid
        if cfg.fusion != "semantic_only":
            enc = cfg.pix_encoder_width
            self.patch_embed = nn.Linear(patch * patch * 3, enc)
            self.encoder = Transformer(enc, cfg.pix_encoder_layers, cfg.pix_encoder_heads, n)
            self.to_code = nn.Linear(enc, cfg.pix_code_dim)
            self.codebook = HierarchicalCodebook(cfg.sem_codebook_size, cfg.pix_codes_per_group, cfg.pix_code_dim,
                                                 cfg.pix_restart_dead)
        width = cfg.pix_decoder_width
        if cfg.fusion == "concat":
            self.fuse = nn.Linear(cfg.sem_code_dim + cfg.pix_code_dim, width)
        elif cfg.fusion == "pixel_only":
            self.fuse = nn.Linear(cfg.pix_code_dim, width)
        elif cfg.fusion == "semantic_only":
            self.fuse = nn.Linear(cfg.sem_code_dim, width)
        else:  # length: two token sets, each with its own projection, one sequence of 2N
            self.sem_in = nn.Linear(cfg.sem_code_dim, width)
            self.fuse = nn.Linear(cfg.pix_code_dim, width)
        self.decoder = Transformer(width, cfg.pix_decoder_layers, cfg.pix_decoder_heads, 2 * n if cfg.fusion == "length" else n)
        self.to_pixels = nn.Linear(width, patch * patch * 3)

    def decoder_side(self) -> list[nn.Module]:
        return [getattr(self, name) for name in self.DECODER_SIDE if hasattr(self, name)]

    def lookup(self, sem_ids: torch.Tensor, pix_ids: torch.Tensor) -> torch.Tensor:
        """semantic ids, pixel ids [B, N] -> pixel codes [B, N, d] ([B, N, 0] without pixel codes)"""
        if self.fusion == "semantic_only":
            return sem_ids.new_zeros(*sem_ids.shape, 0, dtype=torch.float32)
        return self.codebook.lookup(sem_ids, pix_ids)

    def quantize(
        self, images: torch.Tensor, sem_ids: torch.Tensor, beta: float = 0.25
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """images [B, 3, H, W], semantic ids [B, N] -> (pixel codes [B, N, d] straight-through, visual ids
        [B, N] in [0, K*m), vq loss []). The id is semantic * m + pixel; with pix_codebook=shared the patch is
        quantized in one codebook of the K*m codes, not indexed by the semantic id, and the id is that code's index.
        Without pixel codes: ([B, N, 0], the semantic ids, 0)."""
        if self.fusion == "semantic_only":
            return self.lookup(sem_ids, sem_ids), sem_ids, images.new_zeros(())
        z = self.to_code(self.encoder(self.patch_embed(patchify(resize(images, self.canvas), self.patch))))
        b, n, d = z.shape
        shared = self.shared_codebook
        q, pix_ids, vq_loss = self.codebook(z.reshape(b * n, d), None if shared else sem_ids.reshape(-1), beta)
        ids = pix_ids.view(b, n) if shared else sem_ids * self.codes_per_group + pix_ids.view(b, n)
        return q.view(b, n, d), ids, vq_loss

    def forward(self, images: torch.Tensor, sem_ids: torch.Tensor, q_sem: torch.Tensor, beta: float):
        """Training path. images [B, 3, H, W], semantic ids [B, N], semantic codes [B, N, c] ->
        (reconstruction [B, 3, H, W], visual ids [B, N], vq loss [])"""
        q_pix, ids, vq_loss = self.quantize(images, sem_ids, beta)
        return self.decode(q_sem, q_pix), ids, vq_loss

    def decode(self, q_sem: torch.Tensor, q_pix: torch.Tensor) -> torch.Tensor:
        """semantic codes [B, N, c], pixel codes [B, N, d] -> images [B, 3, H, W]"""
        if self.fusion == "concat":
            x = self.fuse(torch.cat([q_sem, q_pix], dim=-1))
        elif self.fusion == "pixel_only":
            x = self.fuse(q_pix)
        elif self.fusion == "semantic_only":
            x = self.fuse(q_sem)
        else:
            x = torch.cat([self.sem_in(q_sem), self.fuse(q_pix)], dim=1)
        x = self.decoder(x)[:, -self.grid * self.grid :]
        return resize(unpatchify(self.to_pixels(x), self.patch, self.grid), self.image_size)  # [B, 3, H, W]


class SemHiTokFeatures(VisualFeatures):
    """SemHiTok's frozen code features for the MLLM adapter: id h -> concat(sem[h // m], pix[h]) [sem_dim + pix_dim],
    two splits (semantic, pixel) for the dual MLP."""

    split_names = ("sem", "pix")  # the adapter names its MLPs sem_mlp and pix_mlp
    per_id = True

    def __init__(self, sem_codes: torch.Tensor, pix_codes: torch.Tensor, codes_per_group: int):
        super().__init__()
        self.codes_per_group = codes_per_group
        self.register_buffer("sem_codes", sem_codes.float().clone())  # [K, sem_dim]
        self.register_buffer("pix_codes", pix_codes.float().clone())  # [K*m, pix_dim]
        self.splits = (sem_codes.shape[1], pix_codes.shape[1])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [n, N, 1] (or [n, N]) -> [n, N, sem_dim + pix_dim]"""
        ids = ids[..., 0] if ids.dim() == 3 else ids
        return torch.cat([self.sem_codes[ids // self.codes_per_group], self.pix_codes[ids]], dim=-1)

    def table(self) -> torch.Tensor:
        """[K*m, sem_dim + pix_dim]"""
        return self(torch.arange(self.pix_codes.shape[0], device=self.pix_codes.device)[None])[0]


class SemHiTok(nn.Module, PushToHubMixin):
    kind = "semhitok"  # VisualTokenizer (tokenizer/interface.py)

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        if cfg.siglip_config is None:
            raise ValueError("TokenizerConfig.siglip_config is unset: build with SemHiTok.from_teacher or from_pretrained")
        self.config = cfg
        siglip = SiglipVisionConfig.from_dict({**cfg.siglip_config, "vision_use_head": False})
        self.image_size, self.patch_size = siglip.image_size, siglip.patch_size
        self.grid = siglip.image_size // siglip.patch_size  # SigLIP's patch embedding drops the remainder: 384 // 14 = 27
        self.codes_per_group = cfg.codes_per_group
        self.semantic = SemanticBranch(cfg, siglip, self.grid * self.grid)
        self.pixel = PixelBranch(cfg, self.image_size, self.grid)
        self.trained_stages: list[int] = []

    @classmethod
    def from_teacher(cls, cfg: TokenizerConfig, teacher: SiglipVisionModel, copy_student: bool = True) -> "SemHiTok":
        """A new tokenizer whose student encoder starts as a copy of the teacher (copy_student=False: random
        weights of the teacher's architecture, Table 4's baseline without "SemEnc Init")."""
        cfg = dataclasses.replace(cfg, siglip_config=teacher.config.to_dict())
        model = cls(cfg)
        if copy_student:
            model.semantic.encoder.load_state_dict(teacher.state_dict())
        return model

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def code_vocab_sizes(self) -> tuple[int, ...]:
        return (self.vocab_size,)  # one flat id per position: K*m

    @property
    def code_groups(self) -> tuple[int, ...]:
        return (1,)

    @property
    def device(self) -> torch.device:
        return self.pixel.to_pixels.weight.device

    def input_features(self) -> SemHiTokFeatures:
        """The frozen (semantic, pixel) code features behind every id, on CPU in fp32 (the dual-MLP adapter's input)."""
        sem, pix = self.code_features()
        return SemHiTokFeatures(sem.cpu(), pix.cpu(), self.codes_per_group).requires_grad_(False)

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    # -- ids ---------------------------------------------------------------------------------------
    def split_ids(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """flattened ids [...] -> (semantic ids [...], pixel ids [...]). With pix_codebook=shared the id is an
        index into one shared codebook: the pair addresses its code (codes[h // m, h % m]), h // m is no semantic id."""
        return ids // self.codes_per_group, ids % self.codes_per_group

    def join_ids(self, sem: torch.Tensor, pix: torch.Tensor) -> torch.Tensor:
        return sem * self.codes_per_group + pix

    def id_parts(self, ids: torch.Tensor) -> dict[str, tuple[torch.Tensor, int]]:
        """ids [...] -> {"semantic_codebook": (semantic ids [...], K)} (interface.py; eval's usage report)"""
        return {"semantic_codebook": (self.split_ids(ids)[0], self.config.sem_codebook_size)}

    @torch.no_grad()
    def code_features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The quantized features behind the ids: (semantic codes [K, sem_dim], pixel codes [K*m, pix_dim]).

        Visual id h stands for semantic code sem[h // m] and pixel code pix[h]. Without pixel codes
        (fusion semantic_only, m = 1) the pixel codes are zeros [K, pix_dim]; with ids that carry no semantic id
        (pix_codebook=shared) the semantic codes are zeros."""
        sem = self.semantic.codebook.embed.detach().clone()
        if self.config.fusion == "semantic_only":
            return sem, sem.new_zeros(sem.shape[0], self.config.pix_code_dim)
        if self.config.pix_codebook == "shared":
            sem = torch.zeros_like(sem)
        return sem, l2norm(self.pixel.codebook.codes.detach()).flatten(0, 1)

    # -- encode / decode ---------------------------------------------------------------------------
    def semantic_ids(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> semantic ids [B, N]"""
        with self._autocast():
            z = self.semantic.code_features(images)
        b, n, c = z.shape
        return self.semantic.codebook.nearest(z.reshape(b * n, c)).view(b, n)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [-1, 1] -> visual ids [B, h, w] (int64) in [0, K*m)"""
        self._require_stage(2)
        sem = self.semantic_ids(images)
        with self._autocast():
            _, ids, _ = self.pixel.quantize(images, sem)
        return ids.view(-1, self.grid, self.grid)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """visual ids [B, h, w] -> images [B, 3, H, W] in [-1, 1]"""
        self._require_stage(2)
        if ids.shape[1:] != (self.grid, self.grid):
            raise ValueError(f"ids must be [B, {self.grid}, {self.grid}], got {list(ids.shape)}")
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise ValueError(f"visual ids must lie in [0, {self.vocab_size}), got [{int(ids.min())}, {int(ids.max())}]")
        sem, pix = self.split_ids(ids.flatten(1).to(self.device))
        with self._autocast():
            images = self.pixel.decode(self.semantic.codebook.lookup(sem), self.pixel.lookup(sem, pix))
        return images.float().clamp(-1, 1)

    @torch.no_grad()
    def semantic_alignment(self, images: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, 3, H, W] -> (the semantic branch's prediction of the teacher's features from the quantized
        codes, the teacher's features), both [B, N, D] (interface.py; eval's comparison table). The teacher is
        rebuilt from the config as stage 1 built it: a random (tiny) one after seeding with tokenizer_train.seed."""
        teacher = self.__dict__.get("_teacher")
        if teacher is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                teacher = load_teacher(self.config).to(self.device)
            self.__dict__["_teacher"] = teacher  # not a submodule: stays out of state_dict and save_pretrained
        images = images.to(self.device)
        return self.semantic(images)[0].float(), teacher_features(teacher, images, self.config.distill_layer).float()

    def _require_stage(self, stage: int) -> None:
        if stage not in self.trained_stages:
            raise RuntimeError(f"this tokenizer has trained stages {self.trained_stages}; stage {stage} is needed")

    # -- persistence -------------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> None:
        """Write config.json + model.safetensors + a model card (README.md) into `path` atomically."""
        with atomic_dir(path) as tmp:
            state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
            save_file(state, str(tmp / "model.safetensors"))
            meta = {"model_type": "semhitok", "trained_stages": self.trained_stages, **dataclasses.asdict(self.config)}
            (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
            write_tokenizer_card(tmp, Path(path))

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> "SemHiTok":
        """Check config.json and the weights against each other before allocating anything (a skeleton of
        the model on the meta device gives every expected shape), then load. `path`: a directory or a Hub id."""
        return load_staged(cls, TokenizerConfig, path, device, stages=(1, 2))
