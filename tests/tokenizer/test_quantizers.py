import torch

from semhitok.tokenizer.quantizers import EMACodebook, HierarchicalCodebook, l2norm, spherical_kmeans


def test_kmeans_finds_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centers = l2norm(torch.randn(4, 8, generator=g))
    x = l2norm(centers.repeat_interleave(50, 0) + 0.01 * torch.randn(200, 8, generator=g))
    found = spherical_kmeans(x, 4, iters=10, generator=g)
    # every true centre has a found centroid within cosine 0.99
    assert ((centers @ found.t()).max(dim=1).values > 0.99).all()


def test_ema_codebook_initialises_updates_and_restarts_dead_codes():
    torch.manual_seed(0)
    cb = EMACodebook(num_codes=16, dim=8, decay=0.9, dead_threshold=0.5, kmeans_iters=5).train()
    z = l2norm(torch.randn(64, 8))
    q, idx, commit = cb(z)
    assert bool(cb.initialized)
    assert q.shape == z.shape and idx.shape == (64,) and idx.max() < 16
    assert torch.allclose(cb.embed.norm(dim=1), torch.ones(16), atol=1e-5)
    # straight-through: values are the codes, gradient reaches z
    zz = z.clone().requires_grad_(True)
    q, idx, commit = cb(zz)
    (q.sum() + commit).backward()
    assert zz.grad is not None and zz.grad.abs().sum() > 0
    # a code nobody picks decays below the threshold and is restarted from current features
    cb.cluster_size[3] = 0.0
    before = cb.embed[3].clone()
    cb(l2norm(torch.randn(64, 8)))
    assert not torch.equal(cb.embed[3], before) and cb.cluster_size[3] >= 0.5


def test_eval_mode_leaves_codebook_untouched():
    cb = EMACodebook(16, 8, 0.9, 0.01, 3).train()
    cb(l2norm(torch.randn(32, 8)))
    cb.eval()
    state = {k: v.clone() for k, v in cb.state_dict().items()}
    cb(l2norm(torch.randn(32, 8)))
    assert all(torch.equal(state[k], v) for k, v in cb.state_dict().items())


def test_hierarchical_quantization_stays_inside_the_semantic_group():
    torch.manual_seed(0)
    hc = HierarchicalCodebook(num_groups=5, codes_per_group=3, dim=4)
    z = torch.randn(40, 4)
    sem = torch.randint(5, (40,))
    q, pix, loss = hc(z, sem, beta=0.25)
    assert pix.min() >= 0 and pix.max() < 3
    # brute force over the whole group of each patch agrees, and q is that group's code
    codes = l2norm(hc.codes)
    for n in range(40):
        sims = codes[sem[n]] @ l2norm(z[n])
        assert pix[n] == sims.argmax()
        assert torch.allclose(q[n], codes[sem[n], pix[n]], atol=1e-5)
    # a code of another group is never chosen even when it is closer
    hc.codes.data[0] = l2norm(z[0]).repeat(3, 1) * -1  # group 0: the worst possible codes
    hc.codes.data[1, 0] = l2norm(z[0])  # group 1: a perfect code
    q, pix, _ = hc(z[:1], torch.tensor([0]), beta=0.25)
    assert torch.allclose(q[0], l2norm(hc.codes[0, pix[0]]), atol=1e-5)
    loss.backward()
    assert hc.codes.grad is not None


def test_hierarchical_restart_revives_dead_codes_from_their_own_group():
    """Codes no patch picks take features of their group's patches (in training, trainable codebook only)."""
    torch.manual_seed(0)
    hc = HierarchicalCodebook(num_groups=3, codes_per_group=4, dim=8, restart=True).train()
    z = torch.randn(64, 8)
    sem = torch.zeros(64, dtype=torch.long)  # every patch in group 0
    before = hc.codes.detach().clone()
    _, pix, _ = hc(z, sem, beta=0.25)
    assert torch.equal(hc.codes[1:], before[1:])  # unseen groups untouched
    moved = (hc.codes[0] != before[0]).any(dim=1)
    assert moved.sum() == 4 - len(pix.unique())  # exactly the codes nobody chose were restarted
    zn = torch.nn.functional.normalize(z, dim=-1)
    for j in moved.nonzero().flatten():  # each restarted code is one of the group's features
        assert torch.isclose(zn, hc.codes[0, j].expand_as(zn), atol=1e-6).all(dim=1).any()
    frozen = HierarchicalCodebook(3, 4, 8, restart=True).train().requires_grad_(False)
    kept = frozen.codes.detach().clone()
    frozen(z, sem, beta=0.25)
    assert torch.equal(frozen.codes, kept)  # a frozen codebook keeps every id


def test_hierarchical_without_semantic_ids_is_one_shared_codebook():
    """sem_idx None ("w/o sem"): the nearest of all K*m codes, its flat index the id; restarts over every code."""
    torch.manual_seed(0)
    hc = HierarchicalCodebook(num_groups=3, codes_per_group=4, dim=8)
    z = torch.randn(32, 8, requires_grad=True)
    q, idx, loss = hc(z, None, beta=0.25)
    flat = l2norm(hc.codes.detach().flatten(0, 1))  # [12, 8]
    assert torch.equal(idx, (l2norm(z.detach()) @ flat.t()).argmax(1))
    assert idx.max() >= 4  # the search reaches beyond the first group
    assert torch.allclose(q, flat[idx], atol=1e-5)
    assert torch.allclose(hc.lookup(idx // 4, idx % 4), flat[idx])  # the flat id decodes as group * m + code
    loss.backward()
    assert hc.codes.grad is not None and hc.codes.grad.flatten(0, 1)[idx].abs().sum() > 0
    restart = HierarchicalCodebook(3, 4, 8, restart=True).train()
    before = restart.codes.detach().clone()
    _, idx, _ = restart(z.detach()[:2], None, beta=0.25)  # 2 patches: at most 2 codes chosen, the other 10 dead
    moved = (restart.codes != before).any(dim=-1).flatten()
    assert moved.sum() == 12 - len(idx.unique()) and not moved[idx].any()
