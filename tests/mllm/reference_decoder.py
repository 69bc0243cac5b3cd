"""The uncached reference of mllm/sample.py's decode loop: every step re-runs the whole sequence through
the model (no KV cache, no static shapes, no compiled step) and draws with the same pick and draw. The cached
`Decoder.loop` must give exactly its tokens and codes."""

from __future__ import annotations

import dataclasses

import torch

from semhitok.mllm.sample import Decoder, VocabRows


@torch.no_grad()
def reference_steps(decoder: Decoder, prompts, steps, draw, sampling, guided=False, stop=None, keys=None, codes=None):
    """Decoder.loop' arguments -> [(tokens [n], codes [n, L] or None)] per step"""
    sampling = dataclasses.replace(sampling)
    ids, mask, side, row_keys = decoder.prepare(prompts, steps, sampling, guided, keys, codes)
    model, n, out = decoder.model, len(row_keys), []
    finished = torch.zeros(n, dtype=torch.bool, device=ids.device)
    for step in range(steps):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        hidden = model.hidden_states(ids, position_ids=pos, attention_mask=mask, visual_codes=side).last_hidden_state[:, -1]
        logits = hidden if draw.rows is None else model.logits(hidden)[:, draw.rows[0] : draw.rows[1]].float()
        tokens, step_codes = draw.draw(logits, model.visual_head, decoder.picker(sampling, row_keys, guided, step, draw))
        token = tokens[:n]
        if stop is not None:
            token = token.masked_fill(finished, stop)
            finished |= token == stop
            tokens = token.repeat(2) if guided else token
        out.append((token, None if step_codes is None else step_codes[:n]))
        if stop is not None and finished.all():
            break
        ids = torch.cat([ids, tokens[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        side = torch.cat([side, torch.full_like(side[:, :1], -1) if step_codes is None else step_codes[:, None]], dim=1)
    return out


def reference_image_ids(decoder: Decoder, captions, sampling, samples=None) -> torch.Tensor:
    """Decoder.image_ids without the cache"""
    rows, keys, guided = decoder.image_prompts(captions, sampling, samples)
    codec = decoder.model.codec
    steps = reference_steps(decoder, rows, decoder.model.ids.positions, codec, sampling, guided, keys=keys)
    return codec.image(torch.stack([c for _, c in steps], dim=1))


def reference_decode(decoder: Decoder, prompts, steps, vocab, sampling, guided=False, stop=None, keys=None, codes=None):
    """Decoder.decode without the cache: tokens [n, <= steps]"""
    out = reference_steps(decoder, prompts, steps, VocabRows(*vocab), sampling, guided, stop, keys, codes)
    return torch.stack([t for t, _ in out], dim=1)
