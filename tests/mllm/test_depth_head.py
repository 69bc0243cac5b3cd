"""Depth heads (mllm/depth_head.py): teacher forcing equals step-by-step decoding, overfit + greedy decoding,
independence of the code groups, DualToken's real shapes; the MLLM with depth heads (L > 1) end to end on a small
residual-quantizing tokenizer (tests/test_kinds.py PatchRVQ): loss, training, export, CFG sampling, understanding."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from semhitok.data_pipelines.sequences import IGNORE, SequenceBuilder
from semhitok.mllm.config import MLLMConfig, SamplingConfig
from semhitok.mllm.depth_head import DepthHeads
from semhitok.mllm.gaps import HeldoutPairs, conditioning_gaps, documents, flat_metrics, score
from semhitok.mllm.model import SemHiTokLM
from semhitok.mllm.sample import load_sampler, sample_images
from semhitok.tokenizer.dualtoken.config import DualTokenConfig
from semhitok.tokenizer.dualtoken.model import DualToken
from semhitok.tokenizer.siglip import load_teacher
from tests.conftest import tiny_config
from tests.conftest import TINY_QWEN
from tests.mllm.reference_decoder import reference_image_ids
from tests.test_kinds import HERE as KINDS_MODULE
from tests.test_kinds import PatchRVQ

VOCABS, GROUPS = (7, 5, 6, 4, 9), (3, 2)


def _heads(seed=0, **kw) -> DepthHeads:
    torch.manual_seed(seed)
    return DepthHeads(32, VOCABS, GROUPS, layers=2, width=24, heads=2, **kw).eval()


def _codes(n: int, vocabs=VOCABS, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(v, (n,), generator=g) for v in vocabs], dim=1)  # [n, L]


def test_teacher_forcing_equals_step_by_step_decoding():
    heads = _heads()
    hidden, codes = torch.randn(6, 32), _codes(6)
    forced = heads.logits(hidden, codes)  # L x [6, V_l], one pass per group
    seen: dict[int, torch.Tensor] = {}

    def feed(logits, l):  # the step-by-step decode, fed the same codes
        seen[l] = logits
        return codes[:, l]

    assert torch.equal(heads.sample(hidden, feed), codes)
    assert sorted(seen) == list(range(len(VOCABS)))
    for l, v in enumerate(VOCABS):
        assert forced[l].shape == (6, v)
        torch.testing.assert_close(seen[l], forced[l], atol=1e-5, rtol=1e-5)
    # the loss is the summed NLL of the L codes (DualToken eq. 8)
    nll = sum(F.cross_entropy(forced[l], codes[:, l], reduction="none") for l in range(len(VOCABS)))
    torch.testing.assert_close(heads.loss(hidden, codes), nll, atol=1e-5, rtol=1e-5)
    # the decode's logits depend on the codes fed: a different code 0 changes the logits of code 1
    other = codes.clone()
    other[:, 0] = (other[:, 0] + 1) % VOCABS[0]
    assert not torch.allclose(heads.logits(hidden, other)[1], forced[1], atol=1e-4)


def test_overfit_then_greedy_decoding_reproduces_the_codes():
    heads = _heads().train()
    hidden, codes = torch.randn(4, 32), _codes(4, seed=3)
    opt = torch.optim.Adam(heads.parameters(), lr=1e-2)
    for _ in range(60):
        loss = heads.loss(hidden, codes).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05, loss.item()
    greedy = heads.eval().sample(hidden, lambda logits, l: logits.argmax(-1))
    assert torch.equal(greedy, codes)


def test_groups_are_independent():
    heads = _heads()
    hidden, codes = torch.randn(5, 32), _codes(5)
    base = heads.logits(hidden, codes)
    pix = codes.clone()
    pix[:, 3:] = _codes(5, seed=9)[:, 3:]  # other pixel codes: the semantic head's logits are unchanged
    sem = codes.clone()
    sem[:, :3] = _codes(5, seed=9)[:, :3]  # other semantic codes: the pixel head's logits are unchanged
    for l in range(3):
        assert torch.equal(heads.logits(hidden, pix)[l], base[l])
    for l in range(3, 5):
        assert torch.equal(heads.logits(hidden, sem)[l], base[l])
    # and the semantic codes' loss sends no gradient into the pixel head
    heads.zero_grad()
    sum(F.cross_entropy(x, codes[:, l]) for l, x in enumerate(heads.logits(hidden, codes)[:3])).backward()
    assert all(p.grad is None for p in heads.groups[1].parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in heads.groups[0].parameters())


def test_dualtoken_real_shapes():
    """DualToken's setting: L = 16 codes per position, groups (8, 8), 8 semantic then 8 pixel residual codes over
    the codebook sizes of tokenizer/dualtoken's 384 defaults (16,384 each: the paper gives none), 3 layers per
    head. A narrow width keeps it cheap."""
    real = DualTokenConfig()
    vocabs = (real.sem_codebook_size,) * real.depth + (real.pix_codebook_size,) * real.depth
    torch.manual_seed(0)
    heads = DepthHeads(64, vocabs, (real.depth, real.depth), layers=3, width=32, heads=2)
    assert len(heads.groups) == 2 and all(len(g.blocks) == 3 and len(g.classifiers) == 8 for g in heads.groups)
    assert [c.out_features for g in heads.groups for c in g.classifiers] == list(vocabs)
    hidden, codes = torch.randn(3, 64), _codes(3, vocabs)
    loss = heads.loss(hidden, codes)
    assert loss.shape == (3,) and torch.isfinite(loss).all()
    assert loss.mean().item() == pytest.approx(sum(math.log(v) for v in vocabs), rel=0.05)  # ~uniform at init
    out = heads.sample(hidden, lambda logits, l: torch.multinomial(logits.softmax(-1), 1)[:, 0])
    assert out.shape == (3, 16) and out.dtype == torch.long
    assert (out < torch.tensor(vocabs)).all() and (out >= 0).all()


def test_bad_groups_are_refused():
    with pytest.raises(ValueError, match="code_groups"):
        DepthHeads(8, (4, 4, 4), (2, 2))


def test_no_visual_targets_still_reaches_every_parameter():
    """A batch without visual targets (M = 0): loss [0], and every parameter gets a (zero) gradient, so ZeRO-3
    ranks gather and reduce the same parameters whatever their batches hold."""
    heads = _heads().train()
    loss = heads.loss(torch.randn(0, 32, requires_grad=True), torch.zeros(0, len(VOCABS), dtype=torch.long))
    assert loss.shape == (0,)
    loss.sum().backward()
    for name, p in heads.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() == 0, name


def test_bad_codes_are_refused():
    heads = _heads()
    codes = _codes(2)
    codes[1, 2] = -1  # a position that is not visual
    with pytest.raises(ValueError, match="-1"):
        heads.loss(torch.randn(2, 32), codes)
    with pytest.raises(ValueError, match="5 codes"):
        heads.loss(torch.randn(2, 32), codes[:, :4])


# -- the MLLM with depth heads, end to end, on a small genuine L > 1 tokenizer ------------------------------------
@pytest.fixture
def rq_kind(monkeypatch, tmp_path):
    """tests/test_kinds.py's patch residual VQ (L = 4, code_groups (2, 2), 2 x 2 positions) registered as a kind
    and saved; (tokenizer, its directory)."""
    from semhitok.tokenizer.kinds import KINDS

    monkeypatch.setitem(KINDS, PatchRVQ.kind, f"{KINDS_MODULE}:PatchRVQ")
    torch.manual_seed(0)
    tok = PatchRVQ(image_size=16, patch=8).eval()
    tok.save_pretrained(tmp_path / "rq")
    return tok, tmp_path / "rq"


def _rq_lm(tok, text_tokenizer) -> SemHiTokLM:
    torch.manual_seed(0)
    cfg = MLLMConfig(base_model="random", base_config=TINY_QWEN, attn_implementation="sdpa", depth_layers=2, depth_width=32)
    return SemHiTokLM.build(cfg, tok, text_tokenizer)


def _generation_batch(model, text_tokenizer, caption: str, codes: torch.Tensor) -> dict[str, torch.Tensor]:
    """one generation document (caption -> image codes [g, g, L]) as a packed batch of one row"""
    builder = SequenceBuilder(text_tokenizer, model.layout, model.sequence_config, model.ids)
    doc = builder.generation({"text": caption}, codes.flatten().numpy(), uncond=False)
    labels = torch.from_numpy(doc.labels)[None].clone()
    labels[0, 0] = IGNORE
    return {"input_ids": torch.from_numpy(doc.tokens)[None], "labels": labels,
            "position_ids": torch.arange(len(doc.tokens))[None], "visual_codes": torch.from_numpy(doc.codes)[None]}


def test_mllm_with_depth_heads_trains_saves_and_samples(rq_kind, text_tokenizer, tmp_path):
    tok, tok_dir = rq_kind
    model = _rq_lm(tok, text_tokenizer)
    assert isinstance(model.visual_head, DepthHeads) and model.layout.visual_vocab_size == 1
    assert model.visual_head.code_groups == (2, 2) and len(model.visual_head.groups[0].blocks) == 2
    colours = torch.tensor([[0.8, -0.6, 0.1], [-0.7, 0.5, 0.6], [0.2, 0.9, -0.8], [-0.3, -0.9, -0.5]])  # one per patch
    images = F.interpolate(colours.T.reshape(1, 3, 2, 2), size=16, mode="nearest")
    codes = tok.encode(images)[0]  # [2, 2, 4]
    assert len(set(map(tuple, codes.view(4, 4).tolist()))) == 4  # four distinct positions
    batch = _generation_batch(model, text_tokenizer, "a red square", codes)

    # the loss: the flat head's CE everywhere supervised + the depth heads' summed code NLL at the visual targets
    # (each position counted once in the mean)
    out = model(**batch)
    with torch.no_grad():
        hidden = model.hidden_states(batch["input_ids"], batch["position_ids"], visual_codes=batch["visual_codes"]).last_hidden_state[0, :-1]
        targets = batch["labels"][0, 1:]
        sup = targets != IGNORE
        visual = targets == model.layout.visual_offset
        flat = F.cross_entropy(model.logits(hidden[sup]), targets[sup], reduction="sum")
        depth = model.visual_head.loss(hidden[visual], batch["visual_codes"][0, 1:][visual]).sum()
    assert visual.sum() == 4
    torch.testing.assert_close(out["loss"], (flat + depth) / sup.sum(), atol=1e-5, rtol=1e-5)

    # overfit the one document, then greedy decoding through the depth heads gives back the image's codes
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(25):
        loss = model(**batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5, loss.item()
    model.eval()

    # the held-out conditioning gaps score L > 1 images too: the trained pair's visual targets are all hits
    other = tok.encode(-images)[0]
    pairs = HeldoutPairs(["a red square", "a blue sky"], torch.stack([codes, other]))
    builder = SequenceBuilder(text_tokenizer, model.layout, model.sequence_config, model.ids)
    gen_loss, gen_acc = score(model, documents(builder, pairs, "generation", "true"))
    assert gen_acc[0] == 1.0 and gen_loss[0] < 0.5, (gen_acc, gen_loss)
    gaps = flat_metrics(conditioning_gaps(model, builder, pairs))
    assert {"understanding_gap_shuffled", "generation_gap_uncond"} <= set(gaps) and all(map(math.isfinite, gaps.values()))
    model.save_pretrained(tmp_path / "lm", text_tokenizer, tok_dir)
    meta = json.loads((tmp_path / "lm" / "semhitok_mllm.json").read_text())
    assert meta["visual_head"]["code_groups"] == [2, 2] and (tmp_path / "lm" / "visual_head.safetensors").is_file()

    decoder, visual = load_sampler(tmp_path / "lm", "cpu")
    assert isinstance(visual, PatchRVQ)
    for name, p in model.visual_head.state_dict().items():  # the export holds the trained heads
        assert torch.equal(decoder.model.visual_head.state_dict()[name], p), name
    torch.testing.assert_close(decoder.model(**batch)["loss"], model(**batch)["loss"])
    greedy = decoder.image_ids(["a red square"], SamplingConfig(cfg_scale=1.0, temperature=0.0))
    assert greedy.shape == (1, 2, 2, 4)
    assert torch.equal(greedy[0], codes), (greedy[0], codes)

    # CFG 3 with sampling: the KV-cached loop equals the whole-sequence reference, and images decode
    sampling = SamplingConfig(cfg_scale=3.0, temperature=1.0, top_k=3, seed=7)
    cached = decoder.image_ids(["a red square", "a blue sky"], sampling)
    assert torch.equal(cached, reference_image_ids(decoder, ["a red square", "a blue sky"], sampling))
    assert all((cached[..., l] < v).all() for l, v in enumerate(tok.code_vocab_sizes)) and (cached >= 0).all()
    grid = sample_images(decoder, visual, ["a red square"], tmp_path / "samples", sampling)
    assert grid.is_file() and (tmp_path / "samples" / "images" / "00000_0.png").is_file()
    # understanding reads an L > 1 image through the adapter (its codes travel beside the placeholders)
    reply = decoder.answer([("user", "<image>\nWhat is this?")], codes, SamplingConfig(temperature=0.0), max_new_tokens=4)
    assert isinstance(reply, str)


def test_real_dualtoken_through_the_mllm(text_tokenizer, tmp_path):
    """The real DualToken (tiny preset: random 3-layer tower, 8 x 8 positions, depth 8, 256 codes per depth) as
    the MLLM's tokenizer: the depth heads follow its ids, one training step reaches them, the export reloads
    them, and CFG 3 sampling (the paper's) gives ids its decoder turns into images."""
    cfg = tiny_config(tmp_path / "run").dualtoken
    torch.manual_seed(0)
    tok = DualToken.from_teacher(cfg, load_teacher(cfg))
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    tok.train().quantize(images)  # fit the codebooks once
    tok.eval().save_pretrained(tmp_path / "dualtoken")
    codes = tok.encode(images)  # [2, 8, 8, 16]
    model = _rq_lm(tok, text_tokenizer)
    assert model.visual_head.code_groups == (8, 8) and model.visual_head.code_vocab_sizes == (256,) * 16
    assert [len(g.classifiers) for g in model.visual_head.groups] == [8, 8]

    batch = _generation_batch(model, text_tokenizer, "a photo", codes[0])
    assert (batch["labels"] == model.layout.visual_offset).sum() == 64
    model.train()
    out = model(**batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and all(p.grad is not None for p in model.visual_head.parameters())
    model.eval().save_pretrained(tmp_path / "lm", text_tokenizer, tmp_path / "dualtoken")
    decoder, visual = load_sampler(tmp_path / "lm", "cpu")
    assert isinstance(visual, DualToken)
    torch.testing.assert_close(decoder.model(**batch)["loss"], model(**batch)["loss"])
    ids = decoder.image_ids(["a photo"], SamplingConfig(cfg_scale=3.0, temperature=1.0, seed=1))
    assert ids.shape == (1, 8, 8, 16) and (ids >= 0).all() and (ids < 256).all()
    assert visual.decode(ids).shape == (1, 3, 64, 64)
    # understanding: a greedy answer about a DualToken image (the decoding steps embed text tokens only)
    reply = decoder.answer([("user", "<image>\nWhat is this?")], codes[0], SamplingConfig(temperature=0.0), max_new_tokens=4)
    assert isinstance(reply, str)
