"""DualToken: residual quantization invariants, the VisualTokenizer contract at tiny scale and at SigLIP
so400m/14-384's real vision config (depth cut), save/load, and its training task."""

import importlib
import json
import shutil

import pytest
import torch
import torch.nn as nn

from semhitok.tokenizer.dualtoken.config import DualTokenConfig
from semhitok.tokenizer.dualtoken.model import DualToken
from semhitok.tokenizer.dualtoken.quantizer import ResidualVQ
from semhitok.tokenizer.interface import VisualTokenizer, load_visual_tokenizer
from semhitok.tokenizer.kinds import TRAINERS, tokenizer_class
from semhitok.tokenizer.siglip import load_teacher
from tests.conftest import tiny_config as conftest_tiny_config
from tests.tokenizer.siglip_dirs import vision_config

TINY_SIGLIP = dict(hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
                   image_size=64, patch_size=8)
SMALL = dict(pixel_layer=1, semantic_layer=2, depth=8, sem_codebook_size=32, sem_code_dim=8, pix_codebook_size=32,
             pix_code_dim=8, decoder_width=32, decoder_heads=2, decoder_layers=1)


def clusters(n: int = 512, dim: int = 8, seed: int = 0) -> torch.Tensor:
    """n points around 16 centres at several scales: structure a residual codebook can fit depth by depth"""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(16, dim, generator=g) * 3
    return centres[torch.randint(16, (n,), generator=g)] + torch.randn(n, dim, generator=g)


# -- residual quantization --------------------------------------------------------------------------------
def test_reconstruction_is_the_sum_of_the_chosen_codes_and_ids_in_range():
    torch.manual_seed(0)
    vq = ResidualVQ(num_codes=16, dim=8, depth=4).train()
    z = clusters()
    q, idx, commit = vq(z)  # fits the codebooks on z first
    assert idx.shape == (512, 4) and idx.dtype == torch.int64
    assert int(idx.min()) >= 0 and int(idx.max()) < 16
    chosen = sum(vq.embed[k][idx[:, k]] for k in range(4))
    torch.testing.assert_close(q, chosen)  # straight-through: the forward value is the quantized one
    torch.testing.assert_close(vq.lookup(idx), chosen)
    torch.testing.assert_close(commit, (z - chosen).pow(2).mean())


def test_depth_one_is_plain_vq_and_depths_are_greedy():
    torch.manual_seed(0)
    deep = ResidualVQ(num_codes=16, dim=8, depth=3).eval()
    deep.embed.copy_(torch.randn(3, 16, 8))
    one = ResidualVQ(num_codes=16, dim=8, depth=1).eval()
    one.embed.copy_(deep.embed[:1])
    z = clusters()
    _, idx1, _ = one(z)
    assert torch.equal(idx1[:, 0], torch.cdist(z, one.embed[0]).argmin(1))  # plain nearest-code VQ
    _, idx3, _ = deep(z)
    assert torch.equal(idx3[:, :1], idx1)  # depth k only refines what depths < k left
    r = z - deep.embed[0][idx3[:, 0]]
    assert torch.equal(idx3[:, 1], torch.cdist(r, deep.embed[1]).argmin(1))


def test_residual_norm_does_not_grow_with_depth_on_fitted_data():
    torch.manual_seed(0)
    vq = ResidualVQ(num_codes=16, dim=8, depth=6, decay=0.8).train()
    z = clusters()
    for _ in range(30):
        vq(z)
    _, _, norms = vq.eval().quantize(z)  # [D+1, n]: ||r_0|| .. ||r_D||
    mean = norms.mean(1)
    assert torch.all(mean[1:] <= mean[:-1] + 1e-6), mean
    assert mean[-1] < 0.5 * mean[1] < mean[0]


def test_ema_moves_used_codes_and_restarts_unused_ones():
    torch.manual_seed(0)
    vq = ResidualVQ(num_codes=8, dim=4, depth=1, decay=0.5, dead_threshold=0.5).train()
    z = torch.randn(64, 4) * 0.1 + 5.0  # all data near (5, 5, 5, 5)
    vq(z)  # initialisation from this batch
    vq.embed[0, 7] = -100.0  # a code no feature will ever pick
    vq.embed_sum[0, 7] = -100.0
    vq.cluster_size[0, 7] = 1.0
    before = vq.embed.clone()
    _, idx, _ = vq(z)
    used = torch.unique(idx[:, 0])
    assert 7 not in used.tolist()
    # code 7's EMA usage fell to 0.5 * 1.0 = 0.5 ... then restarted once below the threshold
    _, idx, _ = vq(z)
    assert vq.embed[0, 7].sub(z.mean(0)).norm() < 2.0  # restarted from a current residual, far from -100
    assert not torch.equal(vq.embed[0, used], before[0, used])  # EMA moved the used codes


def test_commitment_gradient_reaches_the_encoder_only():
    torch.manual_seed(0)
    encoder, decoder = nn.Linear(8, 8), nn.Linear(8, 8)
    vq = ResidualVQ(num_codes=16, dim=8, depth=3).train()
    q, _, commit = vq(encoder(clusters(64)))
    (commit + 0 * decoder(q).sum()).backward()
    assert encoder.weight.grad is not None and encoder.weight.grad.abs().sum() > 0
    assert decoder.weight.grad is None or decoder.weight.grad.abs().sum() == 0
    assert not any(b.requires_grad for b in vq.buffers()) and not list(vq.parameters())
    # and the reconstruction path reaches the encoder straight through the quantizer
    encoder.zero_grad()
    q, _, _ = vq(encoder(clusters(64)))
    decoder(q).pow(2).mean().backward()
    assert encoder.weight.grad.abs().sum() > 0


# -- the tokenizer ----------------------------------------------------------------------------------------
def tiny_config(**kw) -> DualTokenConfig:
    return DualTokenConfig(teacher="random", siglip_config=TINY_SIGLIP, **{**SMALL, **kw})


@pytest.fixture(scope="module")
def tiny() -> DualToken:
    torch.manual_seed(0)
    cfg = tiny_config()
    model = DualToken.from_teacher(cfg, load_teacher(cfg))
    model.train().quantize(torch.rand(4, 3, 64, 64) * 2 - 1)  # fit the codebooks once
    return model.eval()


def test_tiny_contract(tiny):
    assert isinstance(tiny, VisualTokenizer) and tiny.kind == "dualtoken"
    assert tiny.code_vocab_sizes == (32,) * 16 and tiny.code_groups == (8, 8) and tiny.grid == 8
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    ids = tiny.encode(x)
    assert ids.shape == (2, 8, 8, 16) and ids.dtype == torch.int64 and 0 <= int(ids.min()) and int(ids.max()) < 32
    assert tiny.decode(ids).shape == (2, 3, 64, 64)
    feats = tiny.input_features()
    assert feats.per_id and feats.splits == (16,)
    f = feats(ids.flatten(1, 2))  # [n, N, ds + dp]
    assert f.shape == (2, 64, 16)
    torch.testing.assert_close(f[..., :8], tiny.sem_vq.lookup(ids[..., :8]).flatten(1, 2))
    torch.testing.assert_close(f[..., 8:], tiny.pix_vq.lookup(ids[..., 8:]).flatten(1, 2))
    pred, target = tiny.semantic_alignment(x)
    assert pred.shape == target.shape == (2, 64, 96)
    with pytest.raises(ValueError, match="out of range"):
        tiny.decode(torch.full_like(ids, 32))
    with pytest.raises(ValueError, match=r"\[B, 8, 8, 16\]"):
        tiny.decode(ids[..., :8])


def test_tower_is_cut_after_the_semantic_layer_and_starts_as_the_teacher(tiny):
    assert len(tiny.tower.encoder.layers) == 2 and not hasattr(tiny.tower, "head")
    for a, b in zip(tiny.tower.state_dict().values(), tiny.initial.state_dict().values()):
        assert torch.equal(a, b)
    assert not any(p.requires_grad for p in tiny.initial.parameters())
    with pytest.raises(ValueError, match="semantic_layer=4"):
        DualToken(tiny_config(semantic_layer=4))


def test_save_load_round_trip_and_shape_check(tiny, tmp_path):
    tiny.trained_stages = [1]
    tiny.save_pretrained(tmp_path / "tok")
    assert json.loads((tmp_path / "tok" / "config.json").read_text())["model_type"] == "dualtoken"
    loaded = load_visual_tokenizer(tmp_path / "tok")
    assert isinstance(loaded, DualToken)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    assert torch.equal(loaded.encode(x), tiny.encode(x))
    meta = json.loads((tmp_path / "tok" / "config.json").read_text())
    (tmp_path / "tok" / "config.json").write_text(json.dumps({**meta, "pix_code_dim": 4}))
    with pytest.raises(ValueError, match="does not match"):
        DualToken.from_pretrained(tmp_path / "tok")


def test_real_so400m_vision_config_depth_cut():
    """SigLIP so400m/14-384's real vision config cut to 2 layers (random weights; loading a real SiglipModel
    directory is load_teacher's, tested in test_teacher_load): 27x27 positions of 16 codes, 384 px out."""
    so400m = "google/siglip-so400m-patch14-384"
    cfg = DualTokenConfig(teacher="random", siglip_config=vision_config(so400m, 2), **SMALL)
    torch.manual_seed(0)
    model = DualToken.from_teacher(cfg, load_teacher(cfg))
    assert model.config.siglip_config["hidden_size"] == 1152 and model.grid == 27
    x = torch.rand(1, 3, 384, 384) * 2 - 1
    ids = model.eval().encode(x)  # (codebooks unfitted: shapes only)
    assert ids.shape == (1, 27, 27, 16)
    assert model.decode(ids).shape == (1, 3, 384, 384)
    pred, target = model.semantic_alignment(x)
    assert pred.shape == target.shape == (1, 729, 1152)


# -- training ---------------------------------------------------------------------------------------------
def run_config(run_dir, *overrides):
    small = [f"dualtoken.{k}={v}" for k, v in SMALL.items()]
    return conftest_tiny_config(run_dir, "tokenizer_train.batch_size=2", *small, *overrides)


def test_training_steps_lower_the_loss(tmp_path):
    from semhitok.tokenizer import list_images, load_rgb, preprocess
    from semhitok.tokenizer.dualtoken.train import DualTokenTask
    from tests.conftest import SAMPLE

    cfg = run_config(tmp_path, "tokenizer_train.disc_start=5", "tokenizer_train.warmup_steps=1")
    torch.manual_seed(0)
    model = DualToken.from_teacher(cfg.dualtoken, load_teacher(cfg.dualtoken))
    task = DualTokenTask(model, cfg.tokenizer_train, torch.device("cpu"), world=1)
    assert task.run_info["perceptual"] == "semantic"
    x = preprocess([load_rgb(p) for p in list_images([SAMPLE / "train.jsonl"])[:2]], 64)
    steps = [task.train_step(x, step) for step in range(6)]
    assert steps[-1]["l2_loss"] < 0.8 * steps[0]["l2_loss"]
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert "d_loss" in steps[-1] and "d_loss" not in steps[0]  # the GAN from disc_start on
    assert not any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.initial.parameters())
    torch.manual_seed(0)
    fresh = load_teacher(cfg.dualtoken).state_dict()  # the same seed gives the same random tower
    for k, v in model.initial.state_dict().items():
        assert torch.equal(v, fresh[k]), k  # the initial copy never trains


def test_train_entry_point_resumes_from_checkpoints_and_skips_when_done(tmp_path, caplog):
    train, final_dir = (getattr(importlib.import_module(m), f) for m, f in (s.split(":") for s in TRAINERS["dualtoken"]))
    assert tokenizer_class("dualtoken") is DualToken
    cfg = run_config(tmp_path, "tokenizer_train.max_steps=3", "tokenizer_train.ckpt_every=2",
                     "tokenizer_train.perceptual=none")
    final = train(cfg)
    assert final == final_dir(cfg) == tmp_path / "tokenizer" / "dualtoken" / "final"
    ckpt = final.parent / "checkpoints" / "step_00000002"
    assert (ckpt / "COMPLETE.json").is_file()
    first = DualToken.from_pretrained(final)
    assert first.trained_stages == [1]
    # an interrupted longer run: the final directory gone, max_steps raised -> resumes from step 2
    shutil.rmtree(final)
    cfg.tokenizer_train.max_steps = 4
    with caplog.at_level("INFO", logger="semhitok"):
        train(cfg)
    assert "resumed from" in caplog.text and "step 2" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="semhitok"):
        assert train(cfg) == final
    assert "already trained" in caplog.text


def test_presets():
    from semhitok.config import load_project_config

    paper = load_project_config("384").dualtoken  # arXiv 2503.14324 sec. 3.2, 4.1
    assert (paper.teacher, paper.pixel_layer, paper.semantic_layer, paper.depth) == (
        "google/siglip-so400m-patch14-384", 6, 26, 8)
    tiny = load_project_config("tiny").dualtoken
    assert tiny.depth == 8 and tiny.pixel_layer < tiny.semantic_layer <= tiny.siglip_config["num_hidden_layers"]
    model = DualToken(tiny)
    assert model.code_groups == (8, 8) and model.code_vocab_sizes == (256,) * 16 and model.grid == 8


# -- variant=official (the authors' repo's settings) -------------------------------------------------------
OFFICIAL_CONV = dict(decoder_latent=8, conv_channels=16, conv_ch_mult=[1, 2, 2, 4], conv_in_channels=64, conv_res_blocks=1)


def test_shared_codebook_serves_every_depth_and_updates_once_per_step():
    torch.manual_seed(0)
    vq = ResidualVQ(num_codes=16, dim=8, depth=4, decay=0.5, shared=True).train()
    assert vq.embed.shape == (1, 16, 8) and vq.codebooks.shape == (4, 16, 8)
    z = clusters()
    q, idx, commit = vq(z)
    chosen = sum(vq.embed[0][idx[:, k]] for k in range(4))  # every depth indexes the one codebook
    torch.testing.assert_close(q, chosen)
    torch.testing.assert_close(vq.lookup(idx), chosen)
    before = vq.embed.clone()
    for _ in range(5):
        vq(z)
    assert not torch.equal(before, vq.embed)
    _, _, norms = vq.eval().quantize(z)
    assert norms.mean(1)[-1] < 0.5 * norms.mean(1)[0]  # the shared codes still refine depth by depth


def official(**kw) -> DualToken:
    cfg = tiny_config(variant="official", **{**OFFICIAL_CONV, **kw})
    torch.manual_seed(0)
    return DualToken.from_teacher(cfg, load_teacher(cfg, head=True))


def test_official_variant_builds_the_repo_architecture():
    from semhitok.tokenizer.dualtoken.official import AttnProjection, ConvDecoder

    paper = DualTokenConfig(siglip_config=TINY_SIGLIP)
    assert (paper.sem_code_dim, paper.recon_weight, paper.commit_weight, paper.shortcut_layer) == (64, 1.0, 0.25, 0)
    repo = DualTokenConfig(variant="official")  # the 384 settings: 32 dims, x5, layer-4 shortcut at 0.6
    assert (repo.sem_code_dim, repo.pix_code_dim, repo.recon_weight, repo.commit_weight) == (32, 32, 5.0, 5.0)
    assert (repo.shortcut_layer, repo.shortcut_weight, repo.decoder_latent) == (4, 0.6, 24)
    model = official(shortcut_layer=1)
    assert model.tower.head is not None and len(model.tower.encoder.layers) == 3  # the whole tower, pooling head
    assert isinstance(model.to_sem, AttnProjection) and isinstance(model.from_sem, AttnProjection)
    assert isinstance(model.to_pix, AttnProjection) and isinstance(model.to_pix_shortcut, AttnProjection)
    assert isinstance(model.decoder.conv, ConvDecoder)
    assert model.sem_vq.shared and model.pix_vq.shared and model.sem_vq.embed.shape == (1, 32, 8)
    model.train().quantize(torch.rand(4, 3, 64, 64) * 2 - 1)
    model.eval()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    ids = model.encode(x)
    assert ids.shape == (2, 8, 8, 16) and model.decode(ids).shape == (2, 3, 64, 64)
    feats = model.input_features()(ids.flatten(1, 2))
    torch.testing.assert_close(feats[..., 8:], model.pix_vq.lookup(ids[..., 8:]).flatten(1, 2))
    out = model(x)
    assert out["pooled"].shape == (2, 96)
    # the shortcut feeds the pixel codes: without it (weight 0) the pixel ids change, the semantic ids do not
    model.config.shortcut_weight = 0.0
    ids0 = model.encode(x)
    assert torch.equal(ids0[..., :8], ids[..., :8]) and not torch.equal(ids0[..., 8:], ids[..., 8:])
    with pytest.raises(ValueError, match="decodes 128 px"):
        official(decoder_latent=16)


def test_official_variant_trains_at_tiny_and_freeze_tower_fixes_the_lower_layers(tmp_path):
    from semhitok.tokenizer import list_images, load_rgb, preprocess
    from semhitok.tokenizer.dualtoken.train import DualTokenTask, train
    from tests.conftest import SAMPLE

    cfg = run_config(tmp_path, "dualtoken.variant=official", "tokenizer_train.max_steps=2",
                     "tokenizer_train.perceptual=none", "tokenizer_train.warmup_steps=1")
    assert cfg.dualtoken.official and cfg.dualtoken.commit_weight == 5.0
    final = train(cfg)  # the kind's entry point, at the tiny preset
    assert DualToken.from_pretrained(final).config.variant == "official"

    x = preprocess([load_rgb(p) for p in list_images([SAMPLE / "train.jsonl"])[:2]], 64)
    for freeze in (False, True):
        model = official(freeze_tower=freeze)
        task = DualTokenTask(model, cfg.tokenizer_train, torch.device("cpu"), world=1)
        lower = {k: v.clone() for k, v in model.tower.state_dict().items() if not k.startswith(("head.", "post_layernorm."))
                 and not k.startswith(f"encoder.layers.{model.config.semantic_layer}.")}
        head = {k: v.clone() for k, v in model.tower.head.state_dict().items()}
        steps = [task.train_step(x, step) for step in range(6)]
        assert steps[-1]["loss"] < steps[0]["loss"] and "semantic_pooled_loss" in steps[0]
        moved = [k for k, v in model.tower.state_dict().items() if k in lower and not torch.equal(v, lower[k])]
        assert (not moved) == freeze, moved[:3]  # the repo's stage 0 keeps embeddings and layers 1..26
        assert any(not torch.equal(v, head[k]) for k, v in model.tower.head.state_dict().items())  # the head trains


def test_compare_samples_dualtoken_at_its_papers_cfg_unless_the_user_says_otherwise():
    from pathlib import Path

    from semhitok.config import load_project_config
    from semhitok.eval.compare import kind_overrides

    scale = {kind: load_project_config("tiny", kind_overrides("tiny", [], kind, Path("/x"))).eval.sampling.cfg_scale
             for kind in ("semhitok", "dualtoken")}
    assert scale == {"semhitok": 2.0, "dualtoken": 3.0}  # each paper's CFG
    mine = kind_overrides("tiny", ["eval.sampling.cfg_scale=1.5"], "dualtoken", Path("/x"))
    assert load_project_config("tiny", mine).eval.sampling.cfg_scale == 1.5


def test_a_dualtoken_tokenizer_pushes_to_the_hub_with_its_card(tiny, tmp_path, monkeypatch, capsys):
    """push_to_hub (the kinds' mixin) and `semhitok push` of a saved directory, against a recording HfApi."""
    import huggingface_hub

    from semhitok.cli import main
    from tests.test_hf_artifacts import RecordingApi

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    RecordingApi.calls = []
    assert tiny.push_to_hub("org/dual") == "https://hub.test/org/dual/commit/1"
    (_, _, kw), (_, repo, files, card, _) = RecordingApi.calls
    assert repo == "org/dual" and {"config.json", "model.safetensors", "README.md"} <= set(files)
    assert "# DualToken image tokenizer" in card and 'load_tokenizer("org/dual")' in card
    tiny.save_pretrained(tmp_path / "final")
    RecordingApi.calls = []
    assert main(["push", "--model", str(tmp_path / "final"), "--repo", "org/dual2"]) == 0
    (_, _, _), (_, repo, files, card, _) = RecordingApi.calls
    assert repo == "org/dual2" and "model.safetensors" in files and "# DualToken image tokenizer" in card
