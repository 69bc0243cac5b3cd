"""How a visual tokenizer's ids travel through the LLM: the visual-token format as one object.

A tokenizer's `IdStructure` (tokenizer/interface.py) says what its ids are; `VisualCodec.of(ids, offset)`
says how they live in an LLM sequence whose visual rows start at vocabulary row `offset`
(TokenLayout.visual_offset). Two formats:

  FlatIds     one id per position (SemHiTok's K*m hierarchical ids, TokLIP's VQ ids): the position's token is
              offset + id, a vocabulary row of its own; the LLM's head scores those rows and the sampler
              draws one of them per step. Nothing travels beside the tokens.
  DepthCodes  L codes per position (DualToken: 8 residual semantic + 8 residual pixel codes): the position's
              token is ONE placeholder row (offset) and its L codes travel beside it (`codes` [T, L], -1 at
              other tokens); a depth head (mllm/depth_head.py) predicts them from the hidden state before the
              position, adding their summed NLL to the placeholder's loss, and the sampler draws them one
              depth at a time.

Everything downstream of the tokenizer (sequence builder, loader, MLLM embedding and loss, sampler, gaps)
calls these methods instead of asking which format it has. The heads themselves are the MLLM's modules: the
codec is handed them (`head`: the depth head, None for flat ids) and says what to do with them. Manifests
and exports record `ids.to_dict()`; `VisualCodec.of` rebuilds the codec from it.

Shapes: B rows, T tokens, M selected positions, L codes per position, d the LLM's width.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from semhitok.tokenizer.interface import IdStructure

# pick(logits [B, V] fp32, l: the code's index in [0, L)) -> ids [B]: the sampler's CFG / temperature / top-k / top-p
Pick = Callable[[torch.Tensor, int], torch.Tensor]
# the flat head's per-position loss: hidden [M, d], targets [M] -> [M] (mllm/loss.py ChunkedLMHead)
FlatLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class VisualCodec:
    """The format of one tokenizer's ids in an LLM sequence (see the module docstring)."""

    def __init__(self, ids: IdStructure, offset: int):
        self.ids, self.offset = ids, offset
        self.L = ids.codes

    @staticmethod
    def of(ids: IdStructure, offset: int) -> VisualCodec:
        return (DepthCodes if ids.codes > 1 else FlatIds)(ids, offset)

    @property
    def vocab_rows(self) -> int:
        """The LLM's vocabulary rows for visual tokens."""
        return self.ids.visual_vocab_size

    def is_visual(self, tokens: torch.Tensor) -> torch.Tensor:
        """token ids [...] -> bool [...]: the visual tokens"""
        return tokens >= self.offset

    # -- sequences (numpy) ------------------------------------------------------------------------------
    def tokens(self, row: np.ndarray) -> list[int]:
        """an image row [h*w*L] (position-major) -> its h*w LLM tokens"""
        raise NotImplementedError

    def side_codes(self, tokens: list[int], images: list[np.ndarray]) -> np.ndarray | None:
        """a document's tokens and its images' rows -> what travels beside the tokens: int64 [T, L] (-1 at
        non-visual tokens), or None when the tokens say everything"""
        raise NotImplementedError

    def batch_codes(self, shape: tuple[int, int]) -> np.ndarray | None:
        """an empty packed batch's side codes [B, T, L] (-1), or None"""
        raise NotImplementedError

    # -- the model (torch) -------------------------------------------------------------------------------
    def codes(self, tokens: torch.Tensor, side: torch.Tensor | None) -> torch.Tensor:
        """tokens [B, T] and side codes [B, T, L] (or None) -> every position's codes [B, T, L], clamped to >= 0
        at non-visual tokens (no data-dependent shapes: decoding steps compile it)"""
        raise NotImplementedError

    def losses(self, flat: FlatLoss, head, hidden: torch.Tensor, targets: torch.Tensor,
               side: torch.Tensor | None) -> torch.Tensor:
        """hidden [M, d] before M supervised targets [M] (side codes [M, L] of those targets, or None) ->
        per-target loss [M] fp32: the flat head's cross-entropy, plus the depth head's code NLL at visual targets"""
        return flat(hidden, targets).float()

    def hits(self, argmax: torch.Tensor, head, hidden: torch.Tensor, targets: torch.Tensor,
             side: torch.Tensor | None) -> torch.Tensor:
        """teacher-forced hits [M] bool: the flat head's argmax [M] is the target (and, at visual targets, every
        code's argmax is the code)"""
        return argmax == targets

    # -- sampling ----------------------------------------------------------------------------------------
    @property
    def rows(self) -> tuple[int, int] | None:
        """the vocabulary rows an image step's logits cover; None: the step hands the hidden state to the head"""
        raise NotImplementedError

    @property
    def noise(self) -> tuple[int, int | None]:
        """(noise counters per step, draws per counter (None: the vocabulary's width))"""
        raise NotImplementedError

    def draw(self, out: torch.Tensor, head, pick: Pick) -> tuple[torch.Tensor, torch.Tensor]:
        """one image step: the step's output (logits over `rows` [B, V], or the hidden state [B, d]) ->
        (the next input tokens [B], the position's codes [B, L])"""
        raise NotImplementedError

    def image(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, h*w, L] of whole images -> ids as the tokenizer's encode gives them ([B, h, w] or [B, h, w, L])"""
        raise NotImplementedError


class FlatIds(VisualCodec):
    """One id per position, its own vocabulary row."""

    def tokens(self, row):
        return (np.asarray(row, np.int64) + self.offset).tolist()

    def side_codes(self, tokens, images):
        return None

    def batch_codes(self, shape):
        return None

    def codes(self, tokens, side):
        return (tokens - self.offset).clamp(min=0)[..., None]

    @property
    def rows(self):
        return self.offset, self.offset + self.ids.code_vocab_sizes[0]

    @property
    def noise(self):
        return 1, None

    def draw(self, out, head, pick):
        ids = pick(out, 0)
        return ids + self.offset, ids[:, None]

    def image(self, codes):
        g = self.ids.grid
        return codes.reshape(len(codes), g, g)


class DepthCodes(VisualCodec):
    """L codes per position beside one placeholder token, predicted by a depth head."""

    def tokens(self, row):
        row = np.asarray(row, np.int64)
        if len(row) % self.L:
            raise ValueError(f"an image row of {len(row)} codes is not a whole number of positions of {self.L} codes")
        return [self.offset] * (len(row) // self.L)

    def side_codes(self, tokens, images):
        out = np.full((len(tokens), self.L), -1, np.int64)
        at = np.flatnonzero(np.asarray(tokens, np.int64) == self.offset)
        rows = np.concatenate([np.asarray(i, np.int64).reshape(-1, self.L) for i in images]) if images else out[:0]
        if len(at) != len(rows):
            raise ValueError(f"{len(at)} visual tokens for {len(rows)} positions of codes")
        out[at] = rows
        return out

    def batch_codes(self, shape):
        return np.full((*shape, self.L), -1, np.int64)

    def codes(self, tokens, side):
        if side is None:
            raise ValueError(f"depth codes: visual tokens carry {self.L} codes each; pass them beside the tokens "
                             "(visual_codes [B, T, L], -1 at other tokens)")
        return side.clamp(min=0)

    def losses(self, flat, head, hidden, targets, side):
        loss = flat(hidden, targets).float()
        visual = targets == self.offset
        if head is None or side is None:
            return loss
        return loss.masked_scatter(visual, loss[visual] + head.loss(hidden[visual], side[visual]).float())

    def hits(self, argmax, head, hidden, targets, side):
        hit = argmax == targets
        visual = targets == self.offset
        if not bool(visual.any()):
            return hit
        want = side[visual]  # [m, L]
        guess = torch.stack([x.argmax(-1) for x in head.logits(hidden[visual], want)], dim=-1)  # [m, L]
        return hit.masked_scatter(visual, hit[visual] & (guess == want).all(-1))

    @property
    def rows(self):
        return None

    @property
    def noise(self):
        return self.L, max(self.ids.code_vocab_sizes)

    def draw(self, out, head, pick):
        codes = head.sample(out, pick)  # [B, L]
        return torch.full_like(codes[:, 0], self.offset), codes

    def image(self, codes):
        g = self.ids.grid
        return codes.reshape(len(codes), g, g, self.L)
