"""The contract between a visual tokenizer and the rest of the stack.

Pre-tokenization, the sequence builder and loader, the MLLM (its input adapter and its visual head),
sampling, the chat and eval use a tokenizer only through `VisualTokenizer`; `tokenizer.kind` in the config
picks the implementation (SemHiTok, DualToken, TokLIP; tokenizer/kinds.py registers them), and a saved tokenizer directory names its own kind
in config.json (`model_type`), so `load_visual_tokenizer(path)` needs nothing else.

Ids. An image becomes grid x grid positions. Each position holds L codes, one per entry of
`code_vocab_sizes` (code l lies in [0, code_vocab_sizes[l])):
  - L == 1 (SemHiTok: K*m hierarchical ids; TokLIP: VQGAN ids): `encode` gives ids [B, h, w]; the MLLM
    appends code_vocab_sizes[0] rows to its vocabulary and predicts them with its flat head.
  - L > 1 (DualToken: 8 residual semantic codes then 8 residual pixel codes): `encode` gives ids [B, h, w, L];
    in a sequence each position is ONE LLM token and its L codes travel beside it; the MLLM predicts them
    with a depth head (mllm/depth_head.py) instead of vocabulary rows. `code_groups` says how the L codes
    split into residual stacks, e.g. (8, 8): depth-head i predicts codes [sum(groups[:i]), sum(groups[:i+1])).

Understanding. `input_features()` returns a frozen module mapping a whole image's ids to the features an
understanding adapter reads: ids [n, N, L] (n images, N = grid*grid positions) -> [n, N, c]. Its `splits`
partitions the c channels into groups that get one MLP each in the MLLM's adapter (SemHiTok: (semantic,
pixel), the dual MLP; DualToken: one group of semantic+pixel features concatenated on channels; TokLIP:
the token encoder's width). `per_id` is True when a position's features depend on its own ids only (a
lookup: SemHiTok, DualToken) and False when they depend on the whole image (TokLIP's causal token encoder);
with per_id and L == 1, `table()` gives the features of every id, [V, c], which the MLLM uses to initialise
its head rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol, runtime_checkable

import torch
import torch.nn as nn

from semhitok.tokenizer.kinds import KINDS, tokenizer_class
from semhitok.tokenizer.saved import read_meta


class VisualFeatures(nn.Module):
    """Frozen ids -> features module handed to the MLLM adapter (see the module docstring)."""

    splits: tuple[int, ...]  # channel groups, sum == c
    per_id: bool

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # ids [n, N, L] int64 -> [n, N, c] float
        raise NotImplementedError

    def table(self) -> torch.Tensor:  # [V, c]; only when per_id and L == 1
        raise NotImplementedError(f"{type(self).__name__} has no per-id feature table")


@runtime_checkable
class VisualTokenizer(Protocol):
    kind: ClassVar[str]  # "semhitok" | "dualtoken" | "toklip"; also config.json's model_type
    image_size: int  # pixels per side of encode's input and decode's output
    grid: int  # positions per side

    @property
    def code_vocab_sizes(self) -> tuple[int, ...]: ...  # L entries

    @property
    def code_groups(self) -> tuple[int, ...]: ...  # residual stacks, sum == L; (1,) for flat ids

    @property
    def device(self) -> torch.device: ...

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...  # [B, 3, H, W] in [-1, 1] -> [B, h, w] or [B, h, w, L] int64

    def decode(self, ids: torch.Tensor) -> torch.Tensor: ...  # ids as encode gives them -> [B, 3, H, W] in [-1, 1]

    def input_features(self) -> VisualFeatures: ...  # a frozen copy, on CPU, fp32

    def save_pretrained(self, path: str | Path) -> None: ...  # config.json (model_type = kind) + safetensors

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> "VisualTokenizer": ...

    # Optional (eval's comparison table): held-out semantic alignment. images -> (the tokenizer's prediction of
    # its teacher's features from the quantized ids, the teacher's features), both [B, N', c']. seed: the teacher's
    # when it is rebuilt rather than saved (SemHiTok's random tiny teacher; ignored where it is saved).
    # def semantic_alignment(self, images: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]: ...
    # Optional (eval's usage report): named parts of each id, {name: (ids' part [...], its vocabulary size)},
    # reported as <name>_usage (SemHiTok: the semantic id h // m of K).
    # def id_parts(self, ids: torch.Tensor) -> dict[str, tuple[torch.Tensor, int]]: ...


def saved_kind(path: str | Path) -> str:
    """The kind a saved tokenizer directory (or Hub id) declares (config.json's model_type)."""
    meta, config_file, _ = read_meta(path)
    kind = meta.get("model_type")
    if kind not in KINDS:
        raise ValueError(f"{config_file}: model_type {kind!r} is not a known tokenizer kind ({', '.join(sorted(KINDS))})")
    return kind


def load_visual_tokenizer(path: str | Path, device: str | torch.device = "cpu") -> VisualTokenizer:
    """Any saved visual tokenizer (a directory or a Hub id), by the kind its directory declares; eval mode on `device`."""
    from semhitok.common.hub import resolve_pretrained

    path = resolve_pretrained(path)  # once: saved_kind and from_pretrained then read the same local directory
    return tokenizer_class(saved_kind(path)).from_pretrained(path, device=device)


@dataclass(frozen=True)
class IdStructure:
    """What the stack downstream of a tokenizer needs to know about its ids (pre-tokenized manifests and MLLM
    exports record it; the loader refuses data whose structure disagrees with the model's)."""

    kind: str
    grid: int
    code_vocab_sizes: tuple[int, ...]
    code_groups: tuple[int, ...]

    @classmethod
    def of(cls, tok: VisualTokenizer) -> "IdStructure":
        return cls(tok.kind, tok.grid, tuple(tok.code_vocab_sizes), tuple(tok.code_groups))

    @classmethod
    def from_dict(cls, d: dict) -> "IdStructure":
        return cls(str(d["kind"]), int(d["grid"]), tuple(map(int, d["code_vocab_sizes"])), tuple(map(int, d["code_groups"])))

    def to_dict(self) -> dict:
        return {"kind": self.kind, "grid": self.grid, "code_vocab_sizes": list(self.code_vocab_sizes),
                "code_groups": list(self.code_groups)}

    @property
    def codes(self) -> int:  # L
        return len(self.code_vocab_sizes)

    @property
    def positions(self) -> int:  # N
        return self.grid * self.grid

    @property
    def visual_vocab_size(self) -> int:
        """The LLM's visual vocabulary rows: every id when L == 1, one placeholder row when L > 1."""
        return self.code_vocab_sizes[0] if self.codes == 1 else 1


def positions_and_codes(tok: VisualTokenizer) -> tuple[int, int]:
    """(positions per image N = grid*grid, codes per position L)."""
    return tok.grid * tok.grid, len(tok.code_vocab_sizes)
