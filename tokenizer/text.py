"""The byte caption tokenizer of the small SigLIP text towers (the world teacher, TokLIP's bytes option):
a caption's UTF-8 bytes (ids 0..255) between BOS and EOS, padded with PAD to a fixed length, as SigLIP pads
to max_length (its text tower pools the last position). A text tower reading these needs vocab_size >= 259."""

from __future__ import annotations

import torch

BYTE_PAD, BYTE_BOS, BYTE_EOS = 256, 257, 258
BYTE_VOCAB = 259


def byte_caption_ids(captions: list[str], max_length: int) -> torch.Tensor:
    """captions -> input_ids [B, max_length] (int64): BOS, the UTF-8 bytes (truncated), EOS, PAD..."""
    if max_length < 2:
        raise ValueError(f"max_length={max_length}: needs room for BOS and EOS")
    rows = [[BYTE_BOS, *c.encode("utf-8")][: max_length - 1] + [BYTE_EOS] for c in captions]
    return torch.tensor([r + [BYTE_PAD] * (max_length - len(r)) for r in rows], dtype=torch.long)
