"""The unified LLM: a Qwen2/Qwen2.5 or LLaMA-family causal LM whose vocabulary is extended by a visual tokenizer's ids.

Vocabulary (see data_pipelines/text_tokenizer.py): text rows [0, T), then visual id h at row T + h.

How visual ids enter and leave the model (any tokenizer.kind, see tokenizer/interface.py):
  - input: a visual token's embedding is NOT an embedding row. The adapter holds the tokenizer's frozen
    features module (input_features()) and one MLP per feature split: for SemHiTok the features of id h are
    its semantic code sem[h // m] and pixel code pix[h], mapped to concat(MLP_sem(sem) [d - d/2],
    MLP_pix(pix) [d/2]) = [d] (adapter_inputs=semantic: MLP_sem(sem) [d] alone). The tokenizer's visual codec
    (tokenizer/codec.py, `model.codec`) says which codes a visual token carries: its own id (flat ids), or the
    L codes beside its placeholder token (depth codes, `visual_codes`).
  - output: the head (the causal LM's lm_head, resized to T + K*m rows) scores all text and visual rows;
    generation predicts flattened ids h directly (depth codes: the placeholder row, and the depth head
    `visual_head`, mllm/depth_head.py, the codes; the codec adds its loss). Its visual rows start as the adapter's projection of
    the same code features, rescaled to the norm of the text rows, so codes that are close in the
    tokenizer start close in the head (not zeros, not unrelated noise). With tied embeddings (Qwen2.5
    <= 3B) the embedding table's visual rows are these head rows and are never read as inputs; an untied
    model (7B) keeps only its T text rows in the input table (196,608 unread rows = 704.6M parameters at
    7B are never allocated) and its export pads them with zeros (the export's table has every row).

Memory: under ZeRO-3 (mllm/partition.py) the LLM is built and loaded partitioned in the training dtype; the
vocabulary is extended one partitioned matrix at a time.

Loss: only supervised positions reach the head, through a chunked cross-entropy (mllm/loss.py), so no
[tokens, 348K] fp32 logits exist. Packed rows: position_ids restart per document and transformers'
attention (sdpa / flex / flash_attention_2) turns that into per-document causal attention.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import shutil
from pathlib import Path

import torch
import torch.nn as nn
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, PreTrainedModel

from semhitok.common.config_io import from_dict
from semhitok.common.hub import llm_config, resolve_pretrained
from semhitok.common.io import atomic_dir, read_json
from semhitok.data_pipelines.config import SequenceConfig
from semhitok.data_pipelines.sequences import IGNORE, TASKS
from semhitok.data_pipelines.text_tokenizer import TokenLayout
from semhitok.mllm.config import MLLMConfig
from semhitok.mllm.depth_head import DepthHeads
from semhitok.mllm.hf_export import finish_export, push_export, text_config
from semhitok.mllm.loss import ChunkedLMHead
from semhitok.mllm.partition import full_shape, with_rows
from semhitok.tokenizer import WeightsUnavailable
from semhitok.tokenizer.codec import VisualCodec
from semhitok.tokenizer.interface import IdStructure, VisualFeatures, VisualTokenizer, load_visual_tokenizer
from semhitok.tokenizer.kinds import KINDS
from semhitok.tokenizer.semhitok.model import SemHiTok, SemHiTokFeatures

log = logging.getLogger("semhitok")
MLLM_CONFIG = "semhitok_mllm.json"
ADAPTER_WEIGHTS = "adapter.safetensors"
VISUAL_HEAD_WEIGHTS = "visual_head.safetensors"  # depth codes only: the depth heads (mllm/depth_head.py)
VISUAL_TOKENIZER = "visual_tokenizer"


class VisualAdapter(nn.Module):
    """The tokenizer's frozen features module (tokenizer.input_features()) and one MLP per entry of its `splits`,
    their outputs concatenated to [d]: SemHiTok's dual MLP (semantic d - d//2, pixel d//2; inputs=semantic: the
    first split's MLP alone fills d), one MLP of width d for one split (inputs=concat: one MLP, visual_mlp, on all
    splits concatenated). MLPs are named <split name>_mlp (the features' `split_names`, default split0, ...)."""

    def __init__(self, features: VisualFeatures, hidden: int, d: int, inputs: str = "both"):
        super().__init__()
        self.features = features.requires_grad_(False)
        splits = tuple(features.splits)
        names = tuple(getattr(features, "split_names", ())) or tuple(f"split{i}" for i in range(len(splits)))
        if inputs == "concat":  # one MLP on the whole feature vector: visual_mlp
            splits, names = (sum(splits),), ("visual",)
        used = 1 if inputs == "semantic" else len(splits)
        widths = [d - (used - 1) * (d // used)] + [d // used] * (used - 1)  # two splits: d - d//2, d//2
        self.splits, self.mlp_names = splits, names[:used]
        for i, name in enumerate(names):
            mlp = nn.Sequential(nn.Linear(splits[i], hidden), nn.GELU(), nn.Linear(hidden, widths[i])) if i < used else None
            setattr(self, f"{name}_mlp", mlp)

    @property
    def codes_per_group(self) -> int:  # SemHiTok's m (1 for other kinds), recorded in exports
        return getattr(self.features, "codes_per_group", 1)

    @property
    def hidden(self) -> int:
        return getattr(self, f"{self.mlp_names[0]}_mlp")[0].out_features

    def project(self, feats: torch.Tensor) -> torch.Tensor:
        """features [..., c] -> [..., d]"""
        mlps = [getattr(self, f"{name}_mlp") for name in self.mlp_names]
        dtype = mlps[0][0].weight.dtype
        parts = feats.to(dtype).split(list(self.splits), dim=-1)
        return torch.cat([mlp(x.contiguous()) for mlp, x in zip(mlps, parts)], dim=-1)

    def images(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [n, N', L] (whole images; any N' for per-id features) -> [n, N', d]"""
        return self.project(self.features(ids))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """per-id features with one code per position: visual ids [...] -> [..., d]"""
        return self.images(ids.reshape(1, -1, 1)).reshape(*ids.shape, -1)


class SemHiTokLM(nn.Module):
    def __init__(self, lm: PreTrainedModel, adapter: VisualAdapter, layout: TokenLayout, cfg: MLLMConfig, ids: IdStructure,
                 sequence_config: SequenceConfig | None = None, visual_head: nn.Module | None = None):
        super().__init__()
        self.lm, self.adapter, self.layout, self.config, self.image_grid = lm, adapter, layout, cfg, ids.grid
        self.ids = ids  # the visual tokenizer's id structure (kind, L codes per position, vocabularies)
        if ids.visual_vocab_size != layout.visual_vocab_size:
            raise ValueError(f"the layout has {layout.visual_vocab_size} visual rows, a {ids.kind} tokenizer with "
                             f"codes {list(ids.code_vocab_sizes)} needs {ids.visual_vocab_size}")
        self.codec = VisualCodec.of(ids, layout.visual_offset)
        # depth codes: the module predicting a position's L codes from the hidden state before it
        # (mllm/depth_head.py); the codec calls visual_head.loss / .logits / .sample
        self.visual_head = visual_head
        # The document format trained on (system, unconditional and caption prompts): sampling reuses it.
        self.sequence_config = sequence_config or SequenceConfig()
        self.text_frozen = False
        if not isinstance(lm.lm_head, ChunkedLMHead):
            with torch.device("meta"):  # no allocation: the weight is the existing (possibly partitioned) one
                head = ChunkedLMHead(lm.lm_head.in_features, lm.lm_head.out_features, bias=False)
            head.weight = lm.lm_head.weight  # the same Parameter: a tied head stays tied
            lm.lm_head = head

    @property
    def device(self) -> torch.device:
        return self.lm.model.embed_tokens.weight.device

    def freeze_text(self) -> None:
        """Adapter-only training: the transformer and the text rows of the embedding/head stay fixed; the
        adapter and the head's visual rows learn. (The head is one matrix, so its text rows are held by a
        zero gradient: keep weight decay at 0 for it.)"""
        for p in self.lm.parameters():
            p.requires_grad = False
        self.lm.lm_head.weight.requires_grad = True
        self.lm.lm_head.frozen_rows = self.layout.text_vocab_size
        self.text_frozen = True

    def enable_activation_checkpointing(self, every_n_layers: int) -> None:
        """Recompute every n-th decoder layer's activations in backward (0: off). n > 1 needs transformers >= 5.23
        (`activation_checkpointing_enable`); older 5.x releases, which GPU images may pin, checkpoint every layer."""
        kwargs = {"use_reentrant": False}
        if every_n_layers <= 0:
            return
        if hasattr(self.lm, "activation_checkpointing_enable"):
            self.lm.activation_checkpointing_enable(kwargs, every_n_layers=every_n_layers)
        elif every_n_layers == 1:
            self.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            raise RuntimeError(f"mllm_train.activation_checkpointing={every_n_layers}: every n-th layer "
                               f"needs transformers >= 5.23 (this is {transformers.__version__}); set it to 1 (every layer) or 0 (off)")

    def embed(self, input_ids: torch.Tensor, visual_codes: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T] (text and visual tokens), visual_codes [B, T, L] (the codes beside the tokens, depth
        codes only) -> input embeddings [B, T, d]"""
        visual = self.codec.is_visual(input_ids)
        embeds = self.lm.model.embed_tokens(input_ids.masked_fill(visual, 0))
        if self.text_frozen:  # with tied weights the table is the head: no gradient into its text rows
            embeds = embeds.detach()
        if visual.any():
            embeds = embeds.masked_scatter(visual[..., None], self.visual_embeds(input_ids, visual, visual_codes).to(embeds.dtype))
        return embeds

    def visual_embeds(self, input_ids: torch.Tensor, visual: torch.Tensor, visual_codes: torch.Tensor | None) -> torch.Tensor:
        """The adapter's embeddings of the visual positions `visual` [B, T] -> [M, d] (row-major order).

        Per-id features see all positions at once; contextual ones (per_id False) see whole images: the visual
        positions come in runs of consecutive tokens, one per image, grouped [n, N, L] (a run of another length,
        e.g. an image still being generated, is its own group)."""
        codes = self.codec.codes(input_ids, visual_codes)[visual]  # [M, L]
        if self.adapter.features.per_id:
            return self.adapter.images(codes[None])[0]
        flat = visual.flatten().nonzero()[:, 0]  # [M] positions in the flattened [B*T]
        starts = ((flat[1:] - flat[:-1] != 1) | (flat[1:] % visual.shape[1] == 0)).nonzero()[:, 0] + 1
        runs = codes.tensor_split(starts.cpu())
        n = self.ids.positions
        whole = [r for r in runs if len(r) == n]
        done = iter(self.adapter.images(torch.stack(whole)).unbind(0)) if whole else iter(())
        return torch.cat([next(done) if len(r) == n else self.adapter.images(r[None])[0] for r in runs])

    def embed_static(self, input_ids: torch.Tensor, visual_codes: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, t] -> [B, t, d], equal to `embed` but without data-dependent shapes, so torch.compile
        and CUDA graphs can capture it. Runs the adapter at every position (per-id features): meant for decoding
        steps. visual_codes [B, t, L] as in `embed`."""
        visual = self.codec.is_visual(input_ids)
        text = self.lm.model.embed_tokens(input_ids.masked_fill(visual, 0))
        codes = self.codec.codes(input_ids, visual_codes)  # [B, t, L]
        image = self.adapter.images(codes.reshape(1, -1, codes.shape[-1])).reshape(*input_ids.shape, -1).to(text.dtype)
        return torch.where(visual[..., None], image, text)

    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None, use_cache: bool = False,
                      visual_codes: torch.Tensor | None = None, **kw):
        """input_ids [B, T] (visual_codes [B, T, L] as in `embed`) -> transformers' model output (last_hidden_state
        [B, T, d], past_key_values).

        Without a cache, restarting position_ids mark packed documents (per-document causal attention);
        transformers ignores them when a cache exists, so training must keep use_cache=False."""
        embeds = self.embed(input_ids, visual_codes)
        return self.lm.model(inputs_embeds=embeds, position_ids=position_ids, use_cache=use_cache, **kw)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., d] -> logits [..., V] (for sampling a few positions, never for training)"""
        return self.lm.lm_head(hidden)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor,
                task_ids: torch.Tensor | None = None, visual_codes: torch.Tensor | None = None,
                task_weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Packed rows [B, T] (visual_codes [B, T, L] as in `embed`) -> {"loss": mean next-token loss over supervised
        positions, "task_loss_sum" [n_tasks], "task_tokens" [n_tasks]} (the last two detached, unweighted, for
        logging). task_weights [n_tasks] (needs task_ids): the mean weighted by each token's task.

        The per-target loss is the codec's: the flat head's cross-entropy (depth codes: for the placeholder,
        plus the depth head's summed NLL of the position's L codes)."""
        hidden = self.hidden_states(input_ids, position_ids, visual_codes=visual_codes).last_hidden_state
        targets = labels[:, 1:]
        mask = targets != IGNORE
        side = visual_codes[:, 1:][mask] if visual_codes is not None else None  # [N, L]
        losses = self.target_losses(hidden[:, :-1][mask], targets[mask], side)  # [N]
        tasks = task_ids[:, 1:][mask] if task_ids is not None else None
        if task_weights is not None:
            weights = task_weights.to(losses.dtype)[tasks]  # [N]
            loss = (losses * weights).sum() / weights.sum().clamp(min=torch.finfo(losses.dtype).tiny)
        else:
            loss = losses.sum() / mask.sum().clamp(min=1)
        out = {"loss": loss}
        if tasks is not None:
            out["task_loss_sum"] = torch.zeros(len(TASKS), device=loss.device).index_add_(0, tasks, losses.detach())
            out["task_tokens"] = torch.bincount(tasks, minlength=len(TASKS)).float()
        return out

    def target_losses(self, hidden: torch.Tensor, targets: torch.Tensor, codes: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [N, d] before targets [N] (their side codes [N, L], depth codes) -> per-target loss [N] fp32"""
        return self.codec.losses(self.lm.lm_head, self.visual_head, hidden, targets, codes)

    @torch.no_grad()
    def target_hits(self, hidden: torch.Tensor, targets: torch.Tensor, codes: torch.Tensor | None = None) -> torch.Tensor:
        """teacher-forced hits [N] bool: every prediction of each target (its token, and its codes) is the argmax"""
        argmax = torch.cat([self.lm.lm_head(hidden[c : c + 256]).argmax(-1) for c in range(0, len(hidden), 256)])
        return self.codec.hits(argmax, self.visual_head, hidden, targets, codes)

    # -- building ----------------------------------------------------------------------------------
    @classmethod
    def build(cls, cfg: MLLMConfig, tokenizer: VisualTokenizer, text_tokenizer, sequence_config: SequenceConfig | None = None,
              dtype: torch.dtype = torch.float32) -> SemHiTokLM:
        """A new model: the base LLM (by name/path, or random from base_config) in `dtype`, vocabulary extended
        by the tokenizer's visual rows (text rows grow when the tokenizer got image delimiters the base lacks,
        e.g. LLaMA's 32,000 -> 32,064; partitioned throughout when built inside mllm.partition.zero3_build)."""
        lm = load_base_lm(cfg, dtype)
        text_vocab = lm.config.vocab_size if len(text_tokenizer) <= lm.config.vocab_size else None
        ids = IdStructure.of(tokenizer)
        layout = TokenLayout.from_tokenizer(text_tokenizer, ids.visual_vocab_size, text_vocab)
        return cls.from_features(lm, layout, tokenizer.input_features(), ids, cfg, sequence_config)

    @classmethod
    def from_base(cls, lm: PreTrainedModel, layout: TokenLayout, sem_codes: torch.Tensor, pix_codes: torch.Tensor,
                  codes_per_group: int, image_grid: int, cfg: MLLMConfig, sequence_config: SequenceConfig | None = None) -> SemHiTokLM:
        """A base LM with T text rows + SemHiTok's codes [K, sem_dim], [K*m, pix_dim] -> the extended model."""
        ids = IdStructure(SemHiTok.kind, image_grid, (layout.visual_vocab_size,), (1,))
        return cls.from_features(lm, layout, SemHiTokFeatures(sem_codes, pix_codes, codes_per_group), ids, cfg, sequence_config)

    @classmethod
    def from_features(cls, lm: PreTrainedModel, layout: TokenLayout, features: VisualFeatures, ids: IdStructure,
                      cfg: MLLMConfig, sequence_config: SequenceConfig | None = None) -> SemHiTokLM:
        """A base LM with T text rows + a tokenizer's features module -> the extended model.

        The head's visual rows start as the adapter's projection of the features of every id (per-id features,
        one code per position: table()), else as random rows; both rescaled to the mean norm of the text rows."""
        d = lm.config.hidden_size
        adapter = VisualAdapter(features, cfg.adapter_hidden or d, d, cfg.adapter_inputs)
        visual_head = DepthHeads.for_ids(cfg, d, ids.code_vocab_sizes, ids.code_groups)  # depth codes: the depth heads; else None
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            # every rank fills its own shard of the head from this adapter: rank 0's, on every rank (and its depth heads)
            on = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
            for p in [*adapter.parameters(), *(visual_head.parameters() if visual_head is not None else ())]:
                sent = p.data.to(on)
                torch.distributed.broadcast(sent, 0)
                p.data.copy_(sent)
        norm: list[torch.Tensor] = []
        from_table = features.per_id and ids.codes == 1

        @torch.no_grad()
        def visual_rows(text: torch.Tensor, lo: int, hi: int) -> torch.Tensor:  # text rows [T, d] -> head rows [hi - lo, d]
            if not norm:
                norm.append(torch.cat([t.float().norm(dim=1) for t in text[: layout.text_vocab_size].split(65536)]).mean())
            out = torch.zeros(hi - lo, text.shape[1], device=text.device)  # text rows the tokenizer added: zero
            first = max(lo, layout.visual_offset)
            if first < hi:
                if from_table:
                    table = features.table()[first - layout.visual_offset : hi - layout.visual_offset]
                    rows = adapter.project(table).float().to(text.device)
                else:  # the same rows on every rank and shard: seeded by the first row
                    rows = torch.randn(hi - first, text.shape[1], generator=torch.Generator().manual_seed(first)).to(text.device)
                out[first - lo :] = rows / rows.norm(dim=1, keepdim=True) * norm[0]
            return out

        table = lm.get_input_embeddings()
        if not _tied(lm) and full_shape(table.weight)[0] < layout.text_vocab_size:  # delimiters added to the tokenizer
            lm.set_input_embeddings(with_rows(table, layout.text_vocab_size))
        extend_head(lm, layout.vocab_size, visual_rows)
        dtype = lm.get_input_embeddings().weight.dtype
        return cls(lm, adapter.to(dtype), layout, cfg, ids, sequence_config, visual_head.to(dtype) if visual_head is not None else None)

    # -- persistence ---------------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path, text_tokenizer, visual_tokenizer_dir: str | Path,
                        state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """An HF directory (AutoModelForCausalLM/AutoProcessor with trust_remote_code, see mllm/hf_export.py): the
        LLM, the adapter, the layout, the text tokenizer and a copy of the visual tokenizer, in the weights' own
        dtype. `state_dict`: this model's full weights, when they live elsewhere (gathered from ZeRO-3). An untied input table holds
        text rows only: it is written padded with zero visual rows, which from_pretrained drops again."""
        state = state_dict if state_dict is not None else self.state_dict()
        with atomic_dir(path) as tmp:
            lm_state = {k[len("lm."):]: v for k, v in state.items() if k.startswith("lm.")}
            key = _input_table_key(self.lm)
            table = lm_state[key]  # [rows, d]
            if table.shape[0] < self.layout.vocab_size:
                lm_state[key] = torch.cat([table, table.new_zeros(self.layout.vocab_size - table.shape[0], table.shape[1])])
            self.lm.save_pretrained(tmp, state_dict=lm_state)
            adapter = {k[len("adapter."):]: v.detach().contiguous().cpu() for k, v in state.items() if k.startswith("adapter.")}
            save_file({SEMHITOK_TABLES.get(k, k): v for k, v in adapter.items()}, str(tmp / ADAPTER_WEIGHTS))
            if self.visual_head is not None:
                save_file({k[len("visual_head."):]: v.detach().contiguous().cpu() for k, v in state.items() if k.startswith("visual_head.")},
                          str(tmp / VISUAL_HEAD_WEIGHTS))
            text_tokenizer.save_pretrained(tmp)
            shutil.copytree(visual_tokenizer_dir, tmp / VISUAL_TOKENIZER)
            meta = {"model_type": "semhitok_mllm", "layout": dataclasses.asdict(self.layout), "image_grid": self.image_grid,
                    "ids": self.ids.to_dict(), "codes_per_group": self.adapter.codes_per_group, "adapter_hidden": self.adapter.hidden,
                    "config": dataclasses.asdict(self.config), "sequence_config": dataclasses.asdict(self.sequence_config)}
            if self.visual_head is not None:
                meta["visual_head"] = self.visual_head.spec
            (tmp / MLLM_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
            finish_export(tmp, self, text_tokenizer, Path(path))  # generation config, card; remote code for SemHiTok only

    def push_to_hub(self, repo_id: str, text_tokenizer, visual_tokenizer_dir: str | Path, private: bool | None = None,
                    token: str | None = None) -> str:
        """Upload a fresh export (save_pretrained's arguments) to the Hub repo `repo_id` -> the commit URL."""
        return push_export(lambda out: self.save_pretrained(out, text_tokenizer, visual_tokenizer_dir), repo_id, private, token)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                        attn_implementation: str | None = None) -> SemHiTokLM:
        """`path`: a directory or a Hub id. attn_implementation: overrides the saved config's (e.g. sdpa for decoding)."""
        path = resolve_pretrained(path)
        meta_file = path / MLLM_CONFIG
        if not meta_file.is_file():
            raise FileNotFoundError(f"{meta_file} not found: pass a directory written by SemHiTokLM.save_pretrained")
        meta, layout = _read_meta(meta_file)
        if (path / "config.json").is_file():  # transformers parses it with no depth limit
            read_json(path / "config.json")
        check_text_tokenizer(path, layout)
        cfg = from_dict(MLLMConfig, meta["config"], where=str(meta_file))
        lm = AutoModelForCausalLM.from_pretrained(path, config=text_config(path), dtype=dtype or torch.float32,
                                                  attn_implementation=attention_kernel(attn_implementation or cfg.attn_implementation))
        layout = TokenLayout(**meta["layout"])
        if not _tied(lm):  # an untied table's visual rows are export padding: keep the text rows only
            lm.set_input_embeddings(with_rows(lm.get_input_embeddings(), layout.text_vocab_size))
        ids = _ids(meta, meta_file)
        adapter = VisualAdapter(export_features(path, ids, meta), meta["adapter_hidden"], lm.config.hidden_size, cfg.adapter_inputs)
        try:
            adapter.load_state_dict(_adapter_state(load_file(str(path / ADAPTER_WEIGHTS))))
        except RuntimeError as err:  # missing, unexpected or misshapen tensors: one line naming the file
            raise ValueError(f"{path / ADAPTER_WEIGHTS}: does not fit the saved config ({' '.join(str(err).split())[:300]})") from None
        seq_cfg = from_dict(SequenceConfig, meta["sequence_config"], where=str(meta_file))
        if full_shape(lm.get_output_embeddings().weight)[0] < layout.vocab_size:
            raise ValueError(f"{path}: the LLM's head has {full_shape(lm.get_output_embeddings().weight)[0]} rows, the saved "
                             f"layout needs {layout.vocab_size}")
        visual_head = None
        if "visual_head" in meta:  # depth codes: the depth heads
            visual_head = DepthHeads.from_spec(meta["visual_head"], str(meta_file)).to(dtype or torch.float32)
            visual_head.load_state_dict(load_file(str(path / VISUAL_HEAD_WEIGHTS)))
        return cls(lm, adapter.to(dtype or torch.float32), layout, cfg, ids, seq_cfg, visual_head).to(device).eval()


def export_features(path: Path, ids: IdStructure, meta: dict) -> VisualFeatures:
    """The features module of an export, rebuilt from its visual_tokenizer/ copy (its weights then come from
    adapter.safetensors). SemHiTok's is two code tables, shaped from the adapter file alone."""
    if ids.kind == "semhitok":
        state = _adapter_state(load_file(str(path / ADAPTER_WEIGHTS)))
        sem, pix, m, vocab = state.get("features.sem_codes"), state.get("features.pix_codes"), meta["codes_per_group"], ids.code_vocab_sizes[0]
        if sem is None or pix is None or sem.dim() != 2 or pix.dim() != 2 or sem.shape[0] * m != vocab or pix.shape[0] != vocab:
            shapes = [None if t is None else list(t.shape) for t in (sem, pix)]
            raise ValueError(f"{path / ADAPTER_WEIGHTS}: code tables sem_codes {shapes[0]} and pix_codes {shapes[1]} do not fit "
                             f"the saved ids ({vocab} visual ids = {vocab // m} groups x {m} codes): damaged or from another model")
        return SemHiTokFeatures(sem, pix, m)
    return load_visual_tokenizer(path / VISUAL_TOKENIZER).input_features()


# adapter.safetensors keeps SemHiTok's code tables at its top level (as before tokenizer kinds, and as the
# remote code in mllm/hf_remote reads them); in the module they live in adapter.features
SEMHITOK_TABLES = {"features.sem_codes": "sem_codes", "features.pix_codes": "pix_codes"}


def _adapter_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """adapter.safetensors -> the adapter's state_dict"""
    back = {v: k for k, v in SEMHITOK_TABLES.items()}
    return {back.get(k, k): v for k, v in state.items()}


MLLM_KEYS = ("layout", "image_grid", "ids", "codes_per_group", "adapter_hidden", "config", "sequence_config")


def _read_meta(meta_file: Path) -> tuple[dict, TokenLayout]:
    """semhitok_mllm.json -> (its contents, the token layout), or one line naming what is wrong."""
    meta = read_json(meta_file)
    if not isinstance(meta, dict) or (missing := [k for k in MLLM_KEYS if k not in meta]):
        raise ValueError(f"{meta_file}: missing field(s) {missing if isinstance(meta, dict) else list(MLLM_KEYS)}")
    try:
        layout = TokenLayout(**meta["layout"])
    except TypeError as err:
        raise ValueError(f"{meta_file}: bad layout ({err})") from None
    for key, low in (("image_grid", 1), ("codes_per_group", 1), ("adapter_hidden", 0)):
        if isinstance(meta[key], bool) or not isinstance(meta[key], int) or meta[key] < low:
            raise ValueError(f"{meta_file}: {key} must be an integer >= {low}, got {meta[key]!r}")
    return meta, layout


def _ids(meta: dict, meta_file: Path) -> IdStructure:
    try:
        ids = IdStructure.from_dict(meta["ids"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{meta_file}: bad ids {meta['ids']!r} ({type(err).__name__}: {err})") from None
    if ids.kind not in KINDS:
        raise ValueError(f"{meta_file}: ids.kind {ids.kind!r} is not a known tokenizer kind ({', '.join(sorted(KINDS))})")
    return ids


def saved_ids(path: str | Path) -> IdStructure:
    """The visual id structure (tokenizer kind, grid, codes) a local export records, read without its weights."""
    meta_file = Path(path) / MLLM_CONFIG
    if not meta_file.is_file():
        raise FileNotFoundError(f"{meta_file} not found: pass a directory written by SemHiTokLM.save_pretrained")
    return _ids(_read_meta(meta_file)[0], meta_file)


def check_text_tokenizer(path: Path, layout: TokenLayout) -> None:
    """The directory's text tokenizer must exist and give the saved layout (else every id is off, or a
    tokenizer of a few special tokens turns every prompt into the same ids)."""
    if not any((path / name).is_file() for name in ("tokenizer.json", "vocab.json", "tokenizer.model")):
        raise FileNotFoundError(f"{path}: no text tokenizer (tokenizer.json) in the model directory; copy the run's "
                                "text tokenizer files into it")
    from semhitok.data_pipelines.text_tokenizer import load_text_tokenizer

    tokenizer = load_text_tokenizer(str(path))
    try:
        found = TokenLayout.from_tokenizer(tokenizer, layout.visual_vocab_size, layout.text_vocab_size)
    except ValueError as err:
        raise ValueError(f"{path}: its text tokenizer does not fit the saved layout ({err})") from None
    if found != layout:
        diff = [f"{k} {getattr(found, k)} != {getattr(layout, k)}" for k in dataclasses.asdict(layout) if getattr(found, k) != getattr(layout, k)]
        raise ValueError(f"{path}: its text tokenizer does not match the saved layout ({', '.join(diff)})")


def apply_fused_kernels(model: SemHiTokLM) -> bool:
    """Liger-Kernel's Triton RMSNorm, RoPE and SwiGLU in the Qwen2 or LLaMA body, on CUDA when installed (the
    loss stays ours: chunked, supervised positions only). True when applied."""
    if not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None:
        return False
    import liger_kernel.transformers as liger

    apply = getattr(liger, f"apply_liger_kernel_to_{model.lm.config.model_type}", None)
    if apply is None:
        return False
    apply(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False, model=model.lm)
    return True


def attention_kernel(requested: str) -> str:
    """auto -> flash_attention_2 when flash-attn is installed and CUDA is present, else sdpa."""
    if requested != "auto":
        return requested
    return "flash_attention_2" if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") else "sdpa"


def _tied(lm: PreTrainedModel) -> bool:
    return lm.get_output_embeddings().weight is lm.get_input_embeddings().weight


def _input_table_key(lm: PreTrainedModel) -> str:
    table = lm.get_input_embeddings()
    return next(name for name, module in lm.named_modules() if module is table) + ".weight"


def extend_head(lm: PreTrainedModel, vocab_size: int, new_rows=None) -> None:
    """Grow the head to vocab_size rows, new rows from new_rows(text rows [T, d], lo, hi) (mllm.partition.with_rows).
    Tied: the one shared matrix grows; untied: the head only, the input table keeps its text rows (visual
    inputs go through the adapter)."""
    if _tied(lm):
        table = with_rows(lm.get_input_embeddings(), vocab_size, new_rows)
        lm.set_input_embeddings(table)
        lm.get_output_embeddings().weight = table.weight
    else:
        lm.set_output_embeddings(with_rows(lm.get_output_embeddings(), vocab_size, new_rows))
    lm.config.vocab_size = vocab_size


def random_base_config(cfg: MLLMConfig):
    """mllm.base_config -> a transformers config of its model_type (default qwen2)."""
    base = dict(cfg.base_config or {})
    if not base:
        raise ValueError("mllm.base_model=random needs mllm.base_config (a config dict with its model_type, e.g. llama, qwen2)")
    base.setdefault("model_type", "qwen2")
    return llm_config(base, "mllm.base_config", attn_implementation=attention_kernel(cfg.attn_implementation))


def load_base_lm(cfg: MLLMConfig, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The base causal LM in `dtype` (partitioned under ZeRO-3, see mllm/partition.py)."""
    kw = dict(dtype=dtype, attn_implementation=attention_kernel(cfg.attn_implementation))
    if cfg.base_model == "random":
        return AutoModelForCausalLM.from_config(random_base_config(cfg), dtype=dtype)
    try:
        return AutoModelForCausalLM.from_pretrained(cfg.base_model, **kw)
    except OSError as err:
        raise WeightsUnavailable(
            f"LLM {cfg.base_model!r} is not available offline: run `hf download {cfg.base_model}` on a "
            f"connected machine and pass its local directory as mllm.base_model ({type(err).__name__})"
        ) from None

