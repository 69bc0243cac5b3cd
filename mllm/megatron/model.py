"""The unified LLM on megatron-core: this rank's GPTModel (its TP shard, its PP stage) beside the adapter (first stage).

Inputs are the packed rows of data_pipelines/loader.py, as SemHiTokLM.forward takes them ([B, T] each). Megatron
works in [T, B, d]. Per-document attention comes from a block-diagonal causal mask built from the restarting
position_ids (Megatron's local attention takes a mask, True = masked); RoPE uses positions 0..T-1 of the row,
which inside one document differ from the restarted ones by a constant, so every score is the same (RoPE is
relative). The loss is Megatron's vocabulary-parallel cross-entropy with the padded rows' logits masked, so it is
the loss of the unpadded vocabulary, equal at every TP.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from semhitok.data_pipelines.sequences import IGNORE
from semhitok.mllm.megatron.convert import hf_to_megatron, padded_vocab, rope_theta, transformer_config, vocab_rows


def document_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """position_ids [B, T] restarting at 0 per document -> Megatron attention mask [B, 1, T, T], True = masked
    (a position sees the earlier positions of its own document only)."""
    doc = (position_ids == 0).cumsum(dim=1)  # [B, T] document index of each position
    t = position_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=position_ids.device).tril()
    return ~((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]


def next_token_labels(labels: torch.Tensor) -> torch.Tensor:
    """labels [B, T] as SemHiTokLM takes them (position t's own token) -> Megatron's [B, T] (position t's next token)."""
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE)], dim=1)


class MegatronLM(nn.Module):
    """gpt: GPTModel of this rank (pre_process on the first PP stage, post_process on the last); adapter: the
    VisualAdapter (first stage only, replicated over TP); layout/ids: the token layout and id structure of
    SemHiTokLM; vocab_size: the real rows (layout.vocab_size), gpt's head has padded_vocab(...) rows;
    visual_embeds: SemHiTokLM.visual_embeds of the model the adapter belongs to (input_ids [B, T], visual mask
    [B, T], None -> [M, d]), so visual inputs are embedded by the one implementation."""

    def __init__(self, gpt, adapter: nn.Module | None, layout, ids, vocab_size: int, visual_embeds=None):
        super().__init__()
        if ids.codes > 1:
            raise NotImplementedError(f"mllm_train.backend=megatron: a {ids.kind} tokenizer has {ids.codes} codes per "
                                      "position (depth heads); only one code per position is supported")
        self.gpt, self.adapter, self.layout, self.ids, self.vocab_size = gpt, adapter, layout, ids, vocab_size
        self.visual_embeds = visual_embeds
        self.config = gpt.config

    def set_input_tensor(self, tensor) -> None:  # pipeline parallel: the previous stage's hidden states
        self.gpt.set_input_tensor(tensor)

    # what megatron's schedules and finalize_model_grads ask of the model they run: its type, and the tied table at PP > 1
    @property
    def model_type(self):
        return self.gpt.model_type

    @property
    def pre_process(self) -> bool:
        return self.gpt.pre_process

    @property
    def share_embeddings_and_output_weights(self) -> bool:
        return self.gpt.share_embeddings_and_output_weights

    def shared_embedding_or_output_weight(self) -> torch.Tensor:
        return self.gpt.shared_embedding_or_output_weight()

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] -> decoder input [T, B, d]: the table's rows for text, the adapter's for visual ids."""
        visual = input_ids >= self.layout.visual_offset
        embeds = self.gpt.embedding(input_ids=input_ids.masked_fill(visual, 0), position_ids=position_ids)  # [T, B, d]
        if not visual.any():
            return embeds
        rows = self.visual_embeds(input_ids, visual, None).to(embeds.dtype)  # [M, d], row-major over [B, T]
        return embeds.transpose(0, 1).masked_scatter(visual[..., None], rows).transpose(0, 1).contiguous()

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T] each -> last stage: per-token losses [B, T] fp32 at the positions whose next token is supervised (0
        elsewhere), or without labels this rank's logits [B, T, V_pad / TP]; earlier stages: hidden [T, B, d]."""
        mask = document_mask(position_ids)
        decoder_input = self.embed(input_ids, position_ids) if self.gpt.pre_process else None
        logits = self.gpt(input_ids=None, position_ids=None, attention_mask=mask, decoder_input=decoder_input)
        if not self.gpt.post_process or labels is None:
            return logits
        from megatron.core import parallel_state, tensor_parallel

        targets = next_token_labels(labels)  # [B, T]
        shard = logits.shape[-1]
        first = parallel_state.get_tensor_model_parallel_rank() * shard  # this rank's first vocabulary row
        if first + shard > self.vocab_size:  # padded rows: no probability
            padded = torch.arange(first, first + shard, device=logits.device) >= self.vocab_size
            logits = logits.masked_fill(padded, torch.finfo(logits.dtype).min)
        supervised = targets != IGNORE
        losses = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), targets.clamp(min=0))  # [B, T]
        return losses * supervised


def gpt_model(hf_config, rows: int, pre_process: bool = True, post_process: bool = True, **config_overrides):
    """A GPTModel with the local layer spec (RMSNorm, SwiGLU, GQA, qkv bias, RoPE) shaped as `hf_config`, under the
    TP/PP of the initialised parallel_state."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    cfg = transformer_config(hf_config, parallel_state.get_tensor_model_parallel_world_size(),
                             parallel_state.get_pipeline_model_parallel_world_size(), **config_overrides)
    return GPTModel(cfg, get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=False), vocab_size=rows,
                    max_sequence_length=hf_config.max_position_embeddings, pre_process=pre_process, post_process=post_process,
                    share_embeddings_and_output_weights=bool(hf_config.tie_word_embeddings), position_embedding_type="rope",
                    rotary_base=rope_theta(hf_config))


def global_name(gpt, name: str) -> str:
    """A local parameter name of this PP stage -> its name at PP=1 (decoder.layers.<global index>.; a tied head's
    copy on the last stage is the table)"""
    if name == "output_layer.weight" and gpt.share_embeddings_and_output_weights:
        return "embedding.word_embeddings.weight"
    if not name.startswith("decoder.layers."):
        return name
    local, rest = name[len("decoder.layers."):].split(".", 1)
    return f"decoder.layers.{gpt.decoder.layers[int(local)].layer_number - 1}.{rest}"


def _tp_slice(param: torch.Tensor, full: torch.Tensor, name: str) -> torch.Tensor:
    """The TP rank's part of a full tensor, by megatron's partition attributes (fc1: [gate_rank; up_rank])."""
    from megatron.core import parallel_state

    if not getattr(param, "tensor_model_parallel", False):
        return full
    tp, rank, dim = (parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank(),
                     param.partition_dim)
    if name.endswith("mlp.linear_fc1.weight"):
        return torch.cat([half.chunk(tp, dim)[rank] for half in full.chunk(2, dim)], dim)
    return full.chunk(tp, dim)[rank]


VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")


@torch.no_grad()
def load_full_state(gpt, full: dict[str, torch.Tensor]) -> None:
    """Copy this rank's slices of a full (TP=1, PP=1) GPTModel state_dict into `gpt`; the vocabulary's padding may be
    another TP's."""
    from megatron.core import parallel_state

    for name, param in gpt.named_parameters():
        key = global_name(gpt, name)  # (a tied head on a last PP stage: its copy of the table)
        value = full[key]
        if key in VOCAB_KEYS:  # padded to 128 x the writer's TP: to 128 x this TP (the padded rows are zero)
            value = vocab_rows(value, param.shape[0] * parallel_state.get_tensor_model_parallel_world_size())
        part = _tp_slice(param, value, name)
        if part.shape != param.shape:
            raise ValueError(f"{key}: shape {tuple(part.shape)} for the parameter {tuple(param.shape)}")
        param.copy_(part)


@torch.no_grad()
def gather_full_state(gpt) -> dict[str, torch.Tensor]:
    """The whole model's parameters at TP=1 and PP=1 (CPU tensors, keyed as at PP=1) on rank 0 (and at PP=1 on every
    rank); other ranks get at least their own stage's part. Every rank takes part (the TP all-gathers); the stages
    are gathered over the one pipeline of TP rank 0 and DP rank 0, so no other rank holds a second full copy."""
    from megatron.core import parallel_state

    own = _gather_stage(gpt)
    if parallel_state.get_pipeline_model_parallel_world_size() == 1 or parallel_state.get_tensor_model_parallel_rank() \
            or parallel_state.get_data_parallel_rank():
        return own
    first = parallel_state.get_pipeline_model_parallel_first_rank()
    stages = [None] * parallel_state.get_pipeline_model_parallel_world_size() if torch.distributed.get_rank() == first else None
    torch.distributed.gather_object(own, stages, dst=first, group=parallel_state.get_pipeline_model_parallel_group())
    if stages is None:
        return own
    return {k: v for stage in stages for k, v in stage.items()}  # a tied head comes back from the last stage as the table


@torch.no_grad()
def _gather_stage(gpt) -> dict[str, torch.Tensor]:
    """This PP stage's parameters gathered over TP, keyed as at PP=1 (CPU tensors; a tied head on the last stage
    comes back as the embedding)."""
    from megatron.core import parallel_state

    group, tp = parallel_state.get_tensor_model_parallel_group(), parallel_state.get_tensor_model_parallel_world_size()
    out = {}
    for name, param in gpt.named_parameters():
        key = global_name(gpt, name)
        value = param.detach()
        if getattr(param, "tensor_model_parallel", False) and tp > 1:
            parts = [torch.empty_like(value) for _ in range(tp)]
            torch.distributed.all_gather(parts, value.contiguous(), group=group)
            dim = param.partition_dim
            if name.endswith("mlp.linear_fc1.weight"):
                halves = [p.chunk(2, dim) for p in parts]
                value = torch.cat([torch.cat([h[0] for h in halves], dim), torch.cat([h[1] for h in halves], dim)], dim)
            else:
                value = torch.cat(parts, dim)
        out[key] = value.cpu()
    return out


def from_semhitok(model, **config_overrides) -> MegatronLM:
    """A SemHiTokLM (full weights on every rank) -> this rank's MegatronLM under the initialised parallel_state, with
    the same function: the base's weights converted (mllm/megatron/convert.py), the adapter shared on the first stage."""
    from megatron.core import parallel_state

    hf_config = model.lm.config
    rows = padded_vocab(model.layout.vocab_size, parallel_state.get_tensor_model_parallel_world_size())
    state = {k: v for k, v in model.lm.state_dict().items()}
    if model.lm.get_output_embeddings().weight is model.lm.get_input_embeddings().weight:
        state.pop("lm_head.weight", None)
    gpt = gpt_model(hf_config, rows, parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage(),
                    dtype=next(model.lm.parameters()).dtype, **config_overrides)
    load_full_state(gpt, hf_to_megatron(state, hf_config, rows))
    adapter = model.adapter if parallel_state.is_pipeline_first_stage() else None
    return MegatronLM(gpt, adapter, model.layout, model.ids, model.layout.vocab_size, model.visual_embeds if adapter is not None else None)
