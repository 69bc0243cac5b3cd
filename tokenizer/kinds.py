"""The tokenizer kinds' registry: kind -> its class, its trainer and its paper's CFG scale, as "module:name"
strings imported on first use (so the table, and the configs that read it, import no torch)."""

from __future__ import annotations

import importlib
from collections.abc import Callable

# kind -> "module:Class" (imported on first use, so a kind's dependencies load only when it is used)
KINDS: dict[str, str] = {
    "semhitok": "semhitok.tokenizer.semhitok.model:SemHiTok",
    "toklip": "semhitok.tokenizer.toklip.model:TokLIP",
    "dualtoken": "semhitok.tokenizer.dualtoken.model:DualToken",
}


# kind -> "module:function" pairs of its training entry points, both taking the whole run config
# (semhitok.config.Config): train(cfg) -> Path runs every stage of that kind under <run_dir>/tokenizer/
# (resumable, skipping finished stages) and returns the finished tokenizer directory; final_dir(cfg) -> Path
# names that directory without training (what pre-tokenization and the MLLM consume).
TRAINERS: dict[str, tuple[str, str]] = {
    "semhitok": ("semhitok.tokenizer.semhitok.train:train_all", "semhitok.tokenizer.semhitok.train:final_dir"),
    "toklip": ("semhitok.tokenizer.toklip.train:train", "semhitok.tokenizer.toklip.train:final_dir"),
    "dualtoken": ("semhitok.tokenizer.dualtoken.train:train", "semhitok.tokenizer.dualtoken.train:final_dir"),
}


# kind -> the classifier-free guidance scale its paper samples images at: the default of `eval.sampling.cfg_scale`
# for a config of that tokenizer.kind (semhitok.config) and of `semhitok sample` / `chat` for a model of that kind.
#   semhitok: 2 (arXiv 2503.06764, sec. 4.1: "classifier-free guidance, with a scale factor of 2");
#   dualtoken: 3 (arXiv 2503.14324, sec. 4.1: "a CFG value of 3");
#   toklip: 2.5 (arXiv 2505.05422, sec. 4.4: cfg = 2.5, its only generation setting, for class-conditional ImageNet
#   generation with LlamaGen's GPT-B/L; the paper reports no text-to-image CFG).
PAPER_CFG_SCALE: dict[str, float] = {"semhitok": 2.0, "dualtoken": 3.0, "toklip": 2.5}


def paper_cfg_scale(kind: str) -> float:
    """The CFG scale tokenizer kind `kind`'s paper samples at (see PAPER_CFG_SCALE)."""
    if kind not in PAPER_CFG_SCALE:
        raise ValueError(f"tokenizer kind {kind!r} declares no CFG scale (tokenizer.kinds.PAPER_CFG_SCALE holds "
                         f"{', '.join(sorted(PAPER_CFG_SCALE))})")
    return PAPER_CFG_SCALE[kind]


def tokenizer_class(kind: str) -> type:
    if kind not in KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; known: {', '.join(sorted(KINDS))}")
    return _entry(KINDS[kind])


def _entry(spec: str):
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def kind_trainer(kind: str) -> tuple[Callable, Callable]:
    """(train(cfg) -> Path, final_dir(cfg) -> Path) of a kind (see TRAINERS)."""
    if kind not in TRAINERS:
        raise ValueError(f"tokenizer.kind={kind!r} has no trainer; known: {', '.join(sorted(TRAINERS))}")
    return _entry(TRAINERS[kind][0]), _entry(TRAINERS[kind][1])
