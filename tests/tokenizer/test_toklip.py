"""TokLIP: VQ invariants, the causal token encoder, what trains, losses falling, save/load, the two-stage trainer."""

import json

import pytest
import torch
import torch.nn.functional as F

from semhitok.tokenizer.data import ImageDataset, collate_images
from semhitok.tokenizer.interface import VisualTokenizer, load_visual_tokenizer, positions_and_codes
from semhitok.tokenizer.quantizers import l2norm
from semhitok.tokenizer.toklip.model import TokLIP, load_siglip
from semhitok.tokenizer.toklip.train import EncoderTask, VQGANTask, final_dir, info_nce, stage_train, train, vqgan_dir
from semhitok.tokenizer.toklip.vqgan import VQGAN, VectorQuantizer
from tests.conftest import SAMPLE, tiny_config


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return tiny_config(tmp_path_factory.mktemp("toklip"), "tokenizer_train.batch_size=4")


@pytest.fixture(scope="module")
def siglip(cfg):
    torch.manual_seed(0)
    return load_siglip(cfg.toklip)


@pytest.fixture(scope="module")
def batch(cfg):
    """4 sample photos [4, 3, 64, 64] and their dataset indices"""
    data = ImageDataset([SAMPLE / "train.jsonl"], cfg.toklip.vqgan.image_size)
    return collate_images([data[i] for i in range(4)])


def toklip(cfg, siglip) -> TokLIP:
    torch.manual_seed(1)
    return TokLIP.from_teacher(cfg.toklip, VQGAN(cfg.toklip.vqgan), siglip).eval()


def test_vq_nearest_code_straight_through_and_range():
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 4)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    q, ids, codebook_loss, commit_loss = vq(z)
    flat = l2norm(z.detach().permute(0, 2, 3, 1).reshape(-1, 4))
    # nearest by Euclidean distance between unit vectors, computed independently
    assert torch.equal(ids.flatten(), torch.cdist(flat, l2norm(vq.embedding.detach())).argmin(dim=1))
    assert ids.shape == (2, 3, 3) and ids.min() >= 0 and ids.max() < 16
    assert torch.allclose(q.permute(0, 2, 3, 1).reshape(-1, 4), vq.codes()[ids.flatten()])  # forward value: the codes
    # straight-through: z's gradient is exactly that of l2norm(z) with the same upstream gradient
    w = torch.randn_like(q)
    (q * w).sum().backward()
    z2 = z.detach().clone().requires_grad_(True)
    (l2norm(z2.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) * w).sum().backward()
    assert torch.allclose(z.grad, z2.grad, atol=1e-6)
    assert vq.embedding.grad is None  # the codebook learns from the codebook loss only
    codebook_loss.backward()
    assert vq.embedding.grad is not None and vq.embedding.grad.abs().sum() > 0
    assert torch.isclose(codebook_loss, commit_loss)  # same distance, gradients to different sides


def test_contract_shapes_and_decode_checks(cfg, siglip, batch):
    model = toklip(cfg, siglip)
    assert isinstance(model, VisualTokenizer) and model.kind == "toklip"
    assert model.code_vocab_sizes == (256,) and model.code_groups == (1,) and positions_and_codes(model) == (64, 1)
    ids = model.encode(batch[0])
    assert ids.shape == (4, 8, 8) and ids.dtype == torch.int64 and 0 <= ids.min() and ids.max() < 256
    images = model.decode(ids)
    assert images.shape == (4, 3, 64, 64) and images.min() >= -1 and images.max() <= 1
    with pytest.raises(ValueError, match="must lie in"):
        model.decode(ids + 256)
    pred, target = model.semantic_alignment(batch[0])
    assert pred.shape == target.shape == (4, 1, 96)


def test_token_encoder_is_causal(cfg, siglip, batch):
    model = toklip(cfg, siglip)
    feats = model.input_features()
    assert not feats.per_id and feats.splits == (96,) and not any(p.requires_grad for p in feats.parameters())
    ids = model.encode(batch[0]).flatten(1)[..., None]  # [4, 64, 1]
    t = 20
    changed = ids.clone()
    changed[:, t + 1 :] = (changed[:, t + 1 :] + 7) % 256
    a, b = feats(ids), feats(changed)
    assert a.shape == (4, 64, 96)
    assert torch.equal(a[:, : t + 1], b[:, : t + 1])  # positions <= t never see what follows
    assert (a[:, t + 1 :] - b[:, t + 1 :]).abs().amax(-1).min() > 1e-4  # every later position does
    assert torch.allclose(a, model.features(ids[..., 0])[0], atol=1e-6)  # the copy computes the model's features
    assert torch.allclose(feats(ids[:, : t + 1]), a[:, : t + 1], atol=1e-5)  # a partial image (while generated)
    model.encoder.causal = False  # bidirectional: earlier positions would change, so the mask is what holds them
    assert not torch.allclose(model.features(ids[..., 0])[0][:, :t], model.features(changed[..., 0])[0][:, :t])


def test_only_mlp_and_token_encoder_train_and_losses_fall(cfg, siglip, batch):
    model = toklip(cfg, siglip)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(("encoder.", "head."))}
    text_before = {k: v.clone() for k, v in siglip.text_model.state_dict().items()}
    task = EncoderTask(model, siglip.text_model, stage_train(cfg, 2), torch.device("cpu"), 1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith(("encoder.", "head."))}
    assert any(n.startswith("encoder.mlp.") for n in trainable) and any(n.startswith("encoder.encoder.") for n in trainable)
    assert not any(p.requires_grad for p in siglip.text_model.parameters())
    losses = [task.train_step(batch[0], step, batch[1])["loss"] for step in range(6)]
    assert losses[-1] < losses[0], losses
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items())  # VQGAN and teacher untouched
    assert all(torch.equal(siglip.text_model.state_dict()[k], v) for k, v in text_before.items())


def test_info_nce_prefers_matching_pairs():
    z = F.normalize(torch.randn(6, 16), dim=-1)
    assert info_nce(z, z, 0.07) < 0.01 < info_nce(z, z.roll(1, 0), 0.07)


def test_vqgan_steps_lower_the_loss(cfg, siglip, batch):
    torch.manual_seed(0)
    train_cfg = stage_train(cfg, 1)
    train_cfg.disc_start = 3  # the GAN terms run too
    task = VQGANTask(VQGAN(cfg.toklip.vqgan), siglip.vision_model, train_cfg, torch.device("cpu"), 1)
    images = batch[0][:2]  # two photos: the PatchGAN dominates the step's time
    metrics = [task.train_step(images, step) for step in range(5)]
    assert "d_loss" in metrics[-1] and "d_loss" not in metrics[0]
    assert metrics[-1]["l1_loss"] < metrics[0]["l1_loss"], [m["l1_loss"] for m in metrics]
    assert metrics[-1]["commit_loss"] > 0


def test_save_load_round_trip(cfg, siglip, batch, tmp_path):
    model = toklip(cfg, siglip)
    model.save_pretrained(tmp_path / "tok")
    meta = json.loads((tmp_path / "tok" / "config.json").read_text())
    assert meta["model_type"] == "toklip" and meta["trained_stages"] == [1]
    loaded = load_visual_tokenizer(tmp_path / "tok")
    assert isinstance(loaded, TokLIP)
    ids = model.encode(batch[0])
    assert torch.equal(loaded.encode(batch[0]), ids)
    n = ids.flatten(1)[..., None]
    assert torch.equal(loaded.input_features()(n), model.input_features()(n))
    assert torch.equal(loaded.decode(ids), model.decode(ids))
    meta["vqgan"]["code_dim"] = 16  # config and weights disagree: a one-line error, nothing loaded
    (tmp_path / "tok" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="does not match"):
        TokLIP.from_pretrained(tmp_path / "tok")


def test_train_runs_both_stages_and_skips_finished_ones(tmp_path, caplog):
    cfg = tiny_config(tmp_path, "tokenizer_train.batch_size=4", "toklip.vqgan_steps=2", "toklip.encoder_steps=2")
    out = train(cfg)
    assert out == final_dir(cfg) and (vqgan_dir(cfg) / "config.json").is_file()
    tok = load_visual_tokenizer(out)
    assert tok.trained_stages == [1, 2]
    assert torch.equal(tok.vqgan.quantizer.embedding, VQGAN.from_pretrained(vqgan_dir(cfg)).quantizer.embedding)
    rows = [json.loads(line) for line in (out.parent / "metrics.jsonl").read_text().splitlines()]
    assert any("contrast_loss" in r and "distill_loss" in r for r in rows)
    caplog.clear()
    assert train(cfg) == out
    assert "stage 1 already finished" in caplog.text and "stage 2 already finished" in caplog.text


def test_encoder_stage_from_a_vqgan_dir_resumes_exactly(tmp_path, caplog):
    """toklip.vqgan_dir skips stage 1; a run resumed from a step-2 checkpoint ends bit-identical to one that was not."""
    import shutil

    from safetensors.torch import load_file

    torch.manual_seed(0)
    vq = VQGAN(tiny_config(tmp_path).toklip.vqgan)
    vq.trained_stages = [1]
    vq.save_pretrained(tmp_path / "vq")
    over = ["tokenizer_train.batch_size=4", "toklip.encoder_steps=3", "tokenizer_train.ckpt_every=1",
            f"toklip.vqgan_dir={tmp_path / 'vq'}"]
    straight = tiny_config(tmp_path / "a", *over)
    out = train(straight)
    assert not (tmp_path / "a" / "tokenizer" / "toklip_vqgan").exists()  # stage 1 skipped
    resumed = tiny_config(tmp_path / "b", *over)
    ckpts = final_dir(resumed).parent / "checkpoints"
    shutil.copytree(final_dir(straight).parent / "checkpoints" / "step_00000002", ckpts / "step_00000002")
    caplog.clear()
    out_b = train(resumed)
    assert "(step 2)" in caplog.text  # it resumed rather than starting over
    a, b = load_file(str(out / "model.safetensors")), load_file(str(out_b / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], load_file(str(ckpts / "step_00000002" / "model.safetensors"))[k]) for k in a)


def test_paper_384_shapes_on_the_meta_device():
    """configs/384.yaml: LlamaGen-sized VQ-16 (16,384 x 8 codes, 24x24 ids) under a so400m-wide token encoder
    (SigLIP2 so400m/16-384's vision config, depth cut to 1: no download)."""
    import dataclasses

    from semhitok.config import load_project_config

    so400m = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=1, num_attention_heads=16,
                  image_size=384, patch_size=16)
    cfg = dataclasses.replace(load_project_config("384").toklip, vision_config=so400m, text_config={})
    with torch.device("meta"):
        model = TokLIP(cfg)
    assert model.grid == 24 and model.code_vocab_sizes == (16384,)
    assert model.vqgan.quantizer.embedding.shape == (16384, 8)
    assert model.encoder.pos.shape == (1, 576, 1152)  # the teacher's 24x24 positions, no interpolation needed
    assert [m.weight.shape for m in model.encoder.mlp if hasattr(m, "weight")] == [(4608, 8), (1152, 4608)]
    assert 60e6 < sum(p.numel() for p in model.vqgan.parameters()) < 75e6  # LlamaGen's VQ-16: ~72M
