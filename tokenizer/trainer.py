"""The training loop every tokenizer kind uses (SemHiTok's stages in train.py, dualtoken/train.py,
toklip/train.py): a Trainer owns data order, checkpoints (exact resume), logging, holdout evaluation and
pictures; a Task owns its modules, optimizers and the loss of one step.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from semhitok.common import dist as D
from semhitok.common.io import atomic_dir, intact_dirs, read_json, write_json, write_manifest
from semhitok.common.metrics_log import MetricLogger
from semhitok.common.run_dir import refuse_other_config
from semhitok.common.safe_load import UnsafeCheckpoint, load_state
from semhitok.tokenizer.config import TokenizerTrainConfig
from semhitok.tokenizer.data import ImageDataset, collate_images
from semhitok.tokenizer.losses import hinge_d_loss

log = logging.getLogger("semhitok")


def warmup_cosine(warmup: int, total: int, min_ratio: float):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, DDP) else module


class Task:
    """What differs between stages. Subclasses set model, optimizers, schedulers, extra_modules."""

    model: nn.Module  # a VisualTokenizer (interface.py) with trained_stages and save_pretrained
    optimizers: dict[str, torch.optim.Optimizer]
    extra_modules: dict[str, nn.Module]  # trained modules saved beside the tokenizer (the discriminator)
    needs_index = False  # True: train_step(images, step, index [B]) also gets the batch's dataset indices

    def __init__(self, train: TokenizerTrainConfig, device: torch.device):
        self.train_cfg, self.device = train, device
        self.run_info: dict[str, str] = {}  # what actually ran, recorded in run_config.json and checkpoints
        bf16 = train.precision == "bf16" or (train.precision == "auto" and device.type == "cuda")
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    def _optimizer(self, params, lr: float) -> torch.optim.Optimizer:
        params = [p for p in params if p.requires_grad]
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=self.train_cfg.weight_decay)

    def _schedulers(self, total_steps: dict[str, int]) -> dict[str, torch.optim.lr_scheduler.LambdaLR]:
        """Warmup + cosine per optimizer over the steps it actually takes."""
        t = self.train_cfg
        return {
            name: torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(t.warmup_steps, total_steps[name], t.min_lr_ratio))
            for name, opt in self.optimizers.items()
        }

    def _step(self, name: str, loss: torch.Tensor, params) -> float:
        opt = self.optimizers[name]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(list(params), self.train_cfg.grad_clip)
        opt.step()
        self.schedulers[name].step()
        return float(norm)

    def _disc_step(self, images: torch.Tensor, recon: torch.Tensor) -> float:
        """One hinge step of self.disc (optimizer "disc") on real images vs detached reconstructions; its loss."""
        with self.autocast:
            d_loss = hinge_d_loss(self.disc(images), self.disc(recon.detach()))
        self._step("disc", d_loss, self.disc.parameters())
        return d_loss.item()


def rank_batches(dataset: ImageDataset, batch_size: int, seed: int, rank: int, world: int, start_step: int):
    """Deterministic batches for this rank from `start_step` on: epoch e is permutation(seed + e) split into
    disjoint per-rank slices, so resuming at step s reproduces exactly what an uninterrupted run would see."""
    per_step = batch_size * world
    steps_per_epoch = len(dataset) // per_step
    if steps_per_epoch == 0:
        raise ValueError(f"{len(dataset)} images is less than one global batch ({batch_size} x {world} ranks)")
    epoch, offset = divmod(start_step, steps_per_epoch)
    while True:
        perm = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed + epoch))
        mine = perm[: steps_per_epoch * per_step][rank::world].view(steps_per_epoch, batch_size).tolist()
        dataset.epoch = epoch
        yield from mine[offset:]
        epoch, offset = epoch + 1, 0


def checkpoint_dirs(ckpt_dir: Path) -> list[Path]:
    """step_<n> directories, oldest first (names that are not step_<number> are ignored)"""
    found = [p for p in Path(ckpt_dir).glob("step_*") if p.name.split("_", 1)[1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("_", 1)[1]))


def check_resume(out_dir: Path, stage: int, tokenizer: dict) -> None:
    """Refuse (ValueError, one line) to train into out_dir when its newest intact checkpoint was written for another
    stage or tokenizer config (`tokenizer`: the config as a dict; the teacher's derived siglip_config is not compared):
    its states would not load, and starting from step 0 instead would delete it (keep_checkpoints). The CLI calls this
    before it records anything, the trainer again before it loads."""
    for path, _ in intact_dirs(reversed(checkpoint_dirs(Path(out_dir) / "checkpoints")), []):
        meta = read_json(path / "meta.json") if (path / "meta.json").is_file() else {}
        saved = {k: v for k, v in (meta.get("tokenizer") or {}).items() if k != "siglip_config"}
        now = {k: v for k, v in tokenizer.items() if k in saved}
        refuse_other_config(path, {"stage": meta.get("stage", stage), "tokenizer": saved}, {"stage": stage, "tokenizer": now},
                            "another folder")
        return  # the newest intact one decides (an older one is only read when it is damaged)


class Trainer:
    def __init__(self, task: Task, train: TokenizerTrainConfig, out_dir: Path, dist_info: D.DistInfo):
        self.task, self.cfg, self.out, self.dist = task, train, Path(out_dir), dist_info
        self.ckpt_dir = self.out / "checkpoints"
        size = task.model.image_size
        self.dataset = ImageDataset(train.train_data, size, random_flip=train.random_flip, seed=train.seed)
        holdout = ImageDataset(train.holdout_data, size)
        items = [holdout[i] for i in range(min(train.holdout_images, len(holdout)))]
        batch = collate_images(items)
        if batch is None:
            raise ValueError(f"no readable holdout images in {train.holdout_data}")
        self.holdout = batch[0].to(task.device)

    # -- checkpoints ---------------------------------------------------------------------------
    def _checkpoints(self) -> list[Path]:
        return checkpoint_dirs(self.ckpt_dir)

    def save_checkpoint(self, step: int) -> None:
        if self.dist.is_main:
            with atomic_dir(self.ckpt_dir / f"step_{step:08d}") as tmp:
                state = {k: v.detach().contiguous().cpu() for k, v in self.task.model.state_dict().items()}
                save_file(state, str(tmp / "model.safetensors"))
                for name, module in self.task.extra_modules.items():
                    save_file({k: v.contiguous().cpu() for k, v in module.state_dict().items()}, str(tmp / f"{name}.safetensors"))
                torch.save(
                    {
                        "optimizers": {k: o.state_dict() for k, o in self.task.optimizers.items()},
                        "schedulers": {k: s.state_dict() for k, s in self.task.schedulers.items()},
                        "torch_rng": torch.get_rng_state(),
                        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                    },
                    tmp / "train_state.pt",
                )
                write_json(tmp / "meta.json", {"step": step, "stage": self.task.stage, "tokenizer": dataclasses.asdict(self.task.model.config), **self.task.run_info})
                write_manifest(tmp, {"step": step})  # last: the completion marker resume verifies
            for old in self._checkpoints()[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(old)
        D.barrier()

    def maybe_resume(self) -> int:
        """Load the newest intact checkpoint, if any; return the number of steps already done.

        A checkpoint is trusted only when its completion marker (written last) lists files that all match;
        a damaged one (missing files, truncated, garbage, unloadable) is skipped with a warning and the next
        older one is tried. With none intact the run starts from step 0, with a warning naming them. A state
        asking to unpickle anything but tensors and containers is no damage: UnsafeCheckpoint stops the job, and
        one written for another stage or tokenizer config is refused (check_resume)."""
        check_resume(self.out, self.task.stage, dataclasses.asdict(self.task.model.config))
        skipped: list[str] = []
        for path, manifest in intact_dirs(reversed(self._checkpoints()), skipped):
            try:
                self._load_checkpoint(path)
            except UnsafeCheckpoint:  # not damage: a state asking to run code stops the job
                raise
            except Exception as err:  # verified sizes, but the content does not load: try an older one
                skipped.append(f"{path.name}: does not load ({type(err).__name__}: {str(err)[:200]})")
                continue
            step = int(manifest["step"])
            if skipped:
                log.warning("skipped damaged checkpoint(s): %s", "; ".join(skipped))
            log.info("resumed from %s (step %d)", path, step)
            return step
        if skipped:
            log.warning("no intact checkpoint in %s (%s): starting from step 0", self.ckpt_dir, "; ".join(skipped))
        return 0

    def _load_checkpoint(self, path: Path) -> None:
        model_state = load_file(str(path / "model.safetensors"))
        extra_states = {name: load_file(str(path / f"{name}.safetensors")) for name in self.task.extra_modules}
        state = load_state(path / "train_state.pt")  # tensors and containers only: nothing in it runs
        self.task.model.load_state_dict(model_state)
        for name, module in self.task.extra_modules.items():
            module.load_state_dict(extra_states[name])
        for k, opt in self.task.optimizers.items():
            opt.load_state_dict(state["optimizers"][k])
        for k, sched in self.task.schedulers.items():
            sched.load_state_dict(state["schedulers"][k])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"]:
            torch.cuda.set_rng_state_all(state["cuda_rng"])

    # -- the loop ------------------------------------------------------------------------------
    def fit(self) -> nn.Module:
        cfg, task, main = self.cfg, self.task, self.dist.is_main
        start = self.maybe_resume()
        run_config = {"stage": task.stage, "train": dataclasses.asdict(cfg), "tokenizer": dataclasses.asdict(task.model.config), **task.run_info}
        if main:
            write_json(self.out / "run_config.json", run_config)
        logger = MetricLogger(self.out, cfg.log_backends, run_config, enabled=main, resume_step=start)
        batches = rank_batches(self.dataset, cfg.batch_size, cfg.seed, self.dist.rank, self.dist.world_size, start)
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=_Resumable(batches), collate_fn=collate_images,
            num_workers=cfg.num_workers, persistent_workers=False,
        )
        bar = tqdm(total=cfg.max_steps, initial=start, disable=not main, desc=f"tokenizer stage {task.stage}",
                   mininterval=1.0 if sys.stderr.isatty() else 30.0, dynamic_ncols=True)
        if main and start == 0:
            logger.log(0, task.evaluate(self.holdout))  # the baseline the holdout metrics improve on
        step = start
        for batch in loader:
            if step >= cfg.max_steps:
                break
            if batch is None:
                log.warning("step %d: every image of the batch was unreadable; step skipped", step)
                step += 1
                continue
            extra = (batch[1],) if task.needs_index else ()  # the dataset indices (TokLIP looks up captions)
            metrics = task.train_step(batch[0].to(task.device, non_blocking=True), step, *extra)
            step += 1
            if not all(math.isfinite(v) for v in metrics.values()):
                raise FloatingPointError(f"non-finite metric at step {step}: {metrics}")
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                metrics["lr"] = next(iter(task.optimizers.values())).param_groups[0]["lr"]
                logger.log(step, metrics)
            if main and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                evals = task.evaluate(self.holdout)
                logger.log(step, evals)
                bar.write(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in evals.items()))
            if main and (step % cfg.image_every == 0 or step == cfg.max_steps):
                (self.out / "images").mkdir(parents=True, exist_ok=True)
                task.picture(self.holdout).save(self.out / "images" / f"step_{step:08d}.png")
            if step % cfg.ckpt_every == 0 and step < cfg.max_steps:
                self.save_checkpoint(step)
        bar.close()
        logger.close()
        task.model.trained_stages = sorted(set(task.model.trained_stages) | {task.stage})
        if main:
            task.model.save_pretrained(self.out / "final")
        D.barrier()
        return task.model


class _Resumable(torch.utils.data.Sampler):
    """Wraps the (infinite) batch generator so DataLoader can take it as a batch_sampler."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return self.batches
