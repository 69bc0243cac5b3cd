"""tokenizer.teacher=<dir> with the layout of the real google/siglip-* checkpoints."""

import dataclasses

import pytest
import torch
from safetensors.torch import load_file, save_file

from semhitok.config import load_project_config
from semhitok.tokenizer import SemHiTok
from semhitok.tokenizer.siglip import load_teacher
from tests.tokenizer.siglip_dirs import VISION, siglip_model_dir


def small_pixel_branch(teacher: str):
    """The tiny preset's pixel branch and codebook sizes with a real teacher directory."""
    return dataclasses.replace(load_project_config("tiny").tokenizer, teacher=teacher, siglip_config=None)


@pytest.mark.parametrize("name", list(VISION))
def test_every_vision_weight_of_a_siglip_model_dir_is_loaded(tmp_path, name):
    saved = siglip_model_dir(name, tmp_path / "siglip")
    cfg = small_pixel_branch(str(tmp_path / "siglip"))
    teacher = load_teacher(cfg)
    assert teacher.config.image_size == VISION[name]["image_size"] and teacher.config.hidden_size == VISION[name]["hidden_size"]
    expected = {k.removeprefix("vision_model."): v for k, v in saved.state_dict().items()
                if k.startswith("vision_model.") and not k.startswith("vision_model.head.")}
    got = teacher.state_dict()
    assert set(got) == set(expected)  # nothing extra that could have stayed random
    for k, v in expected.items():
        assert torch.equal(got[k], v), k
    assert not any(p.requires_grad for p in teacher.parameters())
    # the student starts as this teacher, and the tokenizer records its real geometry
    model = SemHiTok.from_teacher(cfg, teacher)
    for k, v in expected.items():
        assert torch.equal(model.semantic.encoder.state_dict()[k], v), k
    assert model.grid == VISION[name]["image_size"] // VISION[name]["patch_size"]  # 16 or 27


def test_a_dir_with_missing_vision_weights_is_one_clear_error(tmp_path):
    name = "google/siglip-so400m-patch14-384"
    siglip_model_dir(name, tmp_path / "siglip")
    weights = tmp_path / "siglip" / "model.safetensors"
    state = load_file(str(weights))
    del state["vision_model.encoder.layers.0.mlp.fc1.weight"]
    save_file(state, str(weights), metadata={"format": "pt"})
    cfg = small_pixel_branch(str(tmp_path / "siglip"))
    with pytest.raises(ValueError, match="1 vision weights missing") as err:
        load_teacher(cfg)
    assert "\n" not in str(err.value) and "encoder.layers.0.mlp.fc1.weight" in str(err.value)
