"""DualToken training: one task in tokenizer/trainer.py's loop (data order, exact resume from checkpoints with
their completion markers, logging, holdout eval, pictures are the loop's).

Loss (paper eq. 2-4): recon_weight * (||x^ - x||^2 + perceptual_weight * perceptual + gan_weight * hinge G)
+ semantic_weight * L_sem + commit_weight * (commitment of both vocabularies). L_sem = ||F - F_0||^2 on the tower's
layer-`semantic_layer` features against the frozen initial copy (the paper's), plus ||from_sem(q_sem) - F_0||^2
(ours: it trains the map from the semantic codes back to the tower's width, which semantic_alignment reports).
variant=official (the authors' repo): 5 * l2 + perceptual + GAN + semantic_weight * L_sem + 5 * commitment, with
L_sem = 5 * (MSE + (1 - cos)) on the layer-`semantic_layer` features + (MSE + (1 - cos)) on the pooled head output
of the quantized path; with freeze_tower (the repo's stage 0) L_sem = 5 * the pooled term alone.
The perceptual and GAN terms, their weights, disc_start, lr and steps come from the run's tokenizer_train
section (LPIPS at 384; the tiny preset's `semantic` stand-in looks through the frozen initial tower).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from semhitok.common import dist as D
from semhitok.common.plot import reconstruction_grid
from semhitok.tokenizer.config import TokenizerTrainConfig
from semhitok.tokenizer.data import to_pil
from semhitok.tokenizer.dualtoken.model import DualToken
from semhitok.tokenizer.losses import PatchDiscriminator, build_perceptual, hinge_g_loss
from semhitok.tokenizer.metrics import psnr
from semhitok.tokenizer.siglip import load_teacher
from semhitok.tokenizer.trainer import Task, Trainer

log = logging.getLogger("semhitok")


class DualTokenTask(Task):
    """Tower (all its layers up to semantic_layer), code projections and pixel decoder train together; the
    codebooks follow their EMA; the initial tower stays frozen. DualToken has one stage (stage 1)."""

    stage = 1

    def __init__(self, model: DualToken, train: TokenizerTrainConfig, device: torch.device, world: int):
        super().__init__(train, device)
        self.model = model.to(device)
        self.cfg = model.config
        model.initial.requires_grad_(False).eval()
        if model.config.freeze_tower:  # the repo's stage 0: embeddings and layers 1..semantic_layer fixed
            model.tower.embeddings.requires_grad_(False)
            model.tower.encoder.layers[: model.config.semantic_layer].requires_grad_(False)
        self.trained_params = [p for n, p in model.named_parameters() if not n.startswith("initial.") and p.requires_grad]
        self.perceptual = build_perceptual(train.perceptual, model.initial)
        self.run_info["perceptual"] = "none" if self.perceptual is None else self.perceptual.kind
        disc = PatchDiscriminator().to(device)
        wrap = (lambda m: DDP(m, broadcast_buffers=False)) if world > 1 else (lambda m: m)
        self.net, self.disc = wrap(model), wrap(disc)
        self.optimizers = {
            "tokenizer": self._optimizer(self.trained_params, train.lr),
            "disc": self._optimizer(disc.parameters(), train.disc_lr),
        }
        self.schedulers = self._schedulers({"tokenizer": train.max_steps, "disc": max(1, train.max_steps - train.disc_start)})
        self.extra_modules = {"discriminator": disc}

    def train_step(self, images: torch.Tensor, step: int) -> dict[str, float]:
        t, c = self.train_cfg, self.cfg
        self.net.train()
        self.model.initial.eval()
        gan_on = step >= t.disc_start
        zero = torch.zeros((), device=self.device)
        with torch.no_grad(), self.autocast:
            targets = self.model.targets(images)  # F_0 [B, N, W] (official: and the pooled feature [B, W])
        with self.autocast:
            out = self.net(images)
            recon = out["recon"]
            perc = self.perceptual(recon, images) if self.perceptual is not None else zero
            g_adv = hinge_g_loss(self.disc(recon)) if gan_on else zero
        target = targets["deep"].float()
        l2 = F.mse_loss(recon.float(), images)
        sem_tower = F.mse_loss(out["deep"].float(), target)
        sem_codes = F.mse_loss(out["sem_pred"].float(), target)
        commit = out["sem_commit"] + out["pix_commit"]
        extra = {}
        if c.official:
            pooled, pooled0 = out["pooled"].float(), targets["pooled"].float()
            sem_pooled = F.mse_loss(pooled, pooled0) + 1 - F.cosine_similarity(pooled, pooled0, dim=-1).mean()
            # the repo's stage 0 (tower frozen): 5 x pooled; stage 1: 5 x (MSE + cosine) on layer 26 + pooled
            cos_tower = 1 - F.cosine_similarity(out["deep"].float(), target, dim=-1).mean()
            sem = 5 * sem_pooled if c.freeze_tower else 5 * (sem_tower + cos_tower) + sem_pooled
            loss = (c.recon_weight * l2 + t.perceptual_weight * perc + t.gan_weight * g_adv
                    + c.semantic_weight * sem + c.commit_weight * commit)
            extra = {"semantic_pooled_loss": sem_pooled.item()}
        else:
            loss = (c.recon_weight * (l2 + t.perceptual_weight * perc + t.gan_weight * g_adv)
                    + c.semantic_weight * (sem_tower + sem_codes) + c.commit_weight * commit)
        norm = self._step("tokenizer", loss, self.trained_params)
        metrics = {
            "loss": loss.item(),
            "l2_loss": l2.item(),
            "perceptual_loss": perc.item(),
            "g_adv_loss": g_adv.item(),
            "semantic_loss": sem_tower.item(),
            "semantic_code_loss": sem_codes.item(),
            "sem_commit_loss": out["sem_commit"].item(),
            "pix_commit_loss": out["pix_commit"].item(),
            "grad_norm": norm,
            "train_psnr": float(psnr(recon.detach().float().clamp(-1, 1), images)),
            "sem_codes_used": float(torch.unique(out["sem_ids"][..., 0]).numel()),  # first depth
            "pix_codes_used": float(torch.unique(out["pix_ids"][..., 0]).numel()),
            **extra,
        }
        if gan_on:
            metrics["d_loss"] = self._disc_step(images, recon)
        return metrics

    @torch.no_grad()
    def evaluate(self, images: torch.Tensor) -> dict[str, float]:
        self.model.eval()
        pred, target = self.model.semantic_alignment(images)
        return {
            "holdout_psnr": float(psnr(self.model.decode(self.model.encode(images)), images)),
            "holdout_teacher_cosine": float(F.cosine_similarity(pred.float(), target.float(), dim=-1).mean()),
        }

    @torch.no_grad()
    def picture(self, images: torch.Tensor):
        """inputs over their reconstructions"""
        self.model.eval()
        return reconstruction_grid([to_pil(x) for x in images.cpu()], [to_pil(y) for y in self.model.decode(self.model.encode(images)).cpu()])


def final_dir(cfg) -> Path:
    """The finished DualToken tokenizer of run config `cfg` (semhitok.config.ProjectConfig)."""
    return Path(cfg.run_dir) / "tokenizer" / "dualtoken" / "final"


def train(cfg) -> Path:
    """Train (or resume) DualToken under <run_dir>/tokenizer/dualtoken from cfg.dualtoken and cfg.tokenizer_train;
    skips when final/ is already there. Returns final_dir(cfg)."""
    final = final_dir(cfg)
    if (final / "config.json").is_file():
        log.info("DualToken tokenizer already trained at %s; skipping", final)
        return final
    info = D.init_distributed()
    device = D.default_device(info.local_rank)
    torch.manual_seed(cfg.tokenizer_train.seed)  # identical initial weights on every rank
    model = DualToken.from_teacher(cfg.dualtoken, load_teacher(cfg.dualtoken, head=cfg.dualtoken.official))
    task = DualTokenTask(model, cfg.tokenizer_train, device, info.world_size)
    Trainer(task, cfg.tokenizer_train, final.parent, info).fit()
    return final
