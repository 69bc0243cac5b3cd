"""Stage 0, the SigLIP teacher trained on the shapes world: Hub layout, the sigmoid loss, retrieval above chance,
skip on rerun, and the saved directory as the teacher of every tokenizer kind through its real training path."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import SiglipModel

from semhitok.common.config_io import ConfigError
from semhitok.data_pipelines.world import WorldConfig, write_world
from semhitok.tokenizer.config import TeacherTrainConfig, TokenizerConfig
from semhitok.tokenizer.interface import load_visual_tokenizer
from semhitok.tokenizer.kinds import kind_trainer
from semhitok.tokenizer.semhitok.model import SemHiTok
from semhitok.tokenizer.siglip import load_complete, load_teacher
from semhitok.tokenizer.teacher import build_teacher, load_pairs, retrieval_accuracy, sigmoid_loss, train_teacher
from semhitok.tokenizer.text import BYTE_BOS, BYTE_EOS, BYTE_PAD, byte_caption_ids
from tests.conftest import tiny_config

QUICK = dict(steps=6, batch_size=16, warmup=2, lr=2e-3)


def teacher_config(world, **kw) -> TeacherTrainConfig:
    return TeacherTrainConfig(train_data=[str(world / "train.jsonl")], holdout_data=[str(world / "holdout.jsonl")], **kw)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_world(WorldConfig(train_scenes=64, holdout_scenes=16, text_rows=10), tmp_path_factory.mktemp("w") / "world")


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    """(the directory of a teacher trained for a few steps, its config, train_teacher's result)"""
    out = tmp_path_factory.mktemp("t") / "teacher"
    cfg = teacher_config(world, **QUICK)
    return out, cfg, train_teacher(cfg, out)


def test_byte_caption_ids_and_toklip_share_them():
    from semhitok.tokenizer.toklip import train as toklip_train
    from semhitok.tokenizer.toklip.config import TokLIPConfig

    ids = byte_caption_ids(["ab", "abcdefgh"], 6)
    assert ids.dtype == torch.long and ids.tolist() == [[BYTE_BOS, 97, 98, BYTE_EOS, BYTE_PAD, BYTE_PAD],
                                                        [BYTE_BOS, 97, 98, 99, 100, BYTE_EOS]]  # truncated, EOS kept
    toklip = toklip_train.CaptionTokenizer(TokLIPConfig(teacher="random", vision_config={}, text_config={},
                                                        text_tokenizer="bytes", text_max_length=6))
    assert torch.equal(toklip(["ab", "abcdefgh"]), ids)
    assert toklip_train.byte_caption_ids is byte_caption_ids and not hasattr(toklip_train, "BYTE_PAD")  # one copy


def test_config_checks():
    with pytest.raises(ConfigError, match="projection_size"):
        TeacherTrainConfig(text_config={**TeacherTrainConfig().text_config, "projection_size": 64})
    with pytest.raises(ConfigError, match="vocab_size"):
        TeacherTrainConfig(text_config={**TeacherTrainConfig().text_config, "vocab_size": 256})
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        TeacherTrainConfig(text_max_length=80)
    with pytest.raises(ConfigError, match="batch_size"):
        TeacherTrainConfig(batch_size=1)


def test_sigmoid_loss_is_siglips_with_the_identity_as_positives():
    torch.manual_seed(0)
    model = build_teacher(TeacherTrainConfig())
    ids, images = byte_caption_ids(["a red circle", "a blue square", "two shapes"], 72), torch.rand(3, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=images, return_loss=True)
        assert torch.allclose(sigmoid_loss(out.logits_per_text, torch.eye(3, dtype=torch.bool)), out.loss)
    assert model.logit_scale.exp().item() == pytest.approx(10.0) and model.logit_bias.item() == -5.0


def test_saved_in_the_hub_layout_and_reloads_as_siglip(trained):
    out, cfg, result = trained
    meta = json.loads((out / "config.json").read_text())
    assert meta["model_type"] == "siglip" and meta["vision_config"]["hidden_size"] == 96
    assert meta["text_config"]["vocab_size"] == 259 and meta["text_config"]["projection_size"] == 96
    model = load_complete(SiglipModel, str(out), "teacher").eval()  # every key present, none mis-shaped
    saved = json.loads((out / "teacher_eval.json").read_text())
    assert saved == result and json.loads((out / "teacher_train.json").read_text()) == dataclasses.asdict(cfg)
    assert result["pairs"] == 16 and result["chance"] == 1 / 16 and result["chance"] <= result["chance_text"] <= 1
    assert result["train_loss"] < result["initial_train_loss"]
    # the reloaded model scores what the trained one scored: the evaluation is of the saved weights
    images, index, captions = load_pairs(cfg.holdout_data, 64)
    again = retrieval_accuracy(model, images[index], captions, cfg.text_max_length)
    assert again["image_to_caption"] == result["image_to_caption"] and again["caption_to_image"] == result["caption_to_image"]


def test_rerun_skips_and_another_config_is_refused(trained, caplog):
    out, cfg, result = trained
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    with caplog.at_level("INFO", logger="semhitok"):
        assert train_teacher(cfg, out) == result
    assert "already trained" in caplog.text and (out / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="another config"):
        train_teacher(dataclasses.replace(cfg, steps=7), out)


def test_loads_as_the_semhitok_teacher(trained):
    out = trained[0]
    cfg = TokenizerConfig(teacher=str(out), sem_codebook_size=16, sem_code_dim=8, pix_encoder_width=32, pix_encoder_heads=2,
                          pix_encoder_layers=1, pix_decoder_width=32, pix_decoder_heads=2, pix_decoder_layers=1)
    teacher = load_teacher(cfg)
    saved = load_file(str(out / "model.safetensors"))
    want = {k.removeprefix("vision_model."): v for k, v in saved.items()
            if k.startswith("vision_model.") and not k.startswith("vision_model.head.")}
    got = teacher.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], v) for k, v in want.items())
    model = SemHiTok.from_teacher(cfg, teacher)
    assert model.grid == 8 and model.config.siglip_config["hidden_size"] == 96


@pytest.mark.parametrize("kind", ["semhitok", "dualtoken", "toklip"])
def test_every_tokenizer_kind_trains_from_it(trained, tmp_path, kind):
    """Each kind's real trainer (the pipeline's entry point) with its teacher option pointing at the directory."""
    out = trained[0]
    over = {
        "semhitok": [f"tokenizer.teacher={out}", "tokenizer_train.max_steps=2", "tokenizer_train.batch_size=2"],
        "dualtoken": [f"dualtoken.teacher={out}", "tokenizer_train.max_steps=2", "tokenizer_train.batch_size=2",
                      "tokenizer_train.perceptual=none", "dualtoken.sem_codebook_size=32", "dualtoken.pix_codebook_size=32"],
        # the byte tokenizer padded to the length the teacher's text tower was trained with (its pooled position)
        "toklip": [f"toklip.teacher={out}", "toklip.text_tokenizer=bytes", f"toklip.text_max_length={trained[1].text_max_length}",
                   "toklip.vqgan_steps=1", "toklip.encoder_steps=2", "tokenizer_train.batch_size=2"],
    }[kind]
    cfg = tiny_config(tmp_path, f"tokenizer.kind={kind}", *over)
    train, _ = kind_trainer(kind)
    tok = load_visual_tokenizer(train(cfg))
    vision = json.loads((out / "config.json").read_text())["vision_config"]
    recorded = tok.config.vision_config if kind == "toklip" else tok.config.siglip_config
    assert {k: recorded[k] for k in ("hidden_size", "num_hidden_layers", "image_size", "patch_size")} == \
           {k: vision[k] for k in ("hidden_size", "num_hidden_layers", "image_size", "patch_size")}
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    pred, target = tok.semantic_alignment(images)  # reads the teacher (SemHiTok: reloaded from the directory)
    assert pred.shape == target.shape and torch.isfinite(target).all()


# The teacher's held-out retrieval after a short schedule: tests/test_learning.py, on the teacher its run trains.
