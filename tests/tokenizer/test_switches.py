"""SemHiTok's open choices as switches (issue 24): each changes what it says and nothing by default."""

import pytest
import torch

from semhitok.common.config_io import ConfigError
from semhitok.tokenizer import SemHiTok
from semhitok.tokenizer.siglip import load_teacher, teacher_features
from semhitok.tokenizer.semhitok.train import build_task
from semhitok.tokenizer.vit import pixel_geometry
from tests.conftest import tiny_config


def images(n: int = 4, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("mode", ["trained", "frozen"])
def test_stage1_semantic_encoder_frozen_or_trained(tmp_path, mode):
    cfg = tiny_config(tmp_path, f"tokenizer_train.semantic_encoder={mode}", "tokenizer_train.warmup_steps=1")
    task = build_task(1, cfg.tokenizer, cfg.tokenizer_train, None, torch.device("cpu"), world=1)
    enc = task.model.semantic.encoder
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    code_before = task.model.semantic.to_code.weight.clone()
    x = images()
    for step in range(3):
        task.train_step(x, step)
    changed = [k for k, v in enc.state_dict().items() if not torch.equal(v, before[k])]
    assert (not changed) == (mode == "frozen"), changed[:3]
    assert not torch.equal(task.model.semantic.to_code.weight, code_before)  # the rest of the branch learns anyway
    teacher = task.teacher.state_dict()
    if mode == "frozen":  # still the teacher's copy (eq. 1's frozen E_sem)
        assert all(torch.equal(v, teacher[k]) for k, v in enc.state_dict().items())


def test_frozen_random_encoder_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="frozen random encoder"):
        tiny_config(tmp_path, "tokenizer_train.semantic_encoder=frozen", "tokenizer_train.student_from_teacher=false")


def test_distill_layer_picks_the_teacher_features(tmp_path):
    cfg = tiny_config(tmp_path)
    torch.manual_seed(0)
    teacher = load_teacher(cfg.tokenizer)
    x = images(2)
    out = teacher(pixel_values=x, output_hidden_states=True)
    torch.testing.assert_close(teacher_features(teacher, x), out.last_hidden_state)  # after the final LayerNorm
    torch.testing.assert_close(teacher_features(teacher, x, "penultimate"), out.hidden_states[-2])
    assert not torch.allclose(out.last_hidden_state, out.hidden_states[-2])
    # stage 1 distils the chosen layer: its loss at step 0 is measured against that target
    losses = {}
    for layer in ("last", "penultimate"):
        cfg = tiny_config(tmp_path / layer, f"tokenizer.distill_layer={layer}")
        task = build_task(1, cfg.tokenizer, cfg.tokenizer_train, None, torch.device("cpu"), world=1)
        assert task.model.config.distill_layer == layer
        losses[layer] = task.evaluate(x)["holdout_teacher_cosine"]
        pred, target = task.model.semantic_alignment(x)
        torch.testing.assert_close(target, teacher_features(task.teacher, x, layer).float())
    assert losses["last"] != losses["penultimate"]


def test_pixel_patch_switch_tokenflow_geometry(tmp_path):
    assert pixel_geometry(384, 27) == (15, 405) and pixel_geometry(384, 27, 16) == (16, 432)  # ours / TokenFlow's
    cfg = tiny_config(tmp_path, "tokenizer.pix_patch=10")  # tiny: 8 px patches on 64 px by default
    torch.manual_seed(0)
    model = SemHiTok.from_teacher(cfg.tokenizer, load_teacher(cfg.tokenizer))
    assert (model.pixel.patch, model.pixel.canvas) == (10, 80)
    assert model.pixel.patch_embed.in_features == 10 * 10 * 3
    model.trained_stages = [1, 2]
    model.train()
    model.semantic.codebook(model.semantic.code_features(images())[0])  # initialise the semantic codebook
    ids = model.eval().encode(images(2))
    assert ids.shape == (2, 8, 8) and model.decode(ids).shape == (2, 3, 64, 64)  # resized back to the image
    default = SemHiTok(cfg.tokenizer.__class__(**{**cfg.tokenizer.__dict__, "pix_patch": 0,
                                                   "siglip_config": model.config.siglip_config}))
    assert (default.pixel.patch, default.pixel.canvas) == (8, 64)
