import logging
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"
SHARED_DATA = REPO.parent / "shared" / "data"

torch.set_num_threads(2)


def tiny_config(run_dir: Path, *overrides: str):
    """The tiny preset writing under run_dir, quiet and quick; more overrides as key=value."""
    from semhitok.config import load_project_config

    base = [
        f"run_dir={run_dir}",
        f"tokenizer_train.train_data=[{SAMPLE / 'train.jsonl'}]",
        f"tokenizer_train.holdout_data=[{SAMPLE / 'holdout.jsonl'}]",
        "tokenizer_train.log_every=1",
        "tokenizer_train.eval_every=1000",
        "tokenizer_train.image_every=1000",
        "tokenizer_train.ckpt_every=1000",
        "tokenizer_train.holdout_images=4",
    ]
    return load_project_config("tiny", base + list(overrides))


@pytest.fixture(scope="session")
def trained_tokenizer(tmp_path_factory) -> Path:
    """A tiny tokenizer trained briefly through both stages on the shipped photos; its final directory."""
    from semhitok.tokenizer.train import train_tokenizer

    cfg = tiny_config(tmp_path_factory.mktemp("tok"), "tokenizer_train.max_steps=15", "tokenizer_train.disc_start=10")
    for stage in (1, 2):
        cfg.tokenizer_train.stage = stage
        train_tokenizer(cfg.tokenizer, cfg.tokenizer_train, cfg.tokenizer_stage_dir(stage), cfg.tokenizer_stage_dir(1) / "final")
    return cfg.tokenizer_dir


@pytest.fixture(autouse=True)
def _quiet_semhitok_logs(caplog):
    caplog.set_level(logging.INFO, logger="semhitok")
