"""The tokenizer trainer's resume never runs code from a checkpoint: a pickled payload planted in a real
checkpoint's train_state.pt (completion marker rewritten to match) stops the job with one line naming the file,
instead of being skipped as damage, and the payload does not run."""

import pytest
import torch

from semhitok.common import dist as D
from semhitok.common.safe_load import UnsafeCheckpoint
from semhitok.tokenizer.semhitok.train import build_task, train_tokenizer
from semhitok.tokenizer.trainer import Trainer
from tests.conftest import tiny_config
from tests.mllm.test_resume_safety import plant


def test_the_tokenizer_trainer_refuses_a_planted_payload_instead_of_falling_back(tmp_path):
    overrides = ["tokenizer_train.max_steps=3", "tokenizer_train.batch_size=2", "tokenizer_train.ckpt_every=1",
                 "tokenizer_train.keep_checkpoints=2"]
    cfg = tiny_config(tmp_path, *overrides)
    stage_dir = tmp_path / "tokenizer" / "stage1"
    train_tokenizer(cfg.tokenizer, cfg.tokenizer_train, stage_dir)
    marker = tmp_path / "payload_ran"
    victim = stage_dir / "checkpoints" / "step_00000002" / "train_state.pt"
    plant(victim, marker)
    task = build_task(1, cfg.tokenizer, cfg.tokenizer_train, None, torch.device("cpu"), world=1)
    trainer = Trainer(task, cfg.tokenizer_train, stage_dir, D.DistInfo(0, 1, 0))
    with pytest.raises(UnsafeCheckpoint, match=rf"^{victim}: refused to load: it needs posix.system"):
        trainer.maybe_resume()
    assert not marker.exists()
