"""The 384 px preset's shapes end to end, with random weights: SigLIP so400m/14's real vision config (depth cut
to 1) -> 27x27 = 729 ids per image through tokenizer stages 1 and 2, encode/decode/reconstruct/eval,
pre-tokenization, packing, the LM's training loss, sampling of 729 ids and chat. The 256 preset's geometry
(exact 16x16 grid) runs the same code with no resize."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from semhitok.data_pipelines.config import MixtureComponent, PretokenizeConfig, SequenceConfig, SourceConfig
from semhitok.data_pipelines.loader import PackedLoader
from semhitok.data_pipelines.pretokenize import load_shard, run_pretokenize
from semhitok.eval.recon import evaluate_reconstruction
from semhitok.mllm.config import MLLMConfig, SamplingConfig
from semhitok.mllm.model import SemHiTokLM
from semhitok.mllm.sample import Decoder
from semhitok.tokenizer import SemHiTok, list_images, load_rgb, preprocess, reconstruct_to_dir
from semhitok.tokenizer.semhitok.train import build_task
from semhitok.tokenizer.vit import pixel_geometry
from tests.conftest import SAMPLE, TINY_QWEN, tiny_config
from tests.tokenizer.siglip_dirs import vision_config

SO400M = "google/siglip-so400m-patch14-384"
K, M = 256, 12  # K cut (k-means on one 729-id image needs K <= 729); m, code dims, grid, channels are real


def config_384(run_dir):
    # the GAN (a fully convolutional PatchGAN, resolution-agnostic) is left to the tiny tests: costly at 384 on CPU
    cfg = tiny_config(run_dir, "tokenizer_train.batch_size=1", "tokenizer_train.disc_start=1000")
    cfg.tokenizer = dataclasses.replace(cfg.tokenizer, teacher="random", siglip_config=vision_config(SO400M, 1),
                                        sem_codebook_size=K, sem_code_dim=32, pix_code_dim=8, pix_codes_per_group=M,
                                        sem_decoder_layers=1)
    return cfg


def images(n: int, size: int = 384) -> tuple[list, torch.Tensor]:
    paths = list_images([SAMPLE / "holdout.jsonl"])[:n]
    return paths, preprocess([load_rgb(p) for p in paths], size)


def test_pixel_geometry():
    assert pixel_geometry(384, 27) == (15, 405)  # so400m/14: 27x27 ids over the whole 384 image
    assert pixel_geometry(256, 16) == (16, 256)  # siglip-large/16: exact, no resize
    assert pixel_geometry(64, 8) == (8, 64)  # tiny


@pytest.fixture(scope="module")
def tokenizer_384(tmp_path_factory):
    """One stage-1 step and one stage-2 step at 384 px; the stage-2 directory."""
    root = tmp_path_factory.mktemp("t384")
    cfg = config_384(root)
    _, x = images(1)
    torch.manual_seed(0)
    stage1 = build_task(1, cfg.tokenizer, cfg.tokenizer_train, None, torch.device("cpu"), world=1)
    m1 = stage1.train_step(x, 0)
    assert all(np.isfinite(v) for v in m1.values()) and bool(stage1.model.semantic.codebook.initialized)
    stage1.model.trained_stages = [1]
    stage1.model.save_pretrained(root / "stage1")
    stage2 = build_task(2, cfg.tokenizer, cfg.tokenizer_train, root / "stage1", torch.device("cpu"), world=1)
    m2 = stage2.train_step(x, 0)
    assert all(np.isfinite(v) for v in m2.values()) and m2["perceptual_loss"] > 0
    model = stage2.model
    model.trained_stages = [1, 2]
    model.save_pretrained(root / "stage2")
    return root / "stage2"


def test_encode_decode_reconstruct_eval_at_384(tokenizer_384, tmp_path):
    model = SemHiTok.from_pretrained(tokenizer_384)
    assert (model.image_size, model.grid, model.pixel.patch, model.pixel.canvas) == (384, 27, 15, 405)
    paths, x = images(2)
    ids = model.encode(x)
    assert ids.shape == (2, 27, 27) and 0 <= ids.min() and ids.max() < K * M
    out = model.decode(ids)
    assert out.shape == (2, 3, 384, 384) and out.abs().max() <= 1
    # the whole image is reconstructed: gradients of the output reach every input pixel row and column
    xx = x[:1].clone().requires_grad_(True)
    sem = model.semantic_ids(x[:1])
    q_pix, _, _ = model.pixel.quantize(xx, sem)
    recon = model.pixel.decode(model.semantic.codebook.lookup(sem), q_pix)
    recon.sum().backward()
    assert recon.shape == (1, 3, 384, 384) and (xx.grad.abs().sum(dim=(0, 1, 2)) > 0).all()
    grid = reconstruct_to_dir(model, paths[:1], tmp_path / "recon")
    assert grid.is_file() and len(list((tmp_path / "recon").glob("*_recon.png"))) == 1
    result = evaluate_reconstruction(model, paths[:1], fid=False)
    assert result["images"] == 1 and np.isfinite(result["psnr"])


def test_pretokenize_pack_train_sample_and_chat_at_384(tokenizer_384, text_tokenizer, tmp_path):
    rows = [json.loads(line) for line in (SAMPLE / "train.jsonl").read_text().splitlines()[:2]]
    jsonl = tmp_path / "two.jsonl"
    jsonl.write_text("".join(json.dumps({**r, "image": str(SAMPLE / r["image"])}) + "\n" for r in rows))
    pcfg = PretokenizeConfig(sources=[SourceConfig("caps", "caption_jsonl", str(jsonl))], records_per_shard=16,
                             batch_size=2, num_workers=0)
    run_pretokenize(pcfg, tokenizer_384, tmp_path / "pretok")
    ids, meta = load_shard(tmp_path / "pretok" / "shards" / "caps-00000.npz")
    assert ids.shape == (2, 729) and len(meta) == 2
    visual = SemHiTok.from_pretrained(tokenizer_384)
    x = preprocess([load_rgb(SAMPLE / r["image"]) for r in rows], 384)
    np.testing.assert_array_equal(ids, visual.encode(x).flatten(1).numpy())

    torch.manual_seed(0)
    lm = SemHiTokLM.build(MLLMConfig(base_model="random", base_config={**TINY_QWEN, "max_position_embeddings": 2048}),
                          visual, text_tokenizer).eval()
    layout = lm.layout
    scfg = SequenceConfig(mixture=[MixtureComponent("caps", "generation")], max_length=1024, micro_batch_size=1,
                          pack_lookahead=4)
    batch = PackedLoader(scfg, text_tokenizer, layout, tmp_path / "pretok").next_batch()
    row = batch["input_ids"][0].numpy()
    start = int(np.flatnonzero(row == layout.image_start)[0])
    span = row[start + 1 : start + 1 + 729]
    assert (span >= layout.visual_offset).all() and row[start + 1 + 729] == layout.image_end
    assert any((span - layout.visual_offset == r).all() for r in ids)  # one image's 729 ids, in order
    loss = lm(batch["input_ids"], batch["position_ids"], batch["labels"], batch["task_ids"])["loss"]
    assert torch.isfinite(loss)

    decoder = Decoder(lm, text_tokenizer)
    sampled = decoder.image_ids(["a red bus"], SamplingConfig(cfg_scale=1.0, seed=0))  # no CFG: one row (CFG is tested at tiny)
    assert sampled.shape == (1, 27, 27) and 0 <= sampled.min() and sampled.max() < K * M
    assert visual.decode(sampled).shape == (1, 3, 384, 384)
    answer = decoder.answer([("user", "<image>\nWhat is this?")], torch.from_numpy(ids[0]).view(27, 27),
                            SamplingConfig(seed=0), max_new_tokens=4)
    assert isinstance(answer, str)


def test_256_geometry_encodes_16x16_without_resizing(tmp_path):
    cfg = tiny_config(tmp_path).tokenizer
    cfg = dataclasses.replace(cfg, teacher="random", siglip_config=vision_config("google/siglip-large-patch16-256", 1),
                              sem_codebook_size=64, sem_decoder_layers=1)
    torch.manual_seed(0)
    model = SemHiTok(cfg).eval()
    model.trained_stages = [1, 2]
    assert (model.grid, model.pixel.patch, model.pixel.canvas) == (16, 16, 256)
    _, x = images(1, 256)
    ids = model.encode(x)
    assert ids.shape == (1, 16, 16) and model.decode(ids).shape == (1, 3, 256, 256)
