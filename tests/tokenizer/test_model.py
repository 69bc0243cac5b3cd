import dataclasses

import pytest
import torch

from tests.conftest import SAMPLE, tiny_config
from semhitok.tokenizer import SemHiTok, WeightsUnavailable, list_images, load_rgb, preprocess
from semhitok.tokenizer.siglip import load_teacher


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


@pytest.mark.parametrize("fusion", ["concat", "pixel_only", "shared"])
def test_a_shared_pixel_codebook_ignores_the_semantic_id(tmp_path, fusion):
    """concat and pixel_only: the id is semantic * m + pixel (the patch's own sub-codebook); pix_codebook=shared:
    the nearest of all K * m codes, whatever the semantic id, and the LLM's features carry no semantic code."""
    from semhitok.common.config_io import ConfigError
    from semhitok.tokenizer.quantizers import l2norm

    with pytest.raises(ConfigError, match="pix_codebook: 'shared' ids carry no semantic id"):
        tiny_config(tmp_path, "tokenizer.pix_codebook=shared")
    cfg = tiny_config(tmp_path, *(["tokenizer.fusion=pixel_only", "tokenizer.pix_codebook=shared"] if fusion == "shared"
                                  else [f"tokenizer.fusion={fusion}"]))
    model = SemHiTok.from_teacher(cfg.tokenizer, load_teacher(cfg.tokenizer)).eval()
    model.trained_stages = [1, 2]
    images = torch.rand(2, 3, model.image_size, model.image_size) * 2 - 1
    sem = model.semantic_ids(images)
    with torch.no_grad():
        q, ids, _ = model.pixel.quantize(images, sem)
        _, ids_other_sem, _ = model.pixel.quantize(images, (sem + 1) % cfg.tokenizer.sem_codebook_size)
    flat = l2norm(model.pixel.codebook.codes.detach().flatten(0, 1))  # [K*m, d]
    assert torch.allclose(q, flat[ids], atol=1e-5) and torch.equal(model.encode(images).flatten(1), ids)
    assert torch.equal(ids, ids_other_sem) == (fusion == "shared")
    if fusion != "shared":
        assert torch.equal(ids // model.codes_per_group, sem)
    sem_codes, _ = model.code_features()
    assert (sem_codes.abs().sum() == 0) == (fusion == "shared")


@pytest.mark.parametrize("codebook", ["hierarchical", "shared"])
def test_the_exported_encoder_gives_semhitoks_ids(tmp_path, codebook):
    """The transformers-only encoder shipped in exports (mllm/hf_remote) finds the same ids, a shared codebook included."""
    import json

    from semhitok.mllm.hf_remote.processing_semhitok import VisualEncoder

    cfg = tiny_config(tmp_path, "tokenizer.fusion=pixel_only", f"tokenizer.pix_codebook={codebook}")
    model = SemHiTok.from_teacher(cfg.tokenizer, load_teacher(cfg.tokenizer)).eval()
    model.trained_stages = [1, 2]
    model.save_pretrained(tmp_path / "tok")
    encoder = VisualEncoder(json.loads((tmp_path / "tok" / "config.json").read_text())).load(str(tmp_path / "tok" / "model.safetensors"))
    images = torch.rand(2, 3, model.image_size, model.image_size) * 2 - 1
    assert torch.equal(encoder(images), model.encode(images).flatten(1))
