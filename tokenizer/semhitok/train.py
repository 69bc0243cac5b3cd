"""SemHiTok training: two stage tasks that differ only in model and loss, run by the shared loop (trainer.py:
data order, checkpoints with exact resume, logging, evaluation and pictures).

Stage 1 distils a frozen SigLIP teacher into the semantic branch. Stage 2 trains the pixel branch with the
semantic branch frozen, in phases (the paper: ImageNet, then COYO continuing every weight, then a larger
pixel decoder; `trains` picks the trained parts, `init_from` the parent).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from semhitok.common import dist as D
from semhitok.common.plot import code_map_grid, reconstruction_grid
from semhitok.tokenizer.config import TokenizerConfig, TokenizerTrainConfig
from semhitok.tokenizer.data import id_map_image, to_pil
from semhitok.tokenizer.losses import (
    PatchDiscriminator,
    build_perceptual,
    distill_loss,
    hinge_g_loss,
)
from semhitok.tokenizer.metrics import psnr
from semhitok.tokenizer.semhitok.model import SemHiTok
from semhitok.tokenizer.siglip import load_teacher, teacher_features
from semhitok.tokenizer.trainer import Task, Trainer, check_resume

log = logging.getLogger("semhitok")


class Stage1Task(Task):
    """Distil the frozen teacher's patch features through the semantic codebook (cosine + L1 + commitment)."""

    stage = 1

    def __init__(self, model: SemHiTok, teacher: nn.Module, train: TokenizerTrainConfig, device, world: int):
        super().__init__(train, device)
        self.model, self.teacher = model.to(device), teacher.to(device)
        model.pixel.requires_grad_(False)
        if train.semantic_encoder == "frozen":  # eq. (1)'s frozen E_sem: the teacher's copy stays as loaded
            model.semantic.encoder.requires_grad_(False)
        branch = model.semantic
        self.branch = DDP(branch, broadcast_buffers=False) if world > 1 else branch
        self.optimizers = {"semantic": self._optimizer(branch.parameters(), train.lr)}
        self.schedulers = self._schedulers({"semantic": train.max_steps})
        self.extra_modules = {}

    def train_step(self, images: torch.Tensor, step: int) -> dict[str, float]:
        self.branch.train()
        with torch.no_grad(), self.autocast:
            target = teacher_features(self.teacher, images, self.model.config.distill_layer)
        with self.autocast:
            pred, ids, commit = self.branch(images)
        cosine, l1 = distill_loss(pred, target)
        loss = cosine + l1 + self.train_cfg.commit_weight * commit
        norm = self._step("semantic", loss, self.branch.parameters())
        usage = torch.zeros(self.model.config.sem_codebook_size, device=ids.device)
        usage.index_add_(0, ids.flatten(), torch.ones(ids.numel(), device=ids.device))
        D.all_reduce_sum(usage)
        p = usage / usage.sum()
        return {
            "loss": loss.item(),
            "cosine_loss": cosine.item(),
            "l1_loss": l1.item(),
            "commit_loss": commit.item(),
            "grad_norm": norm,
            "sem_codes_used": float((usage > 0).sum()),
            "sem_perplexity": float(torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())),
        }

    @torch.no_grad()
    def evaluate(self, images: torch.Tensor) -> dict[str, float]:
        self.model.eval()
        target = teacher_features(self.teacher, images, self.model.config.distill_layer)
        pred, _, _ = self.model.semantic(images)  # eval mode: no codebook update
        cosine, _ = distill_loss(pred, target)
        return {"holdout_teacher_cosine": 1 - float(cosine)}

    @torch.no_grad()
    def picture(self, images: torch.Tensor):
        """inputs over their semantic-id maps"""
        self.model.eval()
        ids = self.model.semantic_ids(images).view(-1, self.model.grid, self.model.grid)
        maps = id_map_image(ids.cpu(), images.shape[-1])
        return code_map_grid([to_pil(x) for x in images.cpu()], [to_pil(m) for m in maps],
                             f"stage 1 code map: each square is one patch's semantic codebook id, one colour per id "
                             f"({self.model.grid}x{self.model.grid} ids per image; the same colour = the same id)")


class Stage2Task(Task):
    """Pixel branch with L1 + vq + perceptual + hinge GAN. train.trains picks what updates: the pixel branch
    (semantic branch frozen); its decoder side only (pixel encoder and both codebooks frozen: ids unchanged);
    or jointly with the semantic branch, which then keeps stage 1's distillation loss (needs the teacher)."""

    stage = 2

    def __init__(self, model: SemHiTok, train: TokenizerTrainConfig, device, world: int, teacher: nn.Module | None = None):
        super().__init__(train, device)
        self.model = model.to(device)
        self.joint = train.trains == "joint"
        if self.joint and teacher is None:
            raise ValueError("tokenizer_train.trains=joint needs the teacher for the semantic loss")
        self.teacher = teacher.to(device) if teacher is not None else None
        model.requires_grad_(False)
        model.semantic.eval()
        trained = model.pixel.decoder_side() if train.trains == "decoder" else [model.pixel]
        if self.joint:
            trained.append(model.semantic)
        for module in trained:
            module.requires_grad_(True)
        self.trained_params = [p for m in trained for p in m.parameters() if p.requires_grad]
        # The perceptual term must not look through an encoder that this run trains.
        through_teacher = self.joint or train.perceptual_network == "teacher"
        if through_teacher and self.teacher is None:
            raise ValueError("tokenizer_train.perceptual_network=teacher needs the teacher (build_task loads it)")
        self.perceptual = build_perceptual(train.perceptual, self.teacher if through_teacher else model.semantic.encoder)
        self.run_info["perceptual"] = "none" if self.perceptual is None else self.perceptual.kind
        self.run_info["perceptual_network"] = "teacher" if through_teacher else "student"
        disc = PatchDiscriminator().to(device)
        wrap = (lambda m: DDP(m, broadcast_buffers=False)) if world > 1 else (lambda m: m)
        self.pixel, self.disc = wrap(model.pixel), wrap(disc)
        self.semantic = wrap(model.semantic) if self.joint else model.semantic
        self.optimizers = {
            "pixel": self._optimizer(self.trained_params, train.lr),
            "disc": self._optimizer(disc.parameters(), train.disc_lr),
        }
        self.schedulers = self._schedulers({"pixel": train.max_steps, "disc": max(1, train.max_steps - train.disc_start)})
        self.extra_modules = {"discriminator": disc}

    def _semantic(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """images -> (semantic ids [B, N], semantic codes [B, N, c], semantic loss []); the loss and the codes'
        gradient only when the semantic branch trains."""
        if not self.joint:
            with torch.no_grad():
                sem = self.model.semantic_ids(images)
                return sem, self.model.semantic.codebook.lookup(sem), torch.zeros((), device=self.device)
        self.semantic.train()
        with torch.no_grad(), self.autocast:
            target = teacher_features(self.teacher, images, self.model.config.distill_layer)
        with self.autocast:
            pred, sem, commit, q_sem = self.semantic(images, with_codes=True)
        cosine, l1 = distill_loss(pred, target)
        return sem, q_sem, cosine + l1 + self.train_cfg.commit_weight * commit

    def train_step(self, images: torch.Tensor, step: int) -> dict[str, float]:
        t = self.train_cfg
        self.pixel.train()
        gan_on = step >= t.disc_start
        sem, q_sem, sem_loss = self._semantic(images)
        with self.autocast:
            recon, ids, vq = self.pixel(images, sem, q_sem, t.commit_weight)
            l1 = (recon.float() - images).abs().mean()
            perc = self.perceptual(recon, images) if self.perceptual is not None else torch.zeros((), device=self.device)
            g_adv = hinge_g_loss(self.disc(recon)) if gan_on else torch.zeros((), device=self.device)
        loss = t.l1_weight * l1 + t.codebook_weight * vq + t.perceptual_weight * perc + t.gan_weight * g_adv
        loss = loss + t.semantic_weight * sem_loss if self.joint else loss
        norm = self._step("pixel", loss, self.trained_params)
        metrics = {
            "loss": loss.item(),
            "l1_loss": l1.item(),
            "vq_loss": vq.item(),
            "perceptual_loss": perc.item(),
            "g_adv_loss": g_adv.item(),
            **({"semantic_loss": sem_loss.item()} if self.joint else {}),
            "grad_norm": norm,
            "train_psnr": float(psnr(recon.detach().float(), images)),
            "pix_codes_used": float(torch.unique(ids).numel()),
        }
        if gan_on:
            metrics["d_loss"] = self._disc_step(images, recon)
        return metrics

    @torch.no_grad()
    def evaluate(self, images: torch.Tensor) -> dict[str, float]:
        self.model.eval()
        recon = self._reconstruct(images)
        out = {"holdout_psnr": float(psnr(recon, images))}
        if self.teacher is not None:
            cosine, _ = distill_loss(self.model.semantic(images)[0], teacher_features(self.teacher, images, self.model.config.distill_layer))
            out["holdout_teacher_cosine"] = 1 - float(cosine)
        return out

    def _reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        sem = self.model.semantic_ids(images)
        q_pix, _, _ = self.model.pixel.quantize(images, sem)  # [B, N, d] ([B, N, 0] without pixel codes)
        return self.model.pixel.decode(self.model.semantic.codebook.lookup(sem), q_pix).float().clamp(-1, 1)

    @torch.no_grad()
    def picture(self, images: torch.Tensor):
        """inputs over their reconstructions"""
        self.model.eval()
        return reconstruction_grid([to_pil(x) for x in images.cpu()], [to_pil(y) for y in self._reconstruct(images).cpu()])


def stage_dirs(run_dir: str | Path, stage: int, train: TokenizerTrainConfig) -> tuple[Path, Path | None]:
    """(this run's output directory, the tokenizer stage 2 starts from) under <run_dir>/tokenizer."""
    root = Path(run_dir) / "tokenizer"
    if "/" in train.phase:
        raise ValueError(f"tokenizer_train.phase={train.phase!r}: a name, not a path")
    out = root / (f"stage{stage}_{train.phase}" if train.phase else f"stage{stage}")
    if stage == 1:
        return out, None
    init = train.init_from or "stage1"
    return out, (Path(init) if "/" in init else root / init / "final")


# Fields a continued stage-2 run may change: training-side settings and the pixel decoder side.
_CONTINUE_FREE = {"teacher", "siglip_config", "sem_ema_decay", "sem_dead_code_threshold", "sem_kmeans_iters",
                  *TokenizerConfig().decoder_fields()}


def continue_stage2(parent: SemHiTok, tok_cfg: TokenizerConfig, where: Path) -> SemHiTok:
    """A stage-2 tokenizer continued with every weight of `parent`; when tok_cfg's pixel decoder differs
    (size or fusion) the decoder side is new and the rest (semantic branch, pixel encoder, codebooks) kept."""
    cfg = dataclasses.replace(tok_cfg, siglip_config=parent.config.siglip_config)
    for f in dataclasses.fields(TokenizerConfig):
        old, new = getattr(parent.config, f.name), getattr(cfg, f.name)
        if f.name not in _CONTINUE_FREE and old != new:
            raise ValueError(f"{where} has tokenizer.{f.name}={old!r}, this run {new!r}: a continued stage 2 keeps "
                             "the semantic branch, pixel encoder and codebooks (only the pixel decoder may change)")
    if (parent.config.fusion == "semantic_only") != (cfg.fusion == "semantic_only"):
        raise ValueError(f"{where} has fusion={parent.config.fusion!r}: cannot continue it as {cfg.fusion!r} "
                         "(one has pixel codes, the other not)")
    model = SemHiTok(cfg)
    state = parent.state_dict()
    new_decoder = parent.config.decoder_fields() != cfg.decoder_fields()
    if new_decoder:
        side = tuple(f"pixel.{name}." for name in model.pixel.DECODER_SIDE)
        state = {k: v for k, v in state.items() if not k.startswith(side)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    expected_missing = [k for k in model.state_dict() if new_decoder and k.startswith(side)]
    if unexpected or sorted(missing) != sorted(expected_missing):
        raise ValueError(f"{where}: weights do not fit this tokenizer (missing {missing}, unexpected {unexpected})")
    model.trained_stages = list(parent.trained_stages)
    if new_decoder:
        log.info("stage 2 continues from %s with a new pixel decoder %s (was %s); everything else kept",
                 where, cfg.decoder_fields(), parent.config.decoder_fields())
    else:
        log.info("stage 2 continues from %s with every weight kept", where)
    return model


def build_task(stage: int, tok_cfg: TokenizerConfig, train: TokenizerTrainConfig, init_from: Path | None,
               device: torch.device, world: int) -> Task:
    torch.manual_seed(train.seed)  # identical initial weights on every rank
    if stage == 1:
        teacher = load_teacher(tok_cfg)
        return Stage1Task(SemHiTok.from_teacher(tok_cfg, teacher, train.student_from_teacher), teacher, train, device, world)
    if stage == 2:
        if init_from is None or not (init_from / "config.json").is_file():
            raise FileNotFoundError(f"stage 2 starts from a stage-1 or stage-2 tokenizer; none at {init_from} (run stage 1 first)")
        # The teacher first, right after seeding and from this run's config, as stage 1 did: a random (tiny)
        # teacher comes out the same.
        teacher = load_teacher(tok_cfg) if train.trains == "joint" or train.perceptual_network == "teacher" else None
        parent = SemHiTok.from_pretrained(init_from)
        if 1 not in parent.trained_stages:
            raise ValueError(f"{init_from} has trained stages {parent.trained_stages}; stage 1 is needed")
        torch.manual_seed(train.seed)
        if 2 in parent.trained_stages:
            model = continue_stage2(parent, tok_cfg, init_from)
        else:
            if train.trains == "decoder":
                raise ValueError(f"tokenizer_train.trains=decoder needs a stage-2 tokenizer to continue; {init_from} has stage 1 only")
            model = SemHiTok(dataclasses.replace(tok_cfg, siglip_config=parent.config.siglip_config))
            model.semantic.load_state_dict(parent.semantic.state_dict())
            model.trained_stages = [1]
        return Stage2Task(model, train, device, world, teacher)
    raise ValueError(f"tokenizer stage must be 1 or 2, got {stage}")


def train_tokenizer(tok_cfg: TokenizerConfig, train: TokenizerTrainConfig, out_dir: Path,
                    init_from: Path | None = None) -> SemHiTok:
    """Run (or resume) one stage; return the trained tokenizer, also saved to out_dir/final."""
    info = D.init_distributed()
    device = D.default_device(info.local_rank)
    task = build_task(train.stage, tok_cfg, train, init_from, device, info.world_size)
    return Trainer(task, train, out_dir, info).fit()


# -- the kind's entry points (tokenizer/kinds.py TRAINERS) ----------------------------------------------
def final_dir(cfg) -> Path:
    """The finished stage-2 tokenizer of a run config (semhitok.config.ProjectConfig), as later jobs consume it."""
    return Path(cfg.run_dir) / "tokenizer" / "stage2" / "final"


def check_resumes(cfg) -> None:
    """check_resume for each stage train_all would run (before a command records anything)."""
    for stage in (1, 2):
        out = Path(cfg.run_dir) / "tokenizer" / f"stage{stage}"
        if not (out / "final" / "config.json").is_file():
            check_resume(out, stage, dataclasses.asdict(cfg.tokenizer))


def train_all(cfg) -> Path:
    """Stage 1, then stage 2 from it, under <run_dir>/tokenizer/stage{1,2}; a finished stage is skipped."""
    for stage in (1, 2):
        out = Path(cfg.run_dir) / "tokenizer" / f"stage{stage}"
        if (out / "final" / "config.json").is_file():
            log.info("== tokenizer stage %d already finished at %s; skipping", stage, out / "final")
            continue
        log.info("== tokenizer stage %d -> %s", stage, out)
        train = dataclasses.replace(cfg.tokenizer_train, stage=stage)
        train_tokenizer(cfg.tokenizer, train, out, Path(cfg.run_dir) / "tokenizer" / "stage1" / "final")
    return final_dir(cfg)
