"""TokLIP: VQ invariants, the causal token encoder, the MLLM's concatenated inputs, what trains, the repo's
contrastive set-up (gathered batch, learned capped logit scale, normalised x1000 distillation, canonical captions),
losses falling, save/load, the two-stage trainer."""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from semhitok.tokenizer.data import ImageDataset, collate_images
from semhitok.tokenizer.interface import VisualTokenizer, load_visual_tokenizer, positions_and_codes
from semhitok.tokenizer.quantizers import l2norm
from semhitok.tokenizer.text import byte_caption_ids
from semhitok.tokenizer.toklip.model import TokLIP, load_siglip
from semhitok.tokenizer.toklip.train import (CaptionTokenizer, EncoderTask, VQGANTask, canonicalize, final_dir,
                                             gather_with_local_grad, info_nce, stage_train, toklip_losses, train, vqgan_dir)
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
    assert not feats.per_id and feats.splits == (96, 8) and not any(p.requires_grad for p in feats.parameters())
    ids = model.encode(batch[0]).flatten(1)[..., None]  # [4, 64, 1]
    t = 20
    changed = ids.clone()
    changed[:, t + 1 :] = (changed[:, t + 1 :] + 7) % 256
    both = feats(ids)
    assert both.shape == (4, 64, 96 + 8)
    assert torch.equal(both[..., 96:], model.vqgan.quantizer.codes()[ids[..., 0]])  # the concatenated code vectors
    a, b = both[..., :96], feats(changed)[..., :96]
    assert torch.equal(a[:, : t + 1], b[:, : t + 1])  # positions <= t never see what follows
    assert (a[:, t + 1 :] - b[:, t + 1 :]).abs().amax(-1).min() > 1e-4  # every later position does
    assert torch.allclose(a, model.features(ids[..., 0])[0], atol=1e-6)  # the copy computes the model's features
    assert torch.allclose(feats(ids[:, : t + 1])[..., :96], a[:, : t + 1], atol=1e-5)  # a partial image (while generated)
    model.encoder.causal = False  # bidirectional: earlier positions would change, so the mask is what holds them
    assert not torch.allclose(model.features(ids[..., 0])[0][:, :t], model.features(changed[..., 0])[0][:, :t])


@torch.no_grad()
def test_generation_is_fed_the_concatenated_features_and_vqgan_is_the_baseline_switch(cfg, siglip, text_tokenizer):
    """The paper's Table 7 fusion: while the MLLM draws an image, each step's input is [encoder feature of the
    image so far | VQ code vector] through one adapter MLP each; llm_inputs=vqgan feeds the code vector alone."""
    from semhitok.mllm.config import MLLMConfig
    from semhitok.mllm.model import SemHiTokLM
    from semhitok.mllm.config import SamplingConfig
    from semhitok.mllm.sample import Decoder
    from tests.conftest import TINY_QWEN

    model = toklip(cfg, siglip)
    codes = model.vqgan.quantizer.codes()
    lm = SemHiTokLM.build(MLLMConfig(base_model="random", base_config=TINY_QWEN), model, text_tokenizer).eval()
    adapter = lm.adapter
    assert adapter.mlp_names == ("encoder", "code")
    assert (adapter.encoder_mlp[0].in_features, adapter.code_mlp[0].in_features) == (96, 8)
    seen = []
    hook = adapter.features.register_forward_hook(lambda m, args, out: seen.append((args[0].clone(), out.clone())))
    drawn = Decoder(lm, text_tokenizer).image_ids(["a red cube", "two dogs"], SamplingConfig(seed=0))
    hook.remove()
    assert drawn.shape == (2, 8, 8) and len(seen) >= 63  # a call per step after the first token
    prefix, fed = seen[-1]  # the image so far, for the conditional and then the unconditional row of each caption
    n = prefix.shape[1]
    assert n >= 63 and fed.shape == (4, n, 96 + 8)
    assert torch.equal(prefix[:2, :, 0], drawn.flatten(1)[:, :n])
    assert torch.equal(fed[..., 96:], codes[prefix[..., 0]])  # the code half: the VQ code vectors of the ids
    torch.testing.assert_close(fed[..., :96], model.features(prefix[..., 0])[0])  # the encoder half: causal features
    row = torch.cat([torch.tensor([5, 6]), drawn[0].flatten() + lm.layout.visual_offset])[None]
    whole = adapter.features(drawn[:1].flatten(1)[..., None])[0]
    want = torch.cat([adapter.encoder_mlp(whole[:, :96]), adapter.code_mlp(whole[:, 96:])], dim=-1)
    torch.testing.assert_close(lm.embed(row)[0, 2:], want)  # the MLLM's input embedding of the drawn image

    plain = TokLIP.from_teacher(dataclasses.replace(cfg.toklip, llm_inputs="vqgan"), model.vqgan, siglip)
    feats = plain.input_features()
    assert feats.per_id and feats.splits == (8,) and torch.equal(feats.table(), codes)
    lm = SemHiTokLM.build(MLLMConfig(base_model="random", base_config=TINY_QWEN), plain, text_tokenizer)
    assert lm.adapter.mlp_names == ("code",)
    ids = drawn[0].flatten()
    torch.testing.assert_close(lm.embed((ids + lm.layout.visual_offset)[None])[0], lm.adapter.code_mlp(codes[ids]))


def test_only_mlp_and_token_encoder_train_and_losses_fall(cfg, siglip, batch):
    model = toklip(cfg, siglip)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(("encoder.", "head.", "logit_scale"))}
    text_before = {k: v.clone() for k, v in siglip.text_model.state_dict().items()}
    task = EncoderTask(model, siglip.text_model, stage_train(cfg, 2), torch.device("cpu"), 1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith(("encoder.", "head."))} | {"logit_scale"}
    assert any(n.startswith("encoder.mlp.") for n in trainable) and any(n.startswith("encoder.encoder.") for n in trainable)
    assert not any(p.requires_grad for p in siglip.text_model.parameters())
    metrics = [task.train_step(batch[0], step, batch[1]) for step in range(6)]
    losses = [m["loss"] for m in metrics]
    assert losses[-1] < losses[0], losses
    assert all(m["loss"] == pytest.approx(m["contrast_loss"] + 1000 * m["distill_loss"], rel=1e-5) for m in metrics)
    assert metrics[0]["logit_scale"] != metrics[-1]["logit_scale"]  # learned
    wd = {id(p): g["weight_decay"] for g in task.optimizers["encoder"].param_groups for p in g["params"]}
    assert wd[id(model.logit_scale)] == 0 and wd[id(model.encoder.mlp[0].bias)] == 0 and wd[id(model.encoder.mlp[0].weight)] == 0.1
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items())  # VQGAN and teacher untouched
    assert all(torch.equal(siglip.text_model.state_dict()[k], v) for k, v in text_before.items())


def test_info_nce_prefers_matching_pairs():
    z = F.normalize(torch.randn(6, 16), dim=-1)
    assert info_nce(z, z, 1 / 0.07) < 0.01 < info_nce(z, z.roll(1, 0), 1 / 0.07)


def test_logit_scale_starts_at_1_over_0_07_and_is_capped_at_100(cfg, siglip, batch):
    model = toklip(cfg, siglip)
    assert model.logit_scale.exp().item() == pytest.approx(1 / 0.07)
    task = EncoderTask(model, siglip.text_model, stage_train(cfg, 2), torch.device("cpu"), 1)
    with torch.no_grad():  # as if steps had pushed it past the cap: the step after clamps it (log space, to ln 100)
        model.logit_scale.fill_(math.log(150.0))
    assert task.train_step(batch[0], 5, batch[1])["logit_scale"] == pytest.approx(100.0)
    assert model.logit_scale.exp().item() == pytest.approx(100.0)


def test_distillation_compares_normalised_features():
    torch.manual_seed(0)
    z, z_text, z_img = torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8)
    scale = torch.tensor(math.log(10.0))
    contrast, distill = toklip_losses(z, z_text, z_img, scale)
    assert distill == pytest.approx(F.mse_loss(F.normalize(z, dim=-1), F.normalize(z_img, dim=-1)).item())
    again = toklip_losses(5 * z, 3 * z_text, 0.1 * z_img, scale)  # scale-free in every feature
    assert torch.allclose(again[0], contrast) and torch.allclose(again[1], distill)
    assert torch.allclose(contrast, info_nce(z, z_text, 10.0))


def _gather_worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)  # the same global batch on every rank; each keeps its own rows
    z, z_text, z_img = torch.randn(8, 6), torch.randn(8, 6), torch.randn(8, 6)
    mine = slice(4 * rank, 4 * rank + 4)
    local = z[mine].clone().requires_grad_(True)
    contrast, _ = toklip_losses(local, z_text[mine], z_img[mine], torch.tensor(math.log(20.0)))
    contrast.backward()
    torch.save({"loss": contrast.detach(), "grad": local.grad}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_contrast_gathers_every_rank_with_gradient_to_the_local_rows(tmp_path):
    """2 gloo processes with 4 pairs each compute the InfoNCE of all 8 pairs, and each rank's gradient is that of
    its own rows in the 8-pair loss; on one process the gather is the identity."""
    import torch.multiprocessing as mp

    x = torch.randn(3, 2, requires_grad=True)
    assert gather_with_local_grad(x) is x
    mp.start_processes(_gather_worker, args=(2, f"file://{tmp_path / 'rendezvous'}", str(tmp_path)), nprocs=2,
                       start_method="spawn")
    torch.manual_seed(0)
    z, z_text, z_img = torch.randn(8, 6), torch.randn(8, 6), torch.randn(8, 6)
    z.requires_grad_(True)
    whole, _ = toklip_losses(z, z_text, z_img, torch.tensor(math.log(20.0)))
    whole.backward()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got["loss"], whole.detach())
        torch.testing.assert_close(got["grad"], z.grad[4 * rank : 4 * rank + 4])
    alone, _ = toklip_losses(z[:4], z_text[:4], z_img[:4], torch.tensor(math.log(20.0)))
    assert not torch.isclose(alone, whole)  # the 8-pair loss is not a per-rank loss


def test_captions_are_canonicalised_for_the_siglip2_text_tower(cfg):
    assert canonicalize("  A_Red  Cube, on the TABLE!\n") == "a red cube on the table"
    assert canonicalize("it's 3.5\tcm") == "its 35 cm"
    raw = ["A Red Cube.", "two_dogs"]
    canonical = dataclasses.replace(cfg.toklip, caption_clean="canonicalize")
    assert torch.equal(CaptionTokenizer(canonical)(raw), byte_caption_ids(["a red cube", "two dogs"], cfg.toklip.text_max_length))
    # auto: our byte-level stage-0 teachers learn raw captions, so they get them raw
    assert cfg.toklip.caption_clean == "auto"
    assert torch.equal(CaptionTokenizer(cfg.toklip)(raw), byte_caption_ids(raw, cfg.toklip.text_max_length))


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
    """toklip.vqgan_pretrained=<a VQGAN dir> skips stage 1; a run resumed from a step-2 checkpoint ends
    bit-identical to one that was not."""
    import shutil

    from safetensors.torch import load_file

    torch.manual_seed(0)
    vq = VQGAN(tiny_config(tmp_path).toklip.vqgan)
    vq.trained_stages = [1]
    vq.save_pretrained(tmp_path / "vq")
    over = ["tokenizer_train.batch_size=4", "toklip.encoder_steps=3", "tokenizer_train.ckpt_every=1",
            f"toklip.vqgan_pretrained={tmp_path / 'vq'}"]
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
    """configs/384.yaml: LlamaGen's VQ-16 (16,384 x 8 codes, 24x24 ids) under a so400m-wide token encoder
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
    assert round(sum(p.numel() for p in model.vqgan.parameters()) / 1e5) == 719  # LlamaGen's VQ-16: 71.9M


def test_a_toklip_tokenizer_pushes_to_the_hub_with_its_card(cfg, siglip, monkeypatch):
    """push_to_hub (the kinds' mixin), against a recording HfApi."""
    import huggingface_hub

    from tests.test_hf_artifacts import RecordingApi

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    RecordingApi.calls = []
    assert toklip(cfg, siglip).push_to_hub("org/toklip") == "https://hub.test/org/toklip/commit/1"
    (_, _, _), (_, repo, files, card, _) = RecordingApi.calls
    assert repo == "org/toklip" and {"config.json", "README.md"} <= set(files)
    assert "# TokLIP image tokenizer" in card and 'load_tokenizer("org/toklip")' in card
