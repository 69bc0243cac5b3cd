"""Shared by the Megatron backend's tests and their worker processes: a one-rank (or torchrun) gloo group with
megatron's parallel_state, and a small SemHiTokLM over a random-weight transformers base (every weight random,
norms and biases included, so a swapped or dropped tensor shows in the logits)."""

from __future__ import annotations

import os

import torch

from semhitok.common.dist import free_port
from semhitok.data_pipelines.sequences import IGNORE
from semhitok.data_pipelines.text_tokenizer import TokenLayout

TINY_QWEN2 = dict(model_type="qwen2", vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
TINY_LLAMA = dict(model_type="llama", vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
                  rms_norm_eps=1e-5)
# Real configs with their depth cut to one layer and their vocabulary to 512 rows: the real head, group and MLP shapes.
QWEN25_05B = dict(model_type="qwen2", vocab_size=512, hidden_size=896, intermediate_size=4864, num_hidden_layers=1,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=True,
                  rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
TINYLLAMA_11B = dict(model_type="llama", vocab_size=512, hidden_size=2048, intermediate_size=5632, num_hidden_layers=1,
                     num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False,
                     rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
VISUAL = 64  # visual ids: 16 semantic codes x 4 pixel codes each


def init_megatron(tp: int = 1, pp: int = 1) -> bool:
    """gloo group (torchrun's env, else one rank) + parallel_state at TP x PP + the CPU bypasses; True when this call
    created the process group (the caller destroys it)."""
    from megatron.core import parallel_state

    from semhitok.mllm.megatron import cpu

    created = False
    if not torch.distributed.is_initialized():
        if "RANK" in os.environ:
            torch.distributed.init_process_group("gloo")
        else:
            torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        created = True
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    cpu.enable()
    return created


def tiny_semhitok(base: dict, seed: int = 0):
    """A SemHiTokLM over `base` (a config dict with its model_type), all weights random with `seed`."""
    from semhitok.mllm.config import MLLMConfig
    from semhitok.mllm.model import SemHiTokLM, load_base_lm

    torch.manual_seed(seed)
    cfg = MLLMConfig(base_model="random", base_config=dict(base), adapter_hidden=32)
    lm = load_base_lm(cfg)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.05 if p.dim() > 1 else 0.2)
    t = base["vocab_size"]
    layout = TokenLayout(text_vocab_size=t, visual_vocab_size=VISUAL, image_start=t - 2, image_end=t - 1, im_start=1, im_end=2, eos=3)
    model = SemHiTokLM.from_base(lm, layout, torch.randn(VISUAL // 4, 8), torch.randn(VISUAL, 8), 4, 2, cfg)
    return model.eval()


def packed_batch(layout: TokenLayout, seed: int = 0, rows: int = 2, length: int = 24) -> dict[str, torch.Tensor]:
    """Packed rows as the loader makes them: documents of text with an image span (image_start, 4 visual ids,
    image_end), position_ids restarting per document (the padding tail too), about half the positions supervised."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, layout.image_start, (rows, length), generator=g)
    position_ids = torch.zeros(rows, length, dtype=torch.long)
    for b in range(rows):
        cuts = sorted(torch.randperm(length - 8, generator=g)[:2].add(4).tolist())  # 3 documents per row
        for start, end in zip([0, *cuts], [*cuts, length]):
            position_ids[b, start:end] = torch.arange(end - start)
            if end - start >= 7:  # an image span inside the document
                ids[b, start + 1] = layout.image_start
                ids[b, start + 2 : start + 6] = layout.visual_offset + torch.randint(0, layout.visual_vocab_size, (4,), generator=g)
                ids[b, start + 6] = layout.image_end
    labels = ids.masked_fill(torch.rand(rows, length, generator=g) < 0.5, IGNORE)
    return {"input_ids": ids, "position_ids": position_ids, "labels": labels}
