"""Weights of a transformers Qwen2/Qwen2.5 or LLaMA causal LM <-> megatron-core GPTModel (local layer spec), both ways.

Names (global layer index i; "full" means the whole model at TP=1, PP=1):
    model.embed_tokens.weight [V_in, d]                    embedding.word_embeddings.weight [V_pad, d]
    model.layers.i.input_layernorm.weight                  decoder.layers.i.input_layernorm.weight
    model.layers.i.self_attn.{q,k,v}_proj.{weight,bias}    decoder.layers.i.self_attention.linear_qkv.{weight,bias}
    model.layers.i.self_attn.o_proj.weight                 decoder.layers.i.self_attention.linear_proj.weight
    model.layers.i.post_attention_layernorm.weight         decoder.layers.i.pre_mlp_layernorm.weight
    model.layers.i.mlp.{gate,up}_proj.weight               decoder.layers.i.mlp.linear_fc1.weight [2 f, d] = [gate; up]
    model.layers.i.mlp.down_proj.weight                    decoder.layers.i.mlp.linear_fc2.weight
    model.norm.weight                                      decoder.final_layernorm.weight
    lm_head.weight [V, d] (absent when tied)               output_layer.weight [V_pad, d] (absent when tied)

Fused QKV is grouped by query group g (of n_kv groups, r = n_q / n_kv heads each, head size c):
    linear_qkv rows = concat over g of [q heads g*r .. g*r+r-1 (r*c rows), k head g (c), v head g (c)]
so a TP rank's contiguous slice of rows holds whole groups. A TP rank's slice of fc1 is [gate_rank; up_rank].
The vocabulary is padded to a multiple of 128 x TP with zero rows (`padded_vocab`); padded rows are dropped on the
way back, and the loss masks their logits (mllm/megatron/model.py). An untied input table holds the text rows only in
transformers (mllm/model.py); in Megatron it has every padded row, the visual ones zero (visual inputs come from the
adapter, never from the table).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MAKE_VOCAB_DIVISIBLE_BY = 128


def padded_vocab(vocab_size: int, tp: int, multiple: int = MAKE_VOCAB_DIVISIBLE_BY) -> int:
    """Rows of the Megatron embedding/head: vocab_size rounded up to a multiple of `multiple` x TP (Megatron-LM's rule)."""
    step = multiple * tp
    return -(-vocab_size // step) * step


def rope_theta(hf_config) -> float:
    """The RoPE base of a transformers config (5.x: rope_parameters; 4.x: rope_theta); only default RoPE converts."""
    params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    if (kind := params.get("rope_type", params.get("type", "default"))) != "default":
        raise NotImplementedError(f"RoPE type {kind!r} of this base has no Megatron conversion here (default RoPE only)")
    return float(params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))


def check_supported(hf_config) -> None:
    if hf_config.model_type not in ("qwen2", "llama"):
        raise NotImplementedError(f"mllm_train.backend=megatron converts qwen2 and llama bases, not {hf_config.model_type!r}")
    if getattr(hf_config, "use_sliding_window", False):
        raise NotImplementedError("a sliding-window base has no Megatron conversion here")
    if getattr(hf_config, "mlp_bias", False):
        raise NotImplementedError("a LLaMA base with mlp_bias has no Megatron conversion here")
    rope_theta(hf_config)


def qkv_bias(hf_config) -> bool:
    return hf_config.model_type == "qwen2" or bool(getattr(hf_config, "attention_bias", False))


def head_dim(hf_config) -> int:
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


def transformer_config(hf_config, tp: int = 1, pp: int = 1, dtype: torch.dtype = torch.float32, **overrides):
    """A transformers Qwen2/LLaMA config -> megatron-core's TransformerConfig of the same network (dropout 0)."""
    from megatron.core.transformer import TransformerConfig

    check_supported(hf_config)
    if hf_config.num_key_value_heads % tp or hf_config.num_attention_heads % tp:
        raise ValueError(f"mllm_train.tensor_parallel {tp} must divide the base's {hf_config.num_key_value_heads} key/value "
                         f"heads and {hf_config.num_attention_heads} query heads")
    cuda = torch.cuda.is_available()
    kw = dict(
        num_layers=hf_config.num_hidden_layers, hidden_size=hf_config.hidden_size,
        num_attention_heads=hf_config.num_attention_heads, num_query_groups=hf_config.num_key_value_heads,
        ffn_hidden_size=hf_config.intermediate_size, kv_channels=head_dim(hf_config),
        normalization="RMSNorm", layernorm_epsilon=hf_config.rms_norm_eps, gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, add_qkv_bias=qkv_bias(hf_config), hidden_dropout=0.0, attention_dropout=0.0,
        init_method_std=hf_config.initializer_range, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16, use_cpu_initialization=not cuda,
        # the fused kernels come from apex / transformer-engine on a GPU image; off on CPU
        bias_activation_fusion=cuda, masked_softmax_fusion=cuda, apply_rope_fusion=False, persist_layer_norm=False,
        gradient_accumulation_fusion=False, attention_softmax_in_fp32=True,
    )
    kw.update(overrides)
    return TransformerConfig(**kw)


def recompute(every_n_layers: int, layers_per_stage: int) -> dict:
    """mllm_train.activation_checkpointing (every n-th decoder layer recomputed in backward, 0: off) as megatron's
    recompute settings: every layer -> ("full", "uniform", 1); every n-th -> the first ceil(layers / n) layers of each
    stage ("block"): as many layers as transformers checkpoints, though not the same ones."""
    if every_n_layers <= 0:
        return {}
    if every_n_layers == 1:
        return {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    return {"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": -(-layers_per_stage // every_n_layers)}


def _qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """q [n_q c, ...], k, v [n_kv c, ...] -> fused [(n_q + 2 n_kv) c, ...] grouped by query group"""
    rest = q.shape[1:]
    return torch.cat([q.reshape(groups, -1, *rest), k.reshape(groups, -1, *rest), v.reshape(groups, -1, *rest)],
                     dim=1).reshape(-1, *rest)


def _unqkv(qkv: torch.Tensor, hf_config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    groups, c = hf_config.num_key_value_heads, head_dim(hf_config)
    r = hf_config.num_attention_heads // groups
    rest = qkv.shape[1:]
    g = qkv.reshape(groups, (r + 2) * c, *rest)
    q, k, v = g.split([r * c, c, c], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def vocab_rows(w: torch.Tensor, rows: int) -> torch.Tensor:
    """A vocabulary matrix [r, ...] -> [rows, ...]: zero rows added, or padding rows (beyond the real vocabulary) cut."""
    return w[:rows] if w.shape[0] >= rows else torch.cat([w, w.new_zeros(rows - w.shape[0], *w.shape[1:])])


def hf_to_megatron(state: dict[str, torch.Tensor], hf_config, rows: int) -> dict[str, torch.Tensor]:
    """A transformers state_dict (model.* and lm_head.*) -> the full GPTModel state_dict, embedding/head padded
    with zero rows to `rows` (padded_vocab); tied when `lm_head.weight` is absent or the same tensor."""
    groups = hf_config.num_key_value_heads
    tied = "lm_head.weight" not in state or state["lm_head.weight"] is state["model.embed_tokens.weight"]
    out = {"embedding.word_embeddings.weight": vocab_rows(state["model.embed_tokens.weight"], rows),
           "decoder.final_layernorm.weight": state["model.norm.weight"]}
    if not tied:
        out["output_layer.weight"] = vocab_rows(state["lm_head.weight"], rows)
    for i in range(hf_config.num_hidden_layers):
        hf, mg = f"model.layers.{i}.", f"decoder.layers.{i}."
        attn = hf + "self_attn."
        out[mg + "input_layernorm.weight"] = state[hf + "input_layernorm.weight"]
        out[mg + "self_attention.linear_qkv.weight"] = _qkv(state[attn + "q_proj.weight"], state[attn + "k_proj.weight"],
                                                           state[attn + "v_proj.weight"], groups)
        if attn + "q_proj.bias" in state:
            out[mg + "self_attention.linear_qkv.bias"] = _qkv(state[attn + "q_proj.bias"], state[attn + "k_proj.bias"],
                                                             state[attn + "v_proj.bias"], groups)
        out[mg + "self_attention.linear_proj.weight"] = state[attn + "o_proj.weight"]
        out[mg + "pre_mlp_layernorm.weight"] = state[hf + "post_attention_layernorm.weight"]
        out[mg + "mlp.linear_fc1.weight"] = torch.cat([state[hf + "mlp.gate_proj.weight"], state[hf + "mlp.up_proj.weight"]])
        out[mg + "mlp.linear_fc2.weight"] = state[hf + "mlp.down_proj.weight"]
    return out


def megatron_to_hf(state: dict[str, torch.Tensor], hf_config, vocab_size: int, input_rows: int | None = None) -> dict[str, torch.Tensor]:
    """The full GPTModel state_dict -> a transformers state_dict with `vocab_size` head rows (padding dropped) and
    input_rows input-table rows (default vocab_size; an untied SemHiTokLM keeps its text rows only). Tied (no
    output_layer.weight): lm_head.weight is the same tensor as the table."""
    table = state["embedding.word_embeddings.weight"]
    out = {"model.embed_tokens.weight": table[: input_rows or vocab_size], "model.norm.weight": state["decoder.final_layernorm.weight"]}
    out["lm_head.weight"] = state["output_layer.weight"][:vocab_size] if "output_layer.weight" in state else out["model.embed_tokens.weight"]
    for i in range(hf_config.num_hidden_layers):
        hf, mg = f"model.layers.{i}.", f"decoder.layers.{i}."
        attn = hf + "self_attn."
        out[hf + "input_layernorm.weight"] = state[mg + "input_layernorm.weight"]
        for suffix in ("weight", "bias"):
            if (key := f"{mg}self_attention.linear_qkv.{suffix}") in state:
                q, k, v = _unqkv(state[key], hf_config)
                out[f"{attn}q_proj.{suffix}"], out[f"{attn}k_proj.{suffix}"], out[f"{attn}v_proj.{suffix}"] = q, k, v
        out[attn + "o_proj.weight"] = state[mg + "self_attention.linear_proj.weight"]
        out[hf + "post_attention_layernorm.weight"] = state[mg + "pre_mlp_layernorm.weight"]
        out[hf + "mlp.gate_proj.weight"], out[hf + "mlp.up_proj.weight"] = state[mg + "mlp.linear_fc1.weight"].chunk(2)
        out[hf + "mlp.down_proj.weight"] = state[mg + "mlp.linear_fc2.weight"]
    out = {k: v.contiguous() for k, v in out.items()}
    if "output_layer.weight" not in state:  # tied: one tensor under both names, as transformers keeps it
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out
