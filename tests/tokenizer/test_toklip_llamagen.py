"""LlamaGen's VQ checkpoint -> our VQGAN: every tensor of LlamaGen's key layout lands on a weight, and the converted
model computes what those weights compute in LlamaGen's architecture.

The state dict and the reference forward below are written from LlamaGen's published architecture (VQModel of
FoundationVision/LlamaGen tokenizer/tokenizer_image/vq_model.py: conv_blocks with res/attn lists, downsample with
bottom/right padding, mid = res/attn/res, GroupNorm(32), single-head attention with q/k/v/proj_out 1x1 convs,
l2-normalised codebook): a functional implementation over the raw tensors by LlamaGen's names, sharing no code
with tokenizer/toklip/vqgan.py, so a wrong rename or a layer in the wrong place changes the outputs.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from semhitok.tokenizer.toklip.llamagen import convert_state_dict, from_llamagen, load_llamagen, main, read_checkpoint
from semhitok.tokenizer.toklip.vqgan import VQGAN
from tests.conftest import tiny_config

# A small VQ-16-shaped model: GroupNorm(32) needs widths that are multiples of 32; res_blocks=2 as VQ-16 gives
# 2 (+1 mid) attention blocks in the encoder and 3 (+1 mid) in the decoder. 3 downsamplings: 64 px -> 8x8 ids.
CH, MULT, NRES, Z, V, D, SIZE = 32, (1, 2, 2, 2), 2, 32, 64, 8, 64


def llamagen_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under LlamaGen's VQModel key names and shapes (codebook_used included, as released)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def conv(name: str, c_out: int, c_in: int, k: int) -> None:
        sd[f"{name}.weight"] = torch.randn(c_out, c_in, k, k, generator=g) / math.sqrt(c_in * k * k)
        sd[f"{name}.bias"] = torch.randn(c_out, generator=g) * 0.05

    def norm(name: str, c: int) -> None:
        sd[f"{name}.weight"] = 1 + 0.1 * torch.randn(c, generator=g)
        sd[f"{name}.bias"] = 0.1 * torch.randn(c, generator=g)

    def resnet(name: str, c_in: int, c_out: int) -> None:
        norm(f"{name}.norm1", c_in)
        conv(f"{name}.conv1", c_out, c_in, 3)
        norm(f"{name}.norm2", c_out)
        conv(f"{name}.conv2", c_out, c_out, 3)
        if c_in != c_out:
            conv(f"{name}.nin_shortcut", c_out, c_in, 1)

    def attn(name: str, c: int) -> None:
        norm(f"{name}.norm", c)
        for part in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{part}", c, c, 1)

    n = len(MULT)
    conv("encoder.conv_in", CH, 3, 3)
    c = CH
    for i, m in enumerate(MULT):
        for j in range(NRES):
            resnet(f"encoder.conv_blocks.{i}.res.{j}", c, CH * m)
            c = CH * m
            if i == n - 1:
                attn(f"encoder.conv_blocks.{i}.attn.{j}", c)
        if i != n - 1:
            conv(f"encoder.conv_blocks.{i}.downsample.conv", c, c, 3)
    resnet("encoder.mid.0", c, c)
    attn("encoder.mid.1", c)
    resnet("encoder.mid.2", c, c)
    norm("encoder.norm_out", c)
    conv("encoder.conv_out", Z, c, 3)

    c = CH * MULT[-1]
    conv("decoder.conv_in", c, Z, 3)
    resnet("decoder.mid.0", c, c)
    attn("decoder.mid.1", c)
    resnet("decoder.mid.2", c, c)
    for i, level in enumerate(reversed(range(n))):  # conv_blocks[0] is the lowest resolution
        for j in range(NRES + 1):
            resnet(f"decoder.conv_blocks.{i}.res.{j}", c, CH * MULT[level])
            c = CH * MULT[level]
            if level == n - 1:
                attn(f"decoder.conv_blocks.{i}.attn.{j}", c)
        if level != 0:
            conv(f"decoder.conv_blocks.{i}.upsample.conv", c, c, 3)
    norm("decoder.norm_out", c)
    conv("decoder.conv_out", 3, c, 3)

    conv("quant_conv", D, Z, 1)
    conv("post_quant_conv", Z, D, 1)
    sd["quantize.embedding.weight"] = F.normalize(torch.rand(V, D, generator=g) * 2 / V - 1 / V, dim=-1)
    sd["quantize.codebook_used"] = torch.randint(0, V, (65536,), generator=g).float()
    return sd


# -- the reference: LlamaGen's forward over its raw tensors ---------------------------------------------------
def _conv(sd, name, x, stride=1, padding=1):
    return F.conv2d(x, sd[f"{name}.weight"], sd[f"{name}.bias"], stride=stride, padding=padding)


def _gn(sd, name, x):
    return F.group_norm(x, 32, sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-6)


def _res(sd, name, x):
    h = _conv(sd, f"{name}.conv1", F.silu(_gn(sd, f"{name}.norm1", x)))
    h = _conv(sd, f"{name}.conv2", F.silu(_gn(sd, f"{name}.norm2", h)))
    if f"{name}.nin_shortcut.weight" in sd:
        x = _conv(sd, f"{name}.nin_shortcut", x, padding=0)
    return x + h


def _attn(sd, name, x):
    b, c, h, w = x.shape
    y = _gn(sd, f"{name}.norm", x)
    q, k, v = (_conv(sd, f"{name}.{p}", y, padding=0).reshape(b, c, h * w) for p in "qkv")
    weights = torch.softmax(torch.bmm(q.permute(0, 2, 1), k) * c ** -0.5, dim=2)  # [b, hw (query), hw (key)]
    out = torch.bmm(v, weights.permute(0, 2, 1)).reshape(b, c, h, w)
    return x + _conv(sd, f"{name}.proj_out", out, padding=0)


def _blocks(sd, prefix, x):
    i = 0
    while f"{prefix}.{i}.res.0.conv1.weight" in sd:
        j = 0
        while f"{prefix}.{i}.res.{j}.conv1.weight" in sd:
            x = _res(sd, f"{prefix}.{i}.res.{j}", x)
            if f"{prefix}.{i}.attn.{j}.q.weight" in sd:
                x = _attn(sd, f"{prefix}.{i}.attn.{j}", x)
            j += 1
        if f"{prefix}.{i}.downsample.conv.weight" in sd:
            x = _conv(sd, f"{prefix}.{i}.downsample.conv", F.pad(x, (0, 1, 0, 1)), stride=2, padding=0)
        if f"{prefix}.{i}.upsample.conv.weight" in sd:
            x = _conv(sd, f"{prefix}.{i}.upsample.conv", F.interpolate(x, scale_factor=2.0, mode="nearest"))
        i += 1
    return x


def _mid(sd, prefix, x):
    return _res(sd, f"{prefix}.mid.2", _attn(sd, f"{prefix}.mid.1", _res(sd, f"{prefix}.mid.0", x)))


def reference_encode(sd, images):
    """images [B, 3, H, W] -> ids [B, h, w]: argmin of squared distance between unit z and unit codes"""
    h = _mid(sd, "encoder", _blocks(sd, "encoder.conv_blocks", _conv(sd, "encoder.conv_in", images)))
    h = _conv(sd, "encoder.conv_out", F.silu(_gn(sd, "encoder.norm_out", h)))
    z = _conv(sd, "quant_conv", h, padding=0).permute(0, 2, 3, 1)  # [B, h, w, d]
    z = F.normalize(z.reshape(-1, z.shape[-1]), dim=-1)
    e = F.normalize(sd["quantize.embedding.weight"], dim=-1)
    dist = (z ** 2).sum(1, keepdim=True) + (e ** 2).sum(1) - 2 * z @ e.t()
    return dist.argmin(1).view(images.shape[0], *h.shape[2:])


def reference_decode(sd, ids):
    """ids [B, h, w] -> images [B, 3, H, W] (unclamped)"""
    q = F.normalize(sd["quantize.embedding.weight"], dim=-1)[ids].permute(0, 3, 1, 2)
    x = _mid(sd, "decoder", _conv(sd, "decoder.conv_in", _conv(sd, "post_quant_conv", q, padding=0)))
    x = _blocks(sd, "decoder.conv_blocks", x)
    return _conv(sd, "decoder.conv_out", F.silu(_gn(sd, "decoder.norm_out", x)))


@pytest.fixture(scope="module")
def source():
    return llamagen_state_dict()


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(0)
    return torch.rand(2, 3, SIZE, SIZE) * 2 - 1


def test_every_key_lands_and_the_architecture_is_read_off_the_shapes(source):
    converted = convert_state_dict(source)
    model = from_llamagen(source, SIZE)
    assert set(converted) == set(model.state_dict())  # no missing, no unexpected (codebook_used dropped)
    assert len(converted) == len(source) - 1
    cfg = model.config
    assert (cfg.channels, cfg.channel_mult, cfg.res_blocks, cfg.z_channels, cfg.codebook_size, cfg.code_dim) == (
        CH, list(MULT), NRES, Z, V, D)
    assert model.grid == SIZE // 8 and model.trained_stages == [1]
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in converted.items())
    # VQ-16's attention placement: 2 + 1 blocks in the encoder, 3 + 1 in the decoder, all at the lowest resolution
    assert sum(k.endswith(".q.weight") for k in state if k.startswith("encoder.")) == NRES + 1
    assert sum(k.endswith(".q.weight") for k in state if k.startswith("decoder.")) == NRES + 2


@torch.no_grad()
def test_decode_and_encode_equal_the_source_weights_in_llamagens_architecture(source, images):
    model = from_llamagen(source, SIZE)
    ids = torch.randint(0, V, (2, SIZE // 8, SIZE // 8), generator=torch.Generator().manual_seed(1))
    want = reference_decode(source, ids)
    assert want.abs().max() < 5 and want.std() > 0.05  # the reference is not degenerate
    torch.testing.assert_close(model.decoder(model.post_quant_conv(model.quantizer.lookup(ids).permute(0, 3, 1, 2))),
                               want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.decode(ids), want.clamp(-1, 1), rtol=1e-4, atol=1e-5)
    got = model.encode(images)
    assert torch.equal(got, reference_encode(source, images)) and len(got.unique()) > 3


def test_a_renamed_or_missing_tensor_is_refused(source):
    broken = dict(source)
    broken["encoder.conv_blocks.3.attn.0.proj_out.weight"] = broken.pop("encoder.conv_blocks.3.attn.0.proj_out.weight")[:, :16]
    with pytest.raises(ValueError, match="1 of another shape"):
        from_llamagen(broken, SIZE)
    del broken["decoder.mid.1.q.bias"]
    broken["decoder.mid.1.qkv.bias"] = torch.zeros(3)
    with pytest.raises(ValueError, match="1 missing .*1 unexpected"):
        from_llamagen(broken, SIZE)


class TrainingArgs:
    """What a training script might pickle beside its weights."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def test_checkpoint_files_pickle_safely_and_the_cli_writes_a_vqgan_dir(source, images, tmp_path):
    torch.save({"model": source, "steps": 10}, tmp_path / "vq.pt")
    assert read_checkpoint(tmp_path / "vq.pt").keys() == source.keys()
    other = {k: v + 1 if v.is_floating_point() else v for k, v in source.items()}
    torch.save({"model": other, "ema": source}, tmp_path / "ema.pt")  # TokLIP's order: ema first
    assert torch.equal(read_checkpoint(tmp_path / "ema.pt")["quant_conv.weight"], source["quant_conv.weight"])
    save_file({k: v.contiguous() for k, v in source.items()}, str(tmp_path / "vq.safetensors"))
    assert torch.equal(load_llamagen(tmp_path / "vq.safetensors", SIZE).encode(images),
                       load_llamagen(tmp_path / "vq.pt", SIZE).encode(images))
    # needs a class to unpickle: one of this module's, since argparse.Namespace is on torch's safe list once
    # megatron-core is imported in the process (megatron.core.safe_globals registers it)
    torch.save({"model": source, "args": TrainingArgs(lr=1)}, tmp_path / "code.pt")
    with pytest.raises(ValueError, match="code.pt: refused to unpickle"):
        read_checkpoint(tmp_path / "code.pt")
    torch.save({"weights": [1, 2]}, tmp_path / "empty.pt")
    with pytest.raises(ValueError, match="empty.pt: no state dict"):
        read_checkpoint(tmp_path / "empty.pt")
    with pytest.raises(ValueError, match="vq.pt: .*not a multiple"):
        load_llamagen(tmp_path / "vq.pt", 60)
    main([str(tmp_path / "vq.pt"), str(tmp_path / "out"), "--image-size", str(SIZE)])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "vqgan"
    saved = VQGAN.from_pretrained(tmp_path / "out")
    ids = saved.encode(images)
    assert torch.equal(ids, reference_encode(source, images))
    torch.testing.assert_close(saved.decode(ids), reference_decode(source, ids).clamp(-1, 1), rtol=1e-4, atol=1e-5)


def test_toklip_trains_its_encoder_on_the_converted_vqgan(source, images, tmp_path):
    """toklip.vqgan_pretrained=<LlamaGen file>: stage 1 is the conversion (nothing trained), stage 2 reads it."""
    from semhitok.tokenizer.interface import load_visual_tokenizer
    from semhitok.tokenizer.toklip.train import train, vqgan_dir

    torch.save({"model": source}, tmp_path / "vq_ds16_t2i.pt")
    cfg = tiny_config(tmp_path / "run", "tokenizer_train.batch_size=2", "toklip.encoder_steps=1",
                      f"toklip.vqgan_pretrained={tmp_path / 'vq_ds16_t2i.pt'}")
    out = train(cfg)
    assert not (vqgan_dir(cfg).parent / "checkpoints").exists()  # converted, not trained
    tok = load_visual_tokenizer(out)
    assert tok.config.vqgan.channels == CH and tok.trained_stages == [1, 2]
    assert torch.equal(tok.encode(images), reference_encode(source, images))
