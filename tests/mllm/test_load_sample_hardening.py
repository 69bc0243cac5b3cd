"""Loading checks what it loads (tokenizer and MLLM directories, the decode CLI's ids); sampling rejects nonsense."""

import json
import math
import shutil

import numpy as np
import pytest
import torch

from semhitok.cli import main
from semhitok.common.config_io import ConfigError
from semhitok.mllm.model import SemHiTokLM
from semhitok.mllm.config import SamplingConfig
from semhitok.mllm.sample import load_sampler
from semhitok.tokenizer import SemHiTok


def edited_tokenizer(src, dst, **changes):
    shutil.copytree(src, dst)
    meta = json.loads((dst / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            meta.pop(key)
        else:
            meta[key] = value
    (dst / "config.json").write_text(json.dumps(meta))
    return dst


@pytest.mark.parametrize("changes, message", [
    (dict(trained_stages=None), "trained_stages"),
    (dict(trained_stages=["two"]), "trained_stages"),
    (dict(sem_codebook_size=128), "does not match"),
    (dict(sem_codebook_size=10**9), "does not match"),  # would allocate 64 GB for the codebook alone: checked first
    (dict(pix_encoder_width=-1), "pix_encoder_width"),
])
def test_tokenizer_directory_is_checked_before_allocating(trained_tokenizer, tmp_path, changes, message):
    path = edited_tokenizer(trained_tokenizer, tmp_path / "tok", **changes)
    with pytest.raises(ValueError, match=message) as err:
        SemHiTok.from_pretrained(path)
    assert "\n" not in str(err.value)


def test_truncated_tokenizer_weights_are_one_line(trained_tokenizer, tmp_path):
    path = edited_tokenizer(trained_tokenizer, tmp_path / "tok")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        SemHiTok.from_pretrained(path)


def test_mllm_directory_needs_its_own_text_tokenizer(tiny_mllm_dir, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bare = tmp_path / "bare"
    shutil.copytree(tiny_mllm_dir, bare)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (bare / name).unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError, match="no text tokenizer"):
        SemHiTokLM.from_pretrained(bare)
    # another tokenizer (no Qwen specials: they would land on other ids) in the directory
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(["a red bus on a street"] * 10, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=bpe).save_pretrained(bare)
    with pytest.raises(ValueError, match="does not match the saved layout"):
        SemHiTokLM.from_pretrained(bare)


@pytest.fixture(scope="module")
def sampler(tiny_mllm_dir):
    return load_sampler(tiny_mllm_dir, "cpu")


def test_sampling_refuses_nonsense_and_overlong_prompts(sampler):
    decoder, _ = sampler
    sampling = SamplingConfig(seed=1)
    sampling.cfg_scale = math.nan  # changed after it was built: checked again at the call
    with pytest.raises(ConfigError, match="cfg_scale"):
        decoder.image_ids(["a bus"], sampling)
    context = decoder.model.lm.config.max_position_embeddings
    with pytest.raises(ValueError, match="context"):
        decoder.image_ids(["bus " * context], SamplingConfig())
    with pytest.raises(ValueError, match="context"):
        decoder.answer([("user", "bus " * context)], None, SamplingConfig(temperature=0.0), max_new_tokens=4)
    empty, uncond = (decoder.image_ids([c], SamplingConfig(seed=2)) for c in ("", decoder.seq_cfg.uncond_prompt))
    assert torch.equal(empty, uncond)  # an empty prompt is the unconditional prompt


@pytest.mark.parametrize("flags, message", [
    (["--cfg-scale", "nan"], "cfg_scale"), (["--temperature", "-1"], "temperature"), (["--top-p", "inf"], "top_p"),
    (["--top-k", "-2"], "top_k"), (["--samples-per-prompt", "0"], "--samples-per-prompt"),
])
def test_sample_cli_errors_are_one_line(tiny_mllm_dir, tmp_path, capsys, flags, message):
    assert main(["sample", "--model", str(tiny_mllm_dir), "--prompt", "a bus", "--out", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("semhitok: error:") and message in err and "\n" not in err


def decode_cli(trained_tokenizer, tmp_path, **arrays):
    np.savez(tmp_path / "ids.npz", **arrays)
    return main(["tokenizer", "decode", "--model", str(trained_tokenizer), "--ids", str(tmp_path / "ids.npz"),
                 "--out", str(tmp_path / "out")])


def test_decode_cli_keeps_every_output_and_checks_ids(trained_tokenizer, tmp_path, capsys):
    grid = SemHiTok.from_pretrained(trained_tokenizer).grid
    ids = np.arange(3 * grid * grid, dtype=np.int32).reshape(3, grid, grid)
    assert decode_cli(trained_tokenizer, tmp_path, ids=ids, paths=np.array(["x/a.jpg", "y/a.jpg", "a_1.png"])) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "a_1.png", "a_1_1.png"]  # none overwritten
    for arrays, message in [(dict(ids=ids, paths=np.array(["a.jpg"])), "1 paths for 3"),
                            (dict(ids=np.array(5)), "integer array"), (dict(ids=ids.astype(np.float32)), "integer array")]:
        assert decode_cli(trained_tokenizer, tmp_path, **arrays) == 2
        assert message in capsys.readouterr().err
