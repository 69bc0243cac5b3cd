"""Run by test_ddp under torchrun: stage 1 then 2 in 2 processes (gloo), then check the replicas agree."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.conftest import tiny_config  # noqa: E402
from semhitok.tokenizer.semhitok.train import train_tokenizer  # noqa: E402

# k-means waits for 1500 features: 2 ranks x 8 images x 64 patches = 1024 a step, so it pools steps 1 and 2
cfg = tiny_config(Path(sys.argv[1]), "tokenizer_train.max_steps=4", "tokenizer_train.batch_size=8", "tokenizer_train.disc_start=2",
                  "tokenizer.sem_kmeans_features=1500")
for stage in (1, 2):
    cfg.tokenizer_train.stage = stage
    model = train_tokenizer(cfg.tokenizer, cfg.tokenizer_train, cfg.tokenizer_stage_dir(stage), cfg.tokenizer_stage_dir(1) / "final")
    for name, tensor in model.state_dict().items():
        theirs = tensor.clone()
        dist.broadcast(theirs, src=0)
        assert torch.equal(theirs, tensor), f"rank {dist.get_rank()}: {name} differs from rank 0 after stage {stage}"
    assert bool(model.semantic.codebook.initialized)
print(f"rank {dist.get_rank()} ok")
dist.destroy_process_group()
