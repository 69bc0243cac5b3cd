import dataclasses

import pytest
import torch

from tests.conftest import SAMPLE, tiny_config
from semhitok.tokenizer import SemHiTok, WeightsUnavailable, list_images, load_rgb, preprocess
from semhitok.tokenizer.model import load_teacher


def sample_images(n: int, size: int) -> torch.Tensor:
    paths = list_images([SAMPLE / "holdout.jsonl"])[:n]
    return preprocess([load_rgb(p) for p in paths], size)


def test_encode_ids_in_range_and_split_roundtrip(trained_tokenizer):
    model = SemHiTok.from_pretrained(trained_tokenizer)
    images = sample_images(4, model.image_size)
    ids = model.encode(images)
    cfg = model.config
    assert ids.shape == (4, model.grid, model.grid) and ids.dtype == torch.int64
    assert ids.min() >= 0 and ids.max() < cfg.sem_codebook_size * cfg.pix_codes_per_group
    sem, pix = model.split_ids(ids)
    assert torch.equal(sem, model.semantic_ids(images).view_as(sem))
    assert pix.max() < cfg.pix_codes_per_group
    assert torch.equal(model.join_ids(sem, pix), ids)
    out = model.decode(ids)
    assert out.shape == images.shape and out.min() >= -1 and out.max() <= 1


def test_save_load_roundtrip_is_identical(trained_tokenizer, tmp_path):
    model = SemHiTok.from_pretrained(trained_tokenizer)
    images = sample_images(4, model.image_size)
    model.save_pretrained(tmp_path / "copy")
    again = SemHiTok.from_pretrained(tmp_path / "copy")
    assert again.trained_stages == [1, 2]
    assert again.config == model.config
    ids = model.encode(images)
    assert torch.equal(again.encode(images), ids)
    assert torch.equal(again.decode(ids), model.decode(ids))
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


def test_decode_rejects_bad_ids(trained_tokenizer):
    model = SemHiTok.from_pretrained(trained_tokenizer)
    g = model.grid
    with pytest.raises(ValueError, match="visual ids must lie"):
        model.decode(torch.full((1, g, g), model.vocab_size))
    with pytest.raises(ValueError, match=r"ids must be \[B"):
        model.decode(torch.zeros(1, g + 1, g, dtype=torch.long))


def test_stage1_only_tokenizer_refuses_to_encode(tmp_path):
    cfg = tiny_config(tmp_path)
    model = SemHiTok.from_teacher(cfg.tokenizer, load_teacher(cfg.tokenizer))
    model.trained_stages = [1]
    with pytest.raises(RuntimeError, match="stage 2 is needed"):
        model.encode(torch.zeros(1, 3, model.image_size, model.image_size))


@pytest.mark.parametrize("fusion", ["concat", "pixel_only", "length"])
@pytest.mark.parametrize("m", [8, 16])
def test_fusion_variants_and_group_sizes(tmp_path, fusion, m):
    cfg = tiny_config(tmp_path, f"tokenizer.fusion={fusion}", f"tokenizer.pix_codes_per_group={m}")
    model = SemHiTok.from_teacher(cfg.tokenizer, load_teacher(cfg.tokenizer))
    model.trained_stages = [1, 2]
    images = torch.rand(2, 3, model.image_size, model.image_size) * 2 - 1
    ids = model.encode(images)
    assert ids.max() < 256 * m
    assert model.decode(ids).shape == images.shape
    # the decoder sees the semantic codes in concat/length fusion, not in pixel_only ("w/o sem")
    n = model.grid * model.grid
    q_pix = torch.randn(2, n, cfg.tokenizer.pix_code_dim)
    q_sem = torch.randn(2, n, cfg.tokenizer.sem_code_dim)
    with torch.no_grad():
        changed = not torch.allclose(model.pixel.decode(q_sem, q_pix), model.pixel.decode(-q_sem, q_pix))
    assert changed == (fusion != "pixel_only")


def test_student_starts_as_a_copy_of_the_teacher(tmp_path):
    cfg = tiny_config(tmp_path)
    teacher = load_teacher(cfg.tokenizer)
    model = SemHiTok.from_teacher(cfg.tokenizer, teacher)
    for k, v in teacher.state_dict().items():
        assert torch.equal(model.semantic.encoder.state_dict()[k], v)
    assert model.config.siglip_config["hidden_size"] == 96


def test_offline_teacher_fails_with_one_clear_line(tmp_path):
    cfg = dataclasses.replace(tiny_config(tmp_path).tokenizer, teacher="google/siglip-large-patch16-256")
    with pytest.raises(WeightsUnavailable) as err:
        load_teacher(cfg)
    message = str(err.value)
    assert "\n" not in message and "hf download google/siglip-large-patch16-256" in message


def test_from_pretrained_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        SemHiTok.from_pretrained(tmp_path)
