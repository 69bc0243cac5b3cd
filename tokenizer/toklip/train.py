"""TokLIP training: stage 1 trains the VQGAN (L1 + codebook + commitment + perceptual + hinge GAN) or converts
LlamaGen's released one (toklip.vqgan_pretrained, llamagen.py), stage 2 the MLP and token encoder over the
frozen VQGAN's codes: the loss of TencentARC/TokLIP's training code (open_clip's DistillClipLoss): InfoNCE
between the normalised pooled z and the teacher's text features over the batch gathered from every rank, at a
learned logit scale clamped to <= 100, plus 1000 x MSE between the normalised z and the teacher's normalised
image features. Both stages are tasks of tokenizer/trainer.py's Trainer (data order, exact resume, logging,
holdout evaluation, pictures), written under <run_dir>/tokenizer/toklip_vqgan and <run_dir>/tokenizer/toklip.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import string
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from semhitok.common import dist as D
from semhitok.common.io import loads_json
from semhitok.common.plot import reconstruction_grid
from semhitok.tokenizer.config import TokenizerTrainConfig
from semhitok.tokenizer.data import to_pil
from semhitok.tokenizer.losses import PatchDiscriminator, build_perceptual, hinge_g_loss
from semhitok.tokenizer.metrics import psnr
from semhitok.tokenizer.text import byte_caption_ids
from semhitok.tokenizer.toklip.config import TokLIPConfig
from semhitok.tokenizer.toklip.llamagen import load_llamagen
from semhitok.tokenizer.toklip.model import TokLIP, load_siglip
from semhitok.tokenizer.toklip.vqgan import VQGAN
from semhitok.tokenizer.trainer import Task, Trainer

log = logging.getLogger("semhitok")


def _wrap(module: nn.Module, world: int) -> nn.Module:
    return DDP(module, broadcast_buffers=False) if world > 1 else module


def _codes_used(ids: torch.Tensor, vocab: int) -> float:
    usage = torch.bincount(ids.flatten(), minlength=vocab).float()
    D.all_reduce_sum(usage)
    return float((usage > 0).sum())


class VQGANTask(Task):
    """Stage 1: the VQGAN, LlamaGen's losses (reconstruction, codebook, commitment, perceptual, hinge GAN)."""

    stage = 1

    def __init__(self, model: VQGAN, teacher_vision: nn.Module, train: TokenizerTrainConfig, device, world: int):
        super().__init__(train, device)
        self.model = model.to(device)
        self.perceptual = build_perceptual(train.perceptual, teacher_vision.to(device))
        self.run_info["perceptual"] = "none" if self.perceptual is None else self.perceptual.kind
        disc = PatchDiscriminator().to(device)
        self.vq, self.disc = _wrap(model, world), _wrap(disc, world)
        self.optimizers = {"vqgan": self._optimizer(model.parameters(), train.lr),
                           "disc": self._optimizer(disc.parameters(), train.disc_lr)}
        self.schedulers = self._schedulers({"vqgan": train.max_steps, "disc": max(1, train.max_steps - train.disc_start)})
        self.extra_modules = {"discriminator": disc}

    def train_step(self, images: torch.Tensor, step: int) -> dict[str, float]:
        t, zero = self.train_cfg, torch.zeros((), device=self.device)
        self.vq.train()
        gan_on = step >= t.disc_start
        with self.autocast:
            recon, ids, codebook, commit = self.vq(images)
            l1 = (recon.float() - images).abs().mean()
            perc = self.perceptual(recon, images) if self.perceptual is not None else zero
            g_adv = hinge_g_loss(self.disc(recon)) if gan_on else zero
        loss = (t.l1_weight * l1 + t.codebook_weight * codebook + t.commit_weight * commit
                + t.perceptual_weight * perc + t.gan_weight * g_adv)
        norm = self._step("vqgan", loss, self.model.parameters())
        metrics = {"loss": loss.item(), "l1_loss": l1.item(), "codebook_loss": codebook.item(),
                   "commit_loss": commit.item(), "perceptual_loss": perc.item(), "g_adv_loss": g_adv.item(),
                   "grad_norm": norm, "train_psnr": float(psnr(recon.detach().float().clamp(-1, 1), images)),
                   "codes_used": _codes_used(ids, self.model.config.codebook_size)}
        if gan_on:
            metrics["d_loss"] = self._disc_step(images, recon)
        return metrics

    @torch.no_grad()
    def evaluate(self, images: torch.Tensor) -> dict[str, float]:
        self.model.eval()
        ids = self.model.encode(images)
        return {"holdout_psnr": float(psnr(self.model.decode(ids), images)),
                "holdout_codes_used": float(torch.unique(ids).numel())}

    @torch.no_grad()
    def picture(self, images: torch.Tensor):
        """inputs over their reconstructions"""
        self.model.eval()
        return reconstruction_grid([to_pil(x) for x in images.cpu()], [to_pil(y) for y in self.model.decode(self.model.encode(images)).cpu()])


def gather_with_local_grad(x: torch.Tensor) -> torch.Tensor:
    """x [n, ...] on each rank (equal n) -> [world*n, ...] in rank order, the gradient flowing into this rank's own
    rows only (open_clip's gather_features without gather_with_grad, as TokLIP trains); x itself on one process."""
    if not D.is_dist():
        return x
    everyone = D.all_gather_cat(x.detach())
    lo, hi = dist.get_rank() * len(x), (dist.get_rank() + 1) * len(x)
    return torch.cat([everyone[:lo], x, everyone[hi:]])


def info_nce(z_img: torch.Tensor, z_text: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """z_img, z_text [B, c] (pair i matches i) -> symmetric InfoNCE [] on logit_scale * cosine similarities"""
    logits = logit_scale * F.normalize(z_img.float(), dim=-1) @ F.normalize(z_text.float(), dim=-1).t()  # [B, B]
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def toklip_losses(z: torch.Tensor, z_text: torch.Tensor, z_img: torch.Tensor, logit_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's pooled z [n, c], the teacher's text and image features [n, c], the log logit scale [] ->
    (InfoNCE over the batch of every rank, MSE between the normalised z and teacher image features [] (unweighted))."""
    z = F.normalize(z.float(), dim=-1)
    contrast = info_nce(gather_with_local_grad(z), gather_with_local_grad(z_text.float()), logit_scale.exp())
    return contrast, F.mse_loss(z, F.normalize(z_img.float(), dim=-1))


_PUNCTUATION = str.maketrans("", "", string.punctuation)


def canonicalize(text: str) -> str:
    """open_clip's canonicalize_text, the clean step of TokLIP's SigLIP2 tokenizer: "_" -> space, ASCII
    punctuation removed, lowercase, runs of whitespace -> one space, stripped."""
    return " ".join(text.replace("_", " ").translate(_PUNCTUATION).lower().split())


class CaptionTokenizer:
    """captions -> input_ids [B, T] for the teacher's text tower (cleaned as toklip.caption_clean says, padded to
    text_max_length, as SigLIP is)."""

    def __init__(self, cfg: TokLIPConfig):
        self.max_length, self.hf = cfg.text_max_length, None
        if cfg.text_tokenizer != "bytes":
            from transformers import AutoTokenizer  # noqa: PLC0415

            self.hf = AutoTokenizer.from_pretrained(cfg.text_tokenizer or cfg.teacher)
        self.canonical = cfg.caption_clean == "canonicalize" or (cfg.caption_clean == "auto" and self.hf is not None)

    def __call__(self, captions: list[str]) -> torch.Tensor:
        if self.canonical:
            captions = [canonicalize(c) for c in captions]
        if self.hf is not None:
            return self.hf(captions, padding="max_length", truncation=True, max_length=self.max_length,
                           return_tensors="pt")["input_ids"]
        return byte_caption_ids(captions, self.max_length)


def list_captions(sources: list[str]) -> list[str]:
    """The caption of every image tokenizer.data.list_images finds in `sources`, in the same order (jsonl
    sources with "image" and "caption" fields; the encoder stage cannot train on images without text)."""
    captions: list[str] = []
    for source in map(Path, sources):
        if source.suffix != ".jsonl" or source.is_dir():
            raise ValueError(f"{source}: the TokLIP encoder stage needs captions: pass jsonl files of image + caption")
        with open(source) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = loads_json(line, "row")  # (depth-limited: a ValueError, not a RecursionError)
                    record["image"]
                except (ValueError, KeyError, TypeError):
                    continue  # list_images skips it too (and says so)
                caption = record.get("caption")
                if not isinstance(caption, str) or not caption:
                    raise ValueError(f"{source}:{lineno}: no \"caption\" text for the TokLIP encoder stage")
                captions.append(caption)
    return captions


class EncoderTask(Task):
    """Stage 2: only the MLP, token encoder, pooling head and logit scale train; the VQGAN and both teacher towers
    are frozen."""

    stage = 2
    needs_index = True

    def __init__(self, model: TokLIP, text_model: nn.Module, train: TokenizerTrainConfig, device, world: int):
        super().__init__(train, device)
        cfg = model.config
        self.model, self.text_model = model.to(device), text_model.to(device).eval()
        self.captions, self.tokenize = list_captions(train.train_data), CaptionTokenizer(cfg)
        model.requires_grad_(False)
        self.trained = [model.encoder, model.head]
        for module in self.trained:
            module.requires_grad_(True)
        model.logit_scale.requires_grad_(True)
        self.params = [p for m in self.trained for p in m.parameters()] + [model.logit_scale]
        self.net = _wrap(model, world)
        # Table A1's AdamW; as the repo, no weight decay on gains, biases and the logit scale (ndim < 2)
        groups = [{"params": [p for p in self.params if p.ndim >= 2]},
                  {"params": [p for p in self.params if p.ndim < 2], "weight_decay": 0.0}]
        self.optimizers = {"encoder": torch.optim.AdamW(groups, lr=train.lr, betas=(0.9, 0.98), weight_decay=train.weight_decay)}
        self.schedulers = self._schedulers({"encoder": train.max_steps})
        self.extra_modules = {}

    def train_step(self, images: torch.Tensor, step: int, index: torch.Tensor) -> dict[str, float]:
        cfg = self.model.config
        self.model.eval()  # the frozen parts stay in eval mode
        for module in self.trained:
            module.train()
        with torch.no_grad(), self.autocast:
            ids = self.model.encode(images).flatten(1)  # [B, N]
            z_img = self.model.teacher_features(images)  # [B, c]
            tokens = self.tokenize([self.captions[i] for i in index.tolist()]).to(self.device)
            z_text = self.text_model(input_ids=tokens).pooler_output  # [B, c]
        with self.autocast:
            _, z = self.net(ids)
        contrast, distill = toklip_losses(z, z_text, z_img, self.model.logit_scale)
        loss = cfg.contrast_weight * contrast + cfg.distill_weight * distill
        norm = self._step("encoder", loss, self.params)
        with torch.no_grad():  # the repo clamps the log scale to [0, ln 100] after every step
            self.model.logit_scale.clamp_(0, math.log(cfg.logit_scale_max))
        return {"loss": loss.item(), "contrast_loss": contrast.item(), "distill_loss": distill.item(), "grad_norm": norm,
                "logit_scale": float(self.model.logit_scale.detach().exp()),
                "teacher_cosine": float(F.cosine_similarity(z.detach().float(), z_img.float(), dim=-1).mean())}

    @torch.no_grad()
    def evaluate(self, images: torch.Tensor) -> dict[str, float]:
        self.model.eval()
        pred, target = self.model.semantic_alignment(images)
        return {"holdout_teacher_cosine": float(F.cosine_similarity(pred.float(), target.float(), dim=-1).mean())}

    @torch.no_grad()
    def picture(self, images: torch.Tensor):
        """inputs over the VQGAN's reconstructions"""
        self.model.eval()
        return reconstruction_grid([to_pil(x) for x in images.cpu()], [to_pil(y) for y in self.model.decode(self.model.encode(images)).cpu()])


# -- stages and the kind's entry points (tokenizer/kinds.py TRAINERS) -----------------------------------
def stage_train(cfg, stage: int) -> TokenizerTrainConfig:
    """tokenizer_train with this stage's steps (and, for the encoder, its optimiser settings)"""
    k, t = cfg.toklip, cfg.tokenizer_train
    if stage == 1:
        return dataclasses.replace(t, stage=1, max_steps=k.vqgan_steps)
    return dataclasses.replace(t, stage=2, max_steps=k.encoder_steps, lr=k.encoder_lr, weight_decay=k.encoder_weight_decay,
                               warmup_steps=k.encoder_warmup_steps, batch_size=k.encoder_batch_size or t.batch_size)


def vqgan_dir(cfg) -> Path:
    """The trained VQGAN the encoder stage reads: toklip.vqgan_pretrained when that is a VQGAN directory, else this
    run's stage 1 (trained, or converted from the LlamaGen checkpoint file toklip.vqgan_pretrained names)."""
    given = cfg.toklip.vqgan_pretrained
    return Path(given) if given and Path(given).is_dir() else Path(cfg.run_dir) / "tokenizer" / "toklip_vqgan" / "final"


def convert_pretrained(cfg) -> Path:
    """Stage 1 from LlamaGen's released VQGAN: toklip.vqgan_pretrained (a file) converted into vqgan_dir(cfg)
    at toklip.vqgan.image_size (rank 0 writes, every rank waits)."""
    info, out, given = D.init_distributed(), vqgan_dir(cfg), Path(cfg.toklip.vqgan_pretrained)
    if given.is_dir():
        raise FileNotFoundError(f"toklip.vqgan_pretrained={given}: a directory without config.json, not a trained VQGAN")
    if info.is_main:
        model = load_llamagen(cfg.toklip.vqgan_pretrained, cfg.toklip.vqgan.image_size)
        model.save_pretrained(out)
        log.info("converted LlamaGen's VQGAN %s -> %s (%s)", cfg.toklip.vqgan_pretrained, out, model.config)
    D.barrier()
    return out


def final_dir(cfg) -> Path:
    return Path(cfg.run_dir) / "tokenizer" / "toklip" / "final"


def build_task(cfg, stage: int, device: torch.device, world: int) -> Task:
    train = stage_train(cfg, stage)
    torch.manual_seed(train.seed)  # the same (random) teacher in both stages and on every rank
    siglip = load_siglip(cfg.toklip)
    if stage == 1:
        return VQGANTask(VQGAN(cfg.toklip.vqgan), siglip.vision_model, train, device, world)
    where = vqgan_dir(cfg)
    if not (where / "config.json").is_file():
        raise FileNotFoundError(f"the TokLIP encoder stage needs a trained VQGAN; none at {where} (run stage 1 first)")
    model = TokLIP.from_teacher(cfg.toklip, VQGAN.from_pretrained(where), siglip)
    return EncoderTask(model, siglip.text_model, train, device, world)


def train_stage(cfg, stage: int) -> nn.Module:
    """Run (or resume) one stage; return its model, also saved to <stage dir>/final."""
    info = D.init_distributed()
    out = (vqgan_dir(cfg) if stage == 1 else final_dir(cfg)).parent
    task = build_task(cfg, stage, D.default_device(info.local_rank), info.world_size)
    return Trainer(task, task.train_cfg, out, info).fit()


def train(cfg) -> Path:
    """The VQGAN (trained, or converted from the LlamaGen checkpoint toklip.vqgan_pretrained names, or that
    VQGAN directory itself), then the token encoder; a finished stage is skipped."""
    for stage, done in ((1, vqgan_dir(cfg)), (2, final_dir(cfg))):
        if (done / "config.json").is_file():
            log.info("== toklip stage %d already finished at %s; skipping", stage, done)
            continue
        if stage == 1 and cfg.toklip.vqgan_pretrained:
            convert_pretrained(cfg)
            continue
        log.info("== toklip stage %d -> %s", stage, done.parent)
        train_stage(cfg, stage)
    return final_dir(cfg)
