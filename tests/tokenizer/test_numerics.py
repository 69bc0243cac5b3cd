"""Codebook search precision under autocast, k-means gathering, and the strict perceptual term."""

import json
import sys

import pytest
import torch

from semhitok.config import load_project_config
from semhitok.tokenizer.losses import build_perceptual
from semhitok.tokenizer.quantizers import EMACodebook, HierarchicalCodebook, l2norm, spherical_kmeans

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def near_tie_case(n=2048, k=1024, d=32, seed=0):
    """Unit features and codes with many near-ties: 1024 codes in 32 dims leave the top-2 similarities of
    many features within bf16's resolution (~0.4%)."""
    g = torch.Generator().manual_seed(seed)
    return l2norm(torch.randn(n, d, generator=g)), l2norm(torch.randn(k, d, generator=g))


def test_nearest_code_is_fp32_under_bf16_autocast():
    z, codes = near_tie_case()
    exact = (z.double() @ codes.double().t()).argmax(1)
    with torch.autocast(**BF16):
        naive = (z @ codes.t()).argmax(1)  # what a bf16 search gives
    assert (naive != exact).sum() > 0, "the case must contain argmaxes that flip in bf16"
    cb = EMACodebook(1024, 32, 0.99, 0.0, 1)
    cb.embed.copy_(codes)
    cb.initialized.fill_(True)
    with torch.autocast(**BF16):
        assert torch.equal(cb.nearest(z), exact)
        cb.train()
        _, idx, _ = cb(z)  # stage 1's training path
    assert torch.equal(idx, exact)


def test_pixel_search_is_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    n, groups, m, d = 4096, 4, 64, 8  # many codes per group in few dims: near-ties
    hc = HierarchicalCodebook(groups, m, d)
    z, sem = torch.randn(n, d), torch.randint(groups, (n,))
    codes = l2norm(hc.codes.detach()).double()
    exact = torch.einsum("nd,nmd->nm", l2norm(z).double(), codes[sem]).argmax(1)
    with torch.autocast(**BF16):
        naive = torch.einsum("nd,nmd->nm", l2norm(z), l2norm(hc.codes)[sem]).argmax(1)
        _, pix, loss = hc(z, sem, beta=0.25)
    assert (naive != exact).sum() > 0 and torch.equal(pix, exact)
    assert loss.dtype == torch.float32


def clustered(centres: torch.Tensor, per: int, g: torch.Generator) -> torch.Tensor:
    return l2norm(centres.repeat_interleave(per, 0) + 1e-3 * torch.randn(len(centres) * per, centres.shape[1], generator=g))


def test_kmeans_waits_for_k_features_gathered_over_batches():
    g = torch.Generator().manual_seed(0)
    centres = l2norm(torch.randn(64, 16, generator=g))
    # 4 batches of 32 features, each from 16 clusters of its own: only the pool of all 4 covers the 64 clusters
    batches = [clustered(centres[16 * i : 16 * (i + 1)], 2, g) for i in range(4)]
    torch.manual_seed(0)
    cb = EMACodebook(64, 16, 0.99, 0.0, 10, kmeans_features=100).train()
    assert cb.kmeans_features == 100
    for z in batches[:3]:  # 32, 64, 96 < 100 features: still gathering, features pass through
        q, idx, commit = cb(z)
        assert not bool(cb.initialized) and torch.equal(q, z) and float(commit) == 0 and idx.shape == (32,)
    cb(batches[3])  # 128 >= 100: k-means over all four batches
    assert bool(cb.initialized)
    best = (centres @ cb.embed.t()).max(dim=1).values
    assert (best > 0.99).all(), "every cluster of every gathered batch has its code"
    assert EMACodebook(64, 16, 0.99, 0.0, 10, kmeans_features=8).kmeans_features == 64  # never below K
    with pytest.raises(ValueError, match="at least k=64"):
        spherical_kmeans(batches[0], 64, 3)


def test_auto_perceptual_is_strict_and_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "lpips", None)  # LPIPS not importable
    for kind in ("auto", "lpips"):
        with pytest.raises(RuntimeError, match="perceptual=semantic") as err:
            build_perceptual(kind, None)
        assert "\n" not in str(err.value)
    assert build_perceptual("semantic", None).kind == "semantic"
    assert build_perceptual("none", None) is None
    assert load_project_config("tiny").tokenizer_train.perceptual == "semantic"
    for preset in ("256", "384"):
        assert load_project_config(preset).tokenizer_train.perceptual == "auto"


def test_stage2_records_the_perceptual_term_that_ran(trained_tokenizer):
    stage2 = trained_tokenizer.parent
    run_config = json.loads((stage2 / "run_config.json").read_text())
    assert run_config["stage"] == 2 and run_config["perceptual"] == "semantic"
    assert run_config["train"]["perceptual"] == "semantic"


@pytest.mark.parametrize("network", ["student", "teacher"])
def test_the_semantic_perceptual_term_reads_the_network_asked_for(trained_tokenizer, network):
    """perceptual_network=teacher: the frozen teacher, one fixed network (the ablations' rows); student: the tokenizer's own."""
    import dataclasses

    from semhitok.tokenizer.semhitok.train import build_task

    stage1 = trained_tokenizer.parent.parent / "stage1" / "final"
    cfg = load_project_config("tiny")
    train = dataclasses.replace(cfg.tokenizer_train, perceptual="semantic", perceptual_network=network)
    task = build_task(2, cfg.tokenizer, train, stage1, torch.device("cpu"), 1)
    assert task.run_info["perceptual_network"] == network
    assert task.perceptual.encoder is (task.teacher if network == "teacher" else task.model.semantic.encoder)
