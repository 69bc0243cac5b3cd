"""Issue 26, class 4's model directories and class 2's refused resumes: a damaged export is one line naming the file
and field; a resume the newest checkpoint cannot serve is refused before the run's records are touched."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from semhitok.cli import main
from semhitok.common.io import write_manifest
from semhitok.common.run_dir import record_run
from semhitok.config import load_project_config
from semhitok.mllm.config import MLLMConfig
from semhitok.mllm.model import SemHiTokLM, load_base_lm
from semhitok.mllm.train import resume_identity


def edit_meta(**changes):
    def edit(d):
        meta = json.loads((d / "semhitok_mllm.json").read_text())
        meta.update(changes)
        (d / "semhitok_mllm.json").write_text(json.dumps(meta))
    return edit


def truncate(table):
    def edit(d):
        state = load_file(str(d / "adapter.safetensors"))
        state[table] = state[table][:1].clone()
        save_file(state, str(d / "adapter.safetensors"))
    return edit


@pytest.mark.parametrize("edit, file, message", [
    (edit_meta(layout="qwen2"), "semhitok_mllm.json", "bad layout"),
    (edit_meta(codes_per_group="x"), "semhitok_mllm.json", "codes_per_group must be an integer >= 1"),
    (edit_meta(adapter_hidden="x"), "semhitok_mllm.json", "adapter_hidden must be an integer >= 0"),
    (truncate("sem_codes"), "adapter.safetensors", "code tables sem_codes \\[1, "),  # loaded before: silently wrong
    (truncate("pix_codes"), "adapter.safetensors", "pix_codes \\[1, "),
])
def test_a_damaged_model_directory_is_one_line_naming_the_file(tiny_mllm_dir, tmp_path, edit, file, message):
    d = tmp_path / "model"
    shutil.copytree(tiny_mllm_dir, d)
    edit(d)
    with pytest.raises(ValueError, match=message) as err:
        SemHiTokLM.from_pretrained(d)
    assert str(d / file) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("layers", [-1, 0])
def test_a_random_base_config_needs_layers(layers):
    cfg = MLLMConfig(base_model="random", base_config={"model_type": "qwen2", "vocab_size": 64, "hidden_size": 32,
                                                       "intermediate_size": 64, "num_hidden_layers": layers,
                                                       "num_attention_heads": 2, "num_key_value_heads": 1})
    with pytest.raises(ValueError, match=f"mllm.base_config: num_hidden_layers must be an integer >= 1, got {layers}"):
        load_base_lm(cfg, torch.float32)


@pytest.mark.parametrize("saved, overrides, message", [
    ({"world_size": 2}, [], "world_size 2 -> 1"),  # an older marker: the world size only
    (None, ["mllm.adapter_hidden=8"], "mllm.adapter_hidden 0 -> 8"),
    (None, ["data.mixture=[{source: coco_captions, task: generation}]"], "mixture_components"),
])
def test_a_refused_mllm_resume_leaves_the_records_byte_identical(tmp_path, capsys, saved, overrides, message):
    run = tmp_path / "run"
    cfg = load_project_config("tiny", [f"run_dir={run}"])
    step = cfg.mllm_dir / "checkpoints" / "step00000002"
    step.mkdir(parents=True)
    (step / "mp_rank_00_model_states.pt").write_bytes(b"x")
    write_manifest(step, {"step": 2, "world_size": 1, **({"world_size": 2} if saved else {}),
                          "resume": saved or resume_identity(cfg, 1)})
    record_run(cfg.mllm_dir, cfg, "mllm-train")
    records = {n: (cfg.mllm_dir / n).read_bytes() for n in ("config.yaml", "run.json", "runs.jsonl")}
    capsys.readouterr()
    assert main(["train", "--config", "tiny", f"run_dir={run}", *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "written by another configuration" in err and message in err
    assert {n: (cfg.mllm_dir / n).read_bytes() for n in records} == records
