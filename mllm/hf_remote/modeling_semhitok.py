"""SemHiTok MLLM for transformers' remote code: AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True).

Self-contained (torch, transformers, safetensors). The base LLM is built from `config.text_config` with the
same weight names as a plain causal LM (model.*, lm_head.*); visual ids (>= text_vocab_size) enter through
the dual-MLP adapter, whose weights are the export's adapter.safetensors. The head scores text and visual
ids alike; `generate` keeps each where semhitok's decoder does (ImageSpanLogits): a reply is text until it opens
<|vision_start|>, then exactly image_grid**2 visual ids and <|vision_end|>. Decode those ids with the visual
tokenizer in visual_tokenizer/ (semhitok), they are not text. Also AutoModelForImageTextToText, so
pipeline("image-text-to-text", model=dir, trust_remote_code=True) answers image questions.
"""

import torch
import torch.nn as nn
from safetensors.torch import load_file
from transformers import AutoModel, GenerationMixin, LogitsProcessor, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import cached_file

from .configuration_semhitok import SemHiTokMLLMConfig

ADAPTER_WEIGHTS = "adapter.safetensors"


class VisualAdapter(nn.Module):
    """visual ids [N] -> input embeddings [N, d]: concat(MLP_sem(sem code), MLP_pix(pix code)) (semantic: MLP_sem alone;
    concat: MLP_visual(concat(sem code, pix code)))."""

    def __init__(self, config: SemHiTokMLLMConfig):
        super().__init__()
        d, hidden, m = config.text_config.hidden_size, config.adapter_hidden, config.codes_per_group
        self.codes_per_group = m
        self.register_buffer("sem_codes", torch.zeros(config.visual_vocab_size // m, config.sem_code_dim))
        self.register_buffer("pix_codes", torch.zeros(config.visual_vocab_size, config.pix_code_dim))
        both = config.adapter_inputs == "both"
        if config.adapter_inputs == "concat":  # one MLP on concat(sem code, pix code)
            width = config.sem_code_dim + config.pix_code_dim
            self.visual_mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, d))
            self.sem_mlp = self.pix_mlp = None
            return
        self.visual_mlp = None
        self.sem_mlp = nn.Sequential(nn.Linear(config.sem_code_dim, hidden), nn.GELU(), nn.Linear(hidden, d - d // 2 if both else d))
        self.pix_mlp = nn.Sequential(nn.Linear(config.pix_code_dim, hidden), nn.GELU(), nn.Linear(hidden, d // 2)) if both else None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.visual_mlp is not None:
            feats = torch.cat([self.sem_codes[ids // self.codes_per_group], self.pix_codes[ids]], dim=-1)
            return self.visual_mlp(feats.to(self.visual_mlp[0].weight.dtype))
        dtype = self.sem_mlp[0].weight.dtype
        sem = self.sem_mlp(self.sem_codes[ids // self.codes_per_group].to(dtype))
        return sem if self.pix_mlp is None else torch.cat([sem, self.pix_mlp(self.pix_codes[ids].to(dtype))], dim=-1)


class ImageSpanLogits(LogitsProcessor):
    """The ids semhitok's decoder allows at each step: outside an image span the tokenizer's text ids (rows above
    them are padding); inside one (after <|vision_start|>) visual ids until the span holds image_grid**2 of them,
    then only <|vision_end|>. Runs before temperature and top-k/top-p, so sampling draws from the allowed ids."""

    def __init__(self, config: SemHiTokMLLMConfig):
        ids = torch.arange(config.text_config.vocab_size)
        self.text = ids < (config.text_tokens or config.text_vocab_size)
        self.visual = (ids >= config.text_vocab_size) & (ids < config.text_vocab_size + config.visual_vocab_size)
        self.close = ids == config.image_end
        self.start, self.end, self.span = config.image_start, config.image_end, config.image_grid ** 2

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] (prompt and ids so far), scores [B, V] -> scores with the disallowed ids at -inf"""
        if self.text.device != scores.device:
            self.text, self.visual, self.close = (m.to(scores.device) for m in (self.text, self.visual, self.close))
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        start = torch.where(input_ids == self.start, pos, -1).amax(-1)  # [B]: the last <|vision_start|>, -1: none
        inside = (start > torch.where(input_ids == self.end, pos, -1).amax(-1)).to(scores.device)[:, None]
        full = (input_ids.shape[1] - 1 - start >= self.span).to(scores.device)[:, None]
        allowed = torch.where(inside, torch.where(full, self.close, self.visual), self.text)  # [B, V]
        return scores.masked_fill(~allowed, float("-inf"))


class SemHiTokForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = SemHiTokMLLMConfig
    base_model_prefix = "model"
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _keys_to_ignore_on_load_missing = [r"^adapter\."]  # read from adapter.safetensors after loading
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def __init__(self, config: SemHiTokMLLMConfig):
        super().__init__(config)
        text = config.text_config
        self.model = AutoModel.from_config(text)
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self.adapter = VisualAdapter(config)
        self.post_init()

    def _init_weights(self, module):  # every weight comes from the export
        pass

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        hub = {k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only", "subfolder") if k in kwargs}
        path = cached_file(pretrained_model_name_or_path, ADAPTER_WEIGHTS, _raise_exceptions_for_missing_entries=False, **hub)
        if path is not None:  # a semhitok export; a directory saved by this class has adapter.* in its weights
            device = model.lm_head.weight.device
            # (exports since tokenizer kinds keep the code tables under features.)
            model.adapter.load_state_dict({k.removeprefix("features."): v.to(device) for k, v in load_file(path).items()})
            model.adapter.to(model.lm_head.weight.dtype)
        return model

    def _get_logits_processor(self, *args, **kwargs):
        """generate's logits processors with ImageSpanLogits first: a `logits_processor` passed to generate would
        run after top-k/top-p, which may keep only ids the span rule then masks, leaving nothing to draw."""
        processors = super()._get_logits_processor(*args, **kwargs)
        processors.insert(0, ImageSpanLogits(self.config))
        return processors

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] (text and visual) -> input embeddings [B, T, d]"""
        visual = input_ids >= self.config.text_vocab_size
        embeds = self.model.get_input_embeddings()(input_ids.masked_fill(visual, 0))
        if visual.any():
            image = self.adapter(input_ids[visual] - self.config.text_vocab_size).to(embeds.dtype)
            embeds = embeds.masked_scatter(visual[..., None], image)
        return embeds

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                use_cache=None, logits_to_keep=0, **kwargs) -> CausalLMOutputWithPast:
        """input_ids [B, T] -> logits [B, T', V]; the KV cache (`cache`, formerly `past_key_values`) rides in kwargs."""
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids)
        out = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=use_cache, **kwargs)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(out.last_hidden_state[:, keep])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs)
        cache = {k: v for k, v in out.items() if k in ("cache", "past_key_values")}  # the field's name in this version
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions,
                                      **cache)
