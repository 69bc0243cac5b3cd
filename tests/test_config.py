import subprocess
import sys

import pytest

from semhitok.common.config_io import ConfigError
from semhitok.config import load_project_config


def test_presets_load_and_differ():
    tiny, p256, p384 = (load_project_config(n) for n in ("tiny", "256", "384"))
    assert tiny.tokenizer.teacher == "random" and tiny.tokenizer.siglip_config["image_size"] == 64
    assert p256.tokenizer.teacher == "google/siglip-large-patch16-256"
    assert p384.tokenizer.teacher == "google/siglip-so400m-patch14-384"
    # defaults come from the dataclasses: the paper's K and m unless a preset says otherwise
    assert p256.tokenizer.sem_codebook_size == 16384 and p256.tokenizer.pix_codes_per_group == 12
    assert p256.tokenizer.vocab_size == 196_608


def test_overrides_are_typed_and_nested():
    cfg = load_project_config("tiny", ["tokenizer_train.lr=3e-4", "tokenizer.pix_codes_per_group=16",
                                       "tokenizer_train.log_backends=[jsonl,tensorboard]"])
    assert cfg.tokenizer_train.lr == pytest.approx(3e-4)
    assert cfg.tokenizer.pix_codes_per_group == 16
    assert cfg.tokenizer_train.log_backends == ["jsonl", "tensorboard"]
    cfg = load_project_config("tiny", ["mllm_train.task_loss_weights={understanding: 10}"])
    assert cfg.mllm_train.task_loss_weights == {"understanding": 10}


@pytest.mark.parametrize(
    "override, message",
    [
        ("tokenizer_train.lerning_rate=1", "lerning_rate"),
        ("tokenizer.fusion=sideways", "sideways"),
        ("tokenizer_train.max_steps=lots", "max_steps"),
        ("no_equals_sign", "key.sub=value"),
        ("mllm_train.task_loss_weights={understnding: 2}", "unknown task 'understnding'"),
        ("mllm_train.task_loss_weights={text: -1}", "task_loss_weights.text"),
    ],
)
def test_bad_overrides_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        load_project_config("tiny", [override])


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ConfigError, match="tiny"):
        load_project_config("huge")


CONFIG_MODULES = ("semhitok.config", "semhitok.eval.config", "semhitok.mllm.config", "semhitok.tokenizer.config",
                  "semhitok.data_pipelines.config")


def test_configs_import_and_load_no_torch(tmp_path):
    """The configs are plain data: importing each module, loading every preset and `semhitok config` (the launch
    scripts' check before queueing: 0.16 CPU-s, 4.9 while the CLI imported the trainer) load no torch."""
    code = "; ".join([f"import sys, {', '.join(CONFIG_MODULES)}",
                      "from semhitok.common.config_io import list_presets", "from semhitok.config import load_project_config",
                      "[load_project_config(p) for p in list_presets()]",
                      "from semhitok.cli import main", "assert main(['config', '--config', 'tiny']) == 0",
                      "assert 'torch' not in sys.modules, 'torch imported'"])
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=False)
    assert run.returncode == 0, f"the configs load torch (find the chain: python -X importtime -c '{code}')\n{run.stderr}"
