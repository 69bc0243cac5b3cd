"""LLaVA/HF-style DeepSpeed JSONs ("auto" everywhere) are resolved from the training config and train."""

import json

import pytest

from semhitok.config import load_project_config
from semhitok.mllm.ds_config import load_deepspeed_config
from tests.conftest import run_train

# LLaVA's scripts/zero3.json, plus the optimizer/scheduler sections HF Trainer examples carry
LLAVA_ZERO3 = {
    "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16, "hysteresis": 2, "min_loss_scale": 1},
    "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto", "warmup_num_steps": "auto"}},
    "train_micro_batch_size_per_gpu": "auto",
    "train_batch_size": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True, "sub_group_size": 1e9,
                          "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                          "stage3_param_persistence_threshold": "auto", "stage3_max_live_parameters": 1e9,
                          "stage3_max_reuse_distance": 1e9, "stage3_gather_16bit_weights_on_model_save": True},
}


def _has_auto(node) -> bool:
    if isinstance(node, dict):
        return any(_has_auto(v) for v in node.values())
    return node == "auto"


def test_auto_values_come_from_the_training_config(tmp_path):
    path = tmp_path / "zero3.json"
    path.write_text(json.dumps(LLAVA_ZERO3))
    cfg = load_project_config("tiny", ["data.micro_batch_size=3", "mllm_train.gradient_accumulation=4", "mllm_train.grad_clip=0.5"])
    ds = load_deepspeed_config(path, cfg, bf16=True, world_size=2, hidden_size=64)
    assert not _has_auto(ds)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (3, 4, 24)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"] == {"enabled": True} and ds["fp16"]["enabled"] is False
    assert ds["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 640
    assert "optimizer" not in ds and "scheduler" not in ds  # the trainer's own AdamW and schedule are used
    path.write_text(json.dumps({"zero_optimization": {"stage": 2, "round_robin_gradients": "auto"}}))
    with pytest.raises(ValueError, match=r'cannot resolve "auto" at zero_optimization.round_robin_gradients'):
        load_deepspeed_config(path, cfg, bf16=False)


def test_training_runs_with_a_llava_style_zero3_json(trained_tokenizer, pretokenized_sample, tmp_path):
    path = tmp_path / "zero3.json"
    path.write_text(json.dumps(LLAVA_ZERO3))
    run_train(tmp_path / "run", trained_tokenizer, pretokenized_sample, f"mllm_train.deepspeed_config={path}",
              "mllm_train.max_steps=2", "mllm_train.gradient_accumulation=2")
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "mllm" / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 2 and (tmp_path / "run" / "mllm" / "final" / "semhitok_mllm.json").is_file()
    info = json.loads((tmp_path / "run" / "mllm" / "run.json").read_text())  # `semhitok train` records its run
    assert info["job"] == "mllm-train" and f"mllm_train.deepspeed_config={path}" in info["overrides"]
