"""Depth heads (mllm/depth_head.py): teacher forcing equals step-by-step decoding, overfit + greedy decoding,
independence of the code groups, DualToken's real shapes."""

import pytest
import torch
import torch.nn.functional as F

from semhitok.mllm.depth_head import DepthHeads

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
    """L = 16 codes per position, groups (8, 8): 8 semantic then 8 pixel residual codes. The DualToken paper
    gives no codebook sizes; 16384 (semantic) and 8192 (pixel) here. A narrow width keeps it cheap."""
    vocabs = (16384,) * 8 + (8192,) * 8
    torch.manual_seed(0)
    heads = DepthHeads(64, vocabs, (8, 8), layers=3, width=32, heads=2)
    assert len(heads.groups) == 2 and all(len(g.blocks) == 3 and len(g.classifiers) == 8 for g in heads.groups)
    assert [c.out_features for g in heads.groups for c in g.classifiers] == list(vocabs)
    hidden, codes = torch.randn(3, 64), _codes(3, vocabs)
    loss = heads.loss(hidden, codes)
    assert loss.shape == (3,) and torch.isfinite(loss).all()
    assert loss.mean().item() == pytest.approx(8 * (torch.log(torch.tensor(16384.0)) + torch.log(torch.tensor(8192.0))).item(), rel=0.05)
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
