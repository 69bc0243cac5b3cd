"""tokenizer.kind: the stack takes any VisualTokenizer (tokenizer/interface.py).

Two small, real tokenizers live here (not mocks of the project's classes): a patch-linear VQ with one flat id per
position (L == 1, optionally with contextual features like TokLIP's) and a patch-linear residual VQ with two
residual stacks of two codes each (L == 4, code_groups (2, 2), like DualToken's layout). Each is registered as
a kind, then driven through load_visual_tokenizer, pre-tokenization, the packed loader and one MLLM training
step; the loader refuses a corpus whose manifest disagrees with the model.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from semhitok.data_pipelines.config import MixtureComponent, PretokenizeConfig, SequenceConfig, SourceConfig
from semhitok.data_pipelines.loader import PackedLoader
from semhitok.data_pipelines.pretokenize import load_shard, run_pretokenize
from semhitok.data_pipelines.sequences import IGNORE
from semhitok.data_pipelines.text_tokenizer import TokenLayout
from semhitok.mllm.config import MLLMConfig, SamplingConfig
from semhitok.mllm.model import SemHiTokLM
from semhitok.mllm.sample import Decoder
from semhitok.tokenizer import interface, kinds as kind_registry
from semhitok.tokenizer.interface import IdStructure, VisualFeatures, load_visual_tokenizer
from semhitok.tokenizer.vit import patchify, unpatchify
from tests.conftest import SAMPLE, TINY_QWEN, tiny_config
from tests.mllm.reference_decoder import reference_image_ids

HERE = "tests.test_kinds"


class CodeSumFeatures(VisualFeatures):
    """ids [n, N, L] -> per residual stack the sum of its code vectors, stacks concatenated: [n, N, groups * dim].
    contextual: each position also averages the features of the positions before it (causal, like TokLIP's)."""

    def __init__(self, codebooks: torch.Tensor, groups: tuple[int, ...], contextual: bool):
        super().__init__()
        self.register_buffer("codebooks", codebooks.detach().clone())  # [L, V, dim]
        self.groups, self.contextual = groups, contextual
        self.splits, self.per_id = (len(groups) * codebooks.shape[2],), not contextual

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        vecs = torch.stack([self.codebooks[l][ids[..., l]] for l in range(ids.shape[-1])], dim=-2)  # [n, N, L, dim]
        x = torch.cat([g.sum(-2) for g in vecs.split(list(self.groups), dim=-2)], dim=-1)
        if self.contextual:
            x = x.cumsum(1) / torch.arange(1, x.shape[1] + 1, device=x.device)[None, :, None]
        return x

    def table(self) -> torch.Tensor:
        if self.contextual or self.codebooks.shape[0] != 1:
            raise NotImplementedError("no per-id table")
        return self.codebooks[0]


class PatchVQ(nn.Module):
    """Patches -> linear -> residual VQ over L codebooks (L == 1: plain VQ) -> sum of codes -> linear -> patches."""

    kind: ClassVar[str] = "test_vq"

    def __init__(self, image_size: int = 32, patch: int = 8, dim: int = 8, vocab: int = 16, groups: tuple[int, ...] = (1,),
                 contextual: bool = False):
        super().__init__()
        self.config = dict(image_size=image_size, patch=patch, dim=dim, vocab=vocab, groups=list(groups), contextual=contextual)
        self.image_size, self.patch, self.grid, self.groups = image_size, patch, image_size // patch, tuple(groups)
        self.to_code = nn.Linear(3 * patch * patch, dim)
        self.codebooks = nn.Parameter(torch.randn(sum(groups), vocab, dim) * 0.5)
        self.to_pixels = nn.Linear(dim, 3 * patch * patch)

    @property
    def code_vocab_sizes(self) -> tuple[int, ...]:
        return (self.codebooks.shape[1],) * self.codebooks.shape[0]

    @property
    def code_groups(self) -> tuple[int, ...]:
        return self.groups

    @property
    def device(self) -> torch.device:
        return self.codebooks.device

    def quantize(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, 3, H, W] -> (codes [B, N, L], quantized sum [B, N, dim])"""
        residual = self.to_code(patchify(images, self.patch))
        codes, total = [], torch.zeros_like(residual)
        for book in self.codebooks:
            idx = torch.cdist(residual, book[None].expand(len(residual), -1, -1)).argmin(-1)
            codes.append(idx)
            residual, total = residual - book[idx], total + book[idx]
        return torch.stack(codes, -1), total

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        codes = self.quantize(images)[0].view(len(images), self.grid, self.grid, -1)
        return codes[..., 0] if codes.shape[-1] == 1 else codes

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        codes = ids.reshape(len(ids), self.grid * self.grid, -1)
        vecs = sum(self.codebooks[l][codes[..., l]] for l in range(codes.shape[-1]))
        return unpatchify(self.to_pixels(vecs), self.patch, self.grid).clamp(-1, 1)

    def input_features(self) -> CodeSumFeatures:
        return CodeSumFeatures(self.codebooks.detach().cpu().float(), self.groups, self.config["contextual"]).requires_grad_(False)

    def save_pretrained(self, path) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(Path(path) / "model.safetensors"))
        (Path(path) / "config.json").write_text(json.dumps({"model_type": self.kind, **self.config}))

    @classmethod
    def from_pretrained(cls, path, device="cpu"):
        meta = json.loads((Path(path) / "config.json").read_text())
        assert meta.pop("model_type") == cls.kind
        model = cls(**meta)
        model.load_state_dict(load_file(str(Path(path) / "model.safetensors")))
        return model.to(device).eval()


class PatchRVQ(PatchVQ):
    kind: ClassVar[str] = "test_rvq"

    def __init__(self, groups: tuple[int, ...] = (2, 2), **kw):
        super().__init__(groups=groups, **kw)


class PerCodeHead(nn.Module):
    """A minimal visual head for L > 1: one linear classifier per code, summed NLL per position."""

    def __init__(self, d: int, vocab: tuple[int, ...]):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(d, v) for v in vocab)

    def loss(self, hidden: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:  # [M, d], [M, L] -> [M]
        return sum(nn.functional.cross_entropy(h(hidden), codes[:, l], reduction="none") for l, h in enumerate(self.heads))


# -- the kinds' trainer (TRAINERS): a few reconstruction steps on the configured images --------------------------
def final_dir(cfg) -> Path:
    return Path(cfg.run_dir) / "tokenizer" / "final"


def train(cfg) -> Path:
    from semhitok.tokenizer import iter_image_batches, list_images

    torch.manual_seed(0)
    model = (PatchRVQ if cfg.tokenizer.kind == "test_rvq" else PatchVQ)()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _, images in iter_image_batches(list_images(cfg.tokenizer_train.train_data)[:16], model.image_size, 8):
        codes, total = model.quantize(images)
        z = model.to_code(patchify(images, model.patch))
        recon = unpatchify(model.to_pixels(z + (total - z).detach()), model.patch, model.grid)
        loss = (recon - images).pow(2).mean() + (total - z.detach()).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(final_dir(cfg))
    return final_dir(cfg)


@pytest.fixture
def kinds(monkeypatch):
    """Both test kinds registered (KINDS, TRAINERS, PAPER_CFG_SCALE) for the length of one test."""
    for kind, cls in (("test_vq", "PatchVQ"), ("test_rvq", "PatchRVQ")):
        monkeypatch.setitem(kind_registry.KINDS, kind, f"{HERE}:{cls}")
        monkeypatch.setitem(kind_registry.TRAINERS, kind, (f"{HERE}:train", f"{HERE}:final_dir"))
        monkeypatch.setitem(kind_registry.PAPER_CFG_SCALE, kind, 1.5)


def pretokenize(tokenizer_dir: Path, out: Path) -> Path:
    cfg = PretokenizeConfig(sources=[SourceConfig("coco_captions", "caption_jsonl", str(SAMPLE / "train.jsonl")),
                                     SourceConfig("coco_text", "text_jsonl", str(SAMPLE / "text.jsonl"))],
                            records_per_shard=32, batch_size=16, num_workers=0)
    run_pretokenize(cfg, tokenizer_dir, out)
    return out


SEQ = SequenceConfig(mixture=[MixtureComponent("coco_captions", "generation"), MixtureComponent("coco_captions", "understanding"),
                              MixtureComponent("coco_text", "text", 0.5)], max_length=160, micro_batch_size=2, prefetch=0)


def test_the_registries_pick_the_kind_everywhere(kinds, tmp_path, capsys):
    """`semhitok tokenizer train` runs tokenizer.kind's registered trainer; Config.tokenizer_dir is its final_dir;
    load_visual_tokenizer and `semhitok tokenizer encode` load it by the kind its directory declares."""
    from semhitok.cli import main

    overrides = ["--config", "tiny", f"run_dir={tmp_path}", "tokenizer.kind=test_rvq", f"tokenizer_train.train_data=[{SAMPLE / 'train.jsonl'}]"]
    assert main(["tokenizer", "train", *overrides]) == 0
    cfg = tiny_config(tmp_path, "tokenizer.kind=test_rvq")
    assert cfg.tokenizer_dir == tmp_path / "tokenizer" / "final" and (cfg.tokenizer_dir / "model.safetensors").is_file()
    tok = load_visual_tokenizer(cfg.tokenizer_dir)
    assert isinstance(tok, PatchRVQ) and isinstance(tok, interface.VisualTokenizer)
    assert main(["tokenizer", "encode", "--model", str(cfg.tokenizer_dir), str(SAMPLE / "holdout.jsonl"), "--out", str(tmp_path / "ids.npz")]) == 0
    ids = np.load(tmp_path / "ids.npz")["ids"]
    assert ids.shape[1:] == (4, 4, 4) and ids.min() >= 0 and ids.max() < 16
    assert main(["tokenizer", "train", "--stage", "1", *overrides]) == 2  # --stage is SemHiTok's
    assert "trains all its stages" in capsys.readouterr().err
    with pytest.raises(Exception, match="not a known tokenizer kind"):
        tiny_config(tmp_path, "tokenizer.kind=nonesuch")


def test_semhitok_implements_the_interface(trained_tokenizer):
    from semhitok.tokenizer import SemHiTok

    tok = load_visual_tokenizer(trained_tokenizer)
    assert isinstance(tok, SemHiTok) and isinstance(tok, interface.VisualTokenizer)
    assert tok.code_vocab_sizes == (tok.vocab_size,) and tok.code_groups == (1,)
    feats = tok.input_features()
    sem, pix = tok.code_features()
    assert feats.per_id and feats.splits == (sem.shape[1], pix.shape[1])
    h = torch.tensor([[[0], [tok.vocab_size - 1]]])  # [1, 2, 1]
    m = tok.codes_per_group
    torch.testing.assert_close(feats(h)[0, 1], torch.cat([sem[(tok.vocab_size - 1) // m], pix[-1]]))
    torch.testing.assert_close(feats.table()[h[0, :, 0]], feats(h)[0])


@pytest.mark.parametrize("kind", ["test_vq", "test_rvq"])
def test_pretokenize_loader_and_one_training_step(kind, kinds, text_tokenizer, tmp_path):
    cfg = tiny_config(tmp_path, f"tokenizer.kind={kind}", f"tokenizer_train.train_data=[{SAMPLE / 'train.jsonl'}]")
    tok_dir = train(cfg)
    tok = load_visual_tokenizer(tok_dir)
    ids = IdStructure.of(tok)
    L, N = ids.codes, ids.positions
    pretok = pretokenize(tok_dir, tmp_path / "pretok")
    manifest = json.loads((pretok / "manifest.json").read_text())
    assert (manifest["kind"], manifest["code_vocab_sizes"], manifest["code_groups"]) == (kind, list(tok.code_vocab_sizes), list(tok.code_groups))
    assert manifest["visual_vocab_size"] == (16 if L == 1 else 1)
    shard = next(f for f in (pretok / "shards").glob("coco_captions-*.npz"))
    rows, meta = load_shard(shard)
    assert rows.shape[1] == N * L  # position-major, code-minor
    first = next(m for m in meta if m["ids_row"] >= 0)
    image = torch.from_numpy(rows[first["ids_row"]].astype(np.int64)).view(1, tok.grid, tok.grid, *([L] if L > 1 else []))
    assert image.shape[1:3] == (4, 4)

    torch.manual_seed(0)
    model = SemHiTokLM.build(MLLMConfig(base_model="random", base_config=TINY_QWEN), tok, text_tokenizer, SEQ)
    assert model.layout.visual_vocab_size == (16 if L == 1 else 1) and model.ids == ids
    loader = PackedLoader(SEQ, text_tokenizer, model.layout, pretok, ids=model.ids)
    batch = loader.next_batch()
    visual = batch["input_ids"] >= model.layout.visual_offset
    assert visual.any()
    if L == 1:
        assert "visual_codes" not in batch
    else:  # one placeholder token per position, its L codes beside it; labels predict the placeholder
        codes = batch["visual_codes"]
        assert codes.shape == (*batch["input_ids"].shape, L)
        assert (batch["input_ids"][visual] == model.layout.visual_offset).all()
        assert ((codes >= 0).all(-1) == visual).all() and (codes[~visual] == -1).all()
        supervised = batch["labels"] >= model.layout.visual_offset
        assert (batch["labels"][supervised] == model.layout.visual_offset).all()
        # each image's N x L codes are one shard row, in order
        shard_rows = {tuple(r) for s in (pretok / "shards").glob("*.npz") for r in load_shard(s)[0].tolist()}
        assert all(tuple(r) in shard_rows for r in codes[visual].view(-1, N * L).tolist())

    if L > 1:  # the hook mllm/depth_head.py plugs into: its per-position loss over the L codes joins the loss
        assert type(model.visual_head).__name__ == "DepthHeads"  # what build() swaps in for L > 1
        model.visual_head = None
        flat = model(**{k: batch[k] for k in ("input_ids", "position_ids", "labels", "visual_codes")})["loss"]
        model.visual_head = PerCodeHead(TINY_QWEN["hidden_size"], tok.code_vocab_sizes)
        mask = batch["labels"][:, 1:] == model.layout.visual_offset  # the positions before a visual target
        targets = batch["visual_codes"][:, 1:][mask]
        assert len(targets) == (batch["labels"] == model.layout.visual_offset).sum() and (targets >= 0).all()
        hidden = model.hidden_states(batch["input_ids"], batch["position_ids"], visual_codes=batch["visual_codes"]).last_hidden_state
        extra = model.visual_head.loss(hidden[:, :-1][mask], targets).sum() / (batch["labels"][:, 1:] != IGNORE).sum()
        with_head = model(**{k: batch[k] for k in ("input_ids", "position_ids", "labels", "visual_codes")})["loss"]
        torch.testing.assert_close(with_head, flat + extra)

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    before = {k: v.clone() for k, v in model.adapter.state_dict().items()}
    inputs = {k: batch[k] for k in ("input_ids", "position_ids", "labels", "task_ids", "visual_codes") if k in batch}
    out = model(**inputs)
    assert torch.isfinite(out["loss"]) and out["task_tokens"].sum() == (batch["labels"][:, 1:] != IGNORE).sum()
    out["loss"].backward()
    opt.step()
    after = model.adapter.state_dict()
    assert torch.equal(after["features.codebooks"], before["features.codebooks"])  # frozen
    assert not torch.equal(after["split0_mlp.0.weight"], before["split0_mlp.0.weight"])  # trained


def test_loader_refuses_a_manifest_of_another_kind_or_depth(kinds, text_tokenizer, tmp_path):
    cfg = tiny_config(tmp_path, "tokenizer.kind=test_vq", f"tokenizer_train.train_data=[{SAMPLE / 'train.jsonl'}]")
    pretok = pretokenize(train(cfg), tmp_path / "pretok")
    model_ids = IdStructure("test_vq", 4, (16,), (1,))
    layout = TokenLayout.from_tokenizer(text_tokenizer, 16)
    PackedLoader(SEQ, text_tokenizer, layout, pretok, ids=model_ids).next_batch()  # agrees: fine
    for other, what in ((IdStructure("semhitok", 4, (16,), (1,)), "kind"), (IdStructure("test_vq", 4, (32,), (1,)), "code_vocab_sizes")):
        with pytest.raises(ValueError, match=f"manifest.json: {what} .* does not match the model's"):
            PackedLoader(SEQ, text_tokenizer, layout, pretok, ids=other)
    one_row = dataclasses.replace(layout, visual_vocab_size=1)  # a depth-4 model reading a flat corpus
    manifest = json.loads((pretok / "manifest.json").read_text())
    (pretok / "manifest.json").write_text(json.dumps({**manifest, "visual_vocab_size": 1}))
    with pytest.raises(ValueError, match="codes per position 1 does not match the model's 4"):
        PackedLoader(SEQ, text_tokenizer, one_row, pretok, ids=IdStructure("test_vq", 4, (16,) * 4, (2, 2)))


def test_contextual_features_see_whole_images_and_exports_reload(kinds, text_tokenizer, tmp_path):
    """per_id False: the adapter receives each image's N positions together, also when packed with others; the
    export rebuilds the features module from its visual_tokenizer/ copy."""
    torch.manual_seed(0)
    tok = PatchVQ(contextual=True)
    tok.save_pretrained(tmp_path / "tok")
    model = SemHiTokLM.build(MLLMConfig(base_model="random", base_config=TINY_QWEN), tok, text_tokenizer, SEQ)
    off, n = model.layout.visual_offset, tok.grid ** 2
    a, b = torch.randint(0, 16, (n,)), torch.randint(0, 16, (n,))
    text = torch.tensor([5, 6])
    row = torch.cat([text, a + off, text, b + off, text])[None]  # two images in one packed row
    emb = model.embed(row)
    torch.testing.assert_close(emb[0, 2 : 2 + n], model.adapter.images(a.view(1, n, 1))[0])
    torch.testing.assert_close(emb[0, 4 + n : 4 + 2 * n], model.adapter.images(b.view(1, n, 1))[0])
    assert not torch.allclose(emb[0, 4 + n : 4 + 2 * n], model.adapter.images(torch.cat([a, b]).view(1, 2 * n, 1))[0, n:])
    head = model.lm.lm_head.weight.detach()  # random visual rows at the text rows' mean norm
    text_norm = head[: model.layout.text_vocab_size].norm(dim=1).mean()
    torch.testing.assert_close(head[off:].norm(dim=1), text_norm.expand(16))
    model.save_pretrained(tmp_path / "mllm", text_tokenizer, tmp_path / "tok")
    again = SemHiTokLM.from_pretrained(tmp_path / "mllm")
    assert again.ids == model.ids and not again.adapter.features.per_id
    torch.testing.assert_close(again.embed(row), emb)
    # sampling: a cached step feeds the image generated so far to the features, as the full recomputation does
    with torch.no_grad():  # sharp visual logits: a changed input embedding changes the sampled ids
        again.lm.lm_head.weight[off:] *= 300
    decoder = Decoder(again, text_tokenizer)
    sampling = SamplingConfig(cfg_scale=2.0, temperature=30.0, seed=3)  # varied ids, each draw still input-sensitive
    captions = ["a dog on a beach", "two cats", "a red bus", "a plate of food"]
    cached = decoder.image_ids(captions, sampling)
    assert cached.shape == (4, tok.grid, tok.grid) and len(cached.unique()) > 4
    torch.testing.assert_close(reference_image_ids(decoder, captions, sampling), cached)
