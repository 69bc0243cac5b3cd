"""Decoding with the unified LLM: CFG text-to-image sampling and image-grounded chat answers.

One KV-cached loop (`Decoder.loop`, after LlamaGen's prefill / decode_one_token / decode_n_tokens) with a
pluggable draw: the prompts are encoded once into a static cache (preallocated, updated in place); then each
step picks (CFG mix, temperature / top-k / top-p, the row's noise), draws, and feeds the drawn token back as
one cached step. With `compile=True` the cached step (embedding, every layer, the head's rows) is one
torch.compile graph, replayed as a CUDA graph on GPUs: at batch 1 an eager step is bound by kernel launches.
  - images: conditional and unconditional rows (the unconditional prompt used in training, see
    SequenceConfig.uncond_prompt) are one batch; the draw is the model's visual codec (tokenizer/codec.py):
    flat ids take logits over the visual rows only (the image span admits nothing else), mixed as
    uncond + scale * (cond - uncond), filtered and sampled; depth codes hand the hidden state to the depth
    heads (mllm/depth_head.py), which draw the L codes one at a time with CFG mixed at every depth. Both rows
    of a pair receive the guided draw. Exactly h*w positions per image.
  - text (`VocabRows`): logits over the text tokenizer's ids only, until the turn's end (<|im_end|>;
    Vicuna: </s>) or max_new_tokens.
Prompts of different lengths are left-padded; the attention mask hides the padding and position ids
count real tokens only. With a fixed seed, results are deterministic; the tests check the loop against an
uncached reference that re-runs the whole sequence every step (tests/mllm/reference_decoder.py).

Randomness is per row and stateless: row r draws token t by Gumbel-max, argmax(log p + g), with the
noise g a hash (splitmix64) of the row's key, the step and the vocabulary index. An image's key is made
of (seed, sample index, caption), so the same prompt, seed and sample index give the same image whatever
the batch size, the batch's other rows or the prompt's position in a file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm
from transformers import StaticCache

from semhitok.common.hub import resolve_pretrained
from semhitok.common.io import loads_json
from semhitok.common.plot import sample_grid
from semhitok.data_pipelines.sequences import SequenceBuilder
from semhitok.data_pipelines.text_tokenizer import load_text_tokenizer
from semhitok.mllm.config import MAX_SAMPLES_PER_PROMPT, SamplingConfig
from semhitok.mllm.model import VISUAL_TOKENIZER, SemHiTokLM
from semhitok.tokenizer import to_pil
from semhitok.tokenizer.codec import Pick
from semhitok.tokenizer.interface import VisualTokenizer, load_visual_tokenizer
from semhitok.tokenizer.kinds import paper_cfg_scale


def kind_sampling(kind: str, **given) -> SamplingConfig:
    """Image sampling settings for a model of tokenizer kind `kind`: the fields in `given`, the others
    SamplingConfig's defaults, except cfg_scale, which defaults to the kind's paper's (paper_cfg_scale)."""
    return SamplingConfig(**{"cfg_scale": paper_cfg_scale(kind), **given})


def cfg_mix(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on logits: uncond + scale * (cond - uncond)."""
    return uncond + scale * (cond - uncond)


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """logits [B, V] -> log-probabilities [B, V] after temperature, top-k and top-p (-inf outside)."""
    logits = logits.float() / max(temperature, 1e-6)
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits.log_softmax(-1)


def _i64(c: int) -> int:
    """an unsigned 64-bit constant as the signed int64 torch stores"""
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN, _MIX1, _MIX2 = _i64(0x9E3779B97F4A7C15), _i64(0xBF58476D1CE4E5B9), _i64(0x94D049BB133111EB)


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """logical right shift of int64 (torch's >> is arithmetic)"""
    return (x >> k) & ((1 << (64 - k)) - 1)


def row_key(seed: int, sample: int = 0, text: str = "") -> int:
    """A row's 64-bit noise key (signed) from the seed, the sample index and the prompt."""
    digest = hashlib.blake2b(f"{seed}\x00{sample}\x00{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def gumbel_noise(keys: torch.Tensor, step: int, n: int) -> torch.Tensor:
    """keys [B] int64 -> Gumbel(0, 1) noise [B, n] float64: splitmix64 outputs of each row's own stream
    at counters step * n + [0, n), so a row's noise depends on its key and the step only."""
    counter = torch.arange(n, device=keys.device, dtype=torch.int64) + step * n + 1
    x = keys[:, None] + counter[None] * _GOLDEN  # int64 arithmetic wraps around: splitmix64's state
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    x = x ^ _shr(x, 31)
    u = (_shr(x, 11).double() + 0.5) / float(1 << 53)  # uniform in (0, 1)
    return -torch.log(-torch.log(u))


def sample_rows(logp: torch.Tensor, keys: torch.Tensor, step: int, width: int | None = None) -> torch.Tensor:
    """log-probabilities [B, V] (-inf: excluded) -> one index per row [B], drawn with each row's noise (the
    first V of `width` draws at counter `step`; width defaults to V)."""
    return (logp.double() + gumbel_noise(keys, step, width or logp.shape[-1])[:, : logp.shape[-1]]).argmax(-1)


def choose(logits: torch.Tensor, sampling: "SamplingConfig", keys: torch.Tensor, step: int, width: int | None = None) -> torch.Tensor:
    """logits [B, V] -> token indices [B]: greedy at temperature 0, else temperature/top-k/top-p filtered and
    drawn with each row's noise at counter `step` (sample_rows)."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    return sample_rows(filter_logits(logits, sampling.temperature, sampling.top_k, sampling.top_p), keys, step, width)


def left_pad(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """token lists -> (ids [B, T] left-padded, attention mask [B, T])"""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def left_pad_codes(codes: list[np.ndarray | None], width: int, L: int, device) -> torch.Tensor:
    """per-row codes beside the tokens [T_r, L] (None: none) -> [B, width, L] aligned with left_pad's rows (-1 in
    the padding and where a row has none)"""
    out = torch.full((len(codes), width, L), -1, dtype=torch.long)
    for i, row in enumerate(codes):
        if row is not None:
            out[i, width - len(row) :] = torch.as_tensor(row)
    return out.to(device)


@dataclass(frozen=True)
class VocabRows:
    """A draw of one token per step from the head's vocabulary rows [lo, hi) (text answers). It has the
    interface of a visual codec's draw (tokenizer/codec.py), which image steps use."""

    lo: int
    hi: int

    @property
    def rows(self) -> tuple[int, int]:
        return self.lo, self.hi

    @property
    def noise(self) -> tuple[int, None]:
        return 1, None

    def draw(self, logits: torch.Tensor, head, pick: Pick) -> tuple[torch.Tensor, None]:
        return pick(logits, 0) + self.lo, None


class Decoder:
    """compile: capture the decoding step with torch.compile (CUDA graphs on GPUs); the first call per
    batch size compiles (tens of seconds), later ones replay.

    The static cache's unwritten slots are hidden by a causal mask built from the cache position, which
    sdpa, eager and flex attention apply; flash_attention_2 aligns causality to the end of the cache
    instead, so it is refused here (load_sampler loads models with sdpa)."""

    CACHE_ROUNDING = 256  # static cache lengths are multiples of this: few shapes, few compilations

    def __init__(self, model: SemHiTokLM, text_tokenizer, compile: bool = False):
        self.model, self.layout = model, model.layout
        self.seq_cfg = model.sequence_config  # the prompt format the model was trained with
        self.builder = SequenceBuilder(text_tokenizer, model.layout, self.seq_cfg, model.ids)
        self.tokenizer = text_tokenizer
        if model.lm.config._attn_implementation not in ("sdpa", "eager", "flex_attention"):
            raise ValueError(f"decoding needs sdpa, eager or flex_attention, not {model.lm.config._attn_implementation} "
                             "(SemHiTokLM.from_pretrained(..., attn_implementation='sdpa'))")
        self.compile = compile
        mode = "reduce-overhead" if model.device.type == "cuda" else None
        # not fullgraph: a graph break on some other stack slows decoding instead of stopping it (the tests
        # check that here the step is a single graph)
        self._step = torch.compile(self._step_output, mode=mode) if compile else self._step_output
        self._cache: tuple[tuple[int, int], StaticCache, torch.Tensor] | None = None  # reused: fixed addresses

    def _static_cache(self, rows: int, length: int) -> tuple[StaticCache, torch.Tensor]:
        """An empty static KV cache for `rows` sequences of up to `length` tokens (rounded up), and its padding
        mask buffer [rows, L] set to ones. The last one is kept and reused, so compiled graphs see the same
        tensors call after call."""
        size = (rows, -(-length // self.CACHE_ROUNDING) * self.CACHE_ROUNDING)
        if self._cache is None or self._cache[0] != size:  # (its tensors are allocated by the first prefill)
            self._cache = (size, StaticCache(config=self.model.lm.config, max_cache_len=size[1]),
                           torch.ones(size, dtype=torch.long, device=self.model.device))
        _, cache, mask = self._cache
        cache.reset()
        mask.fill_(1)
        return cache, mask

    # -- the pieces of a step ------------------------------------------------------------------------------
    def _head_rows(self, hidden: torch.Tensor, rows: tuple[int, int] | None) -> torch.Tensor:
        """hidden [B, d] -> fp32 logits [B, hi - lo] of vocabulary rows [lo, hi) only; rows None: hidden itself"""
        return hidden if rows is None else (hidden @ self.model.lm.lm_head.weight[rows[0] : rows[1]].t()).float()

    def _step_output(self, ids: torch.Tensor, codes: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor,
                     cache: StaticCache, rows: tuple[int, int] | None) -> torch.Tensor:
        """The cached step: one new token per row, ids [B, 1] with its codes [B, 1, L], positions [B, 1], padding
        mask [B, S] -> `_head_rows` of its hidden state; its keys/values are written into `cache` in place."""
        return self._from_embeds(self.model.embed_static(ids, codes), pos, mask, cache, rows)

    def _from_embeds(self, embeds: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, cache: StaticCache,
                     rows: tuple[int, int] | None) -> torch.Tensor:
        """_step_output from the new token's input embeddings [B, 1, d]"""
        out = self.model.lm.model(inputs_embeds=embeds, position_ids=pos, attention_mask=mask, past_key_values=cache, use_cache=True)
        return self._head_rows(out.last_hidden_state[:, -1], rows)

    def _prompt_logits(self, ids: torch.Tensor, mask: torch.Tensor, rows: tuple[int, int] | None,
                       cache: StaticCache | None = None, codes: torch.Tensor | None = None) -> torch.Tensor:
        """The prefill: whole left-padded rows ids [B, T] with their padding mask [B, >= T] (codes [B, T, L]
        beside them) -> `_head_rows` of the last position; with a cache, their keys/values fill it."""
        pos = (mask[:, : ids.shape[1]].cumsum(-1) - 1).clamp(min=0)
        out = self.model.hidden_states(ids, position_ids=pos, attention_mask=mask, past_key_values=cache, use_cache=cache is not None,
                                       visual_codes=codes)
        return self._head_rows(out.last_hidden_state[:, -1], rows)

    @torch.no_grad()
    def first_logits(self, prompts: list[list[int]], vocab: tuple[int, int], cfg_scale: float | None = None) -> torch.Tensor:
        """The logits of the first new token (CFG-mixed when cfg_scale is given, as `decode` samples them)."""
        ids, mask = left_pad(prompts, self.layout.eos, self.model.device)
        logits = self._prompt_logits(ids, mask, vocab)
        return logits if cfg_scale is None else cfg_mix(*logits.chunk(2), cfg_scale)

    def picker(self, sampling: SamplingConfig, keys: torch.Tensor, guided: bool, step: int, draw) -> Pick:
        """Step `step`'s pick(logits [B, V], l) -> ids [B]: CFG mix of the cond/uncond halves (guided; both rows
        get the guided id), then temperature / top-k / top-p and each row's noise at counter step * C + l
        (C, width: the draw's `noise`)."""
        counters, width = draw.noise

        def pick(logits: torch.Tensor, l: int) -> torch.Tensor:
            if guided:
                logits = cfg_mix(*logits.chunk(2), sampling.cfg_scale)
            token = choose(logits, sampling, keys, step * counters + l, width)
            return token.repeat(2) if guided else token

        return pick

    def prepare(self, prompts: list[list[int]], steps: int, sampling: SamplingConfig, guided: bool, keys: list[int] | None,
                codes: list[np.ndarray | None] | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Checked prompts -> (ids [B, T] left-padded, their mask [B, T], their codes [B, T, L] (-1 where none),
        the output rows' noise keys [n])"""
        context = self.model.lm.config.max_position_embeddings
        if steps < 1 or not prompts:
            raise ValueError(f"nothing to decode: {len(prompts)} prompt(s), {steps} new token(s)")
        if max(map(len, prompts)) + steps > context:
            raise ValueError(f"the prompt is {max(map(len, prompts))} tokens; with {steps} new tokens that exceeds the "
                             f"model's context of {context} tokens")
        device = self.model.device
        ids, mask = left_pad(prompts, self.layout.eos, device)
        width = ids.shape[1]
        side = left_pad_codes(codes or [None] * len(prompts), width, self.model.codec.L, device)  # [B, T, L]
        n = len(prompts) // 2 if guided else len(prompts)
        keys = keys if keys is not None else [row_key(sampling.seed, r) for r in range(n)]
        if len(keys) != n:
            raise ValueError(f"decode: {len(keys)} noise keys for {n} rows")
        return ids, mask, side, torch.tensor(keys, dtype=torch.int64, device=device)

    # -- the loop ------------------------------------------------------------------------------------------
    @torch.no_grad()  # (applied around every step of the generator)
    def loop(self, prompts: list[list[int]], steps: int, draw, sampling: SamplingConfig, guided: bool = False,
              stop: int | None = None, keys: list[int] | None = None, codes: list[np.ndarray | None] | None = None):
        """The decode loop. prompts (token lists; with guided, the first half conditional, the second
        unconditional) -> yields each step's (new tokens [n], their codes [n, L] or None) as soon as drawn
        (n = rows, or half of them when guided).

        draw: what a step draws from the hidden state: VocabRows(lo, hi) (a token of those rows) or the model's
        visual codec (`model.codec`: an image position, its token and codes). keys: each output row's noise key
        (row_key); default row_key(sampling.seed, row index). codes: each prompt's codes beside its tokens
        [len(prompt), L] (SequenceBuilder.codes_of; None: a row without).

        prefill (the prompts into a static KV cache) -> per step: pick (CFG mix, filter, draw: `picker`) ->
        the cached step (one token per row; contextual features re-read the image drawn so far)."""
        sampling = dataclasses.replace(sampling)  # checks its values again (a caller may have changed a field)
        ids, mask, side, row_keys = self.prepare(prompts, steps, sampling, guided, keys, codes)
        n, device, rows = len(row_keys), ids.device, draw.rows
        cache, cache_mask = self._static_cache(len(prompts), ids.shape[1] + steps)
        cache_mask[:, : ids.shape[1]] = mask  # later slots stay 1: causality hides those not yet written
        out = self._prompt_logits(ids, cache_mask, rows, cache, side)
        next_pos = mask.sum(-1, keepdim=True)  # [B, 1]: the position of each row's first new token
        no_codes = torch.full_like(side[:, :1], -1)  # [B, 1, L]: what a text token carries
        drawn: list[torch.Tensor] = []  # the codes so far (contextual features)
        finished = torch.zeros(n, dtype=torch.bool, device=device)
        for step in range(steps):
            tokens, step_codes = draw.draw(out, self.model.visual_head, self.picker(sampling, row_keys, guided, step, draw))
            token = tokens[:n]
            if stop is not None:
                token = token.masked_fill(finished, stop)
                finished |= token == stop
                tokens = token.repeat(2) if guided else token
            yield token, None if step_codes is None else step_codes[:n]
            if (stop is not None and finished.all()) or step + 1 == steps:
                break
            if step_codes is not None and not self.model.adapter.features.per_id:  # contextual: the image so far
                drawn.append(step_codes)
                embeds = self.model.adapter.images(torch.stack(drawn, dim=1))[:, -1:]
                out = self._from_embeds(embeds.to(self.model.lm.dtype), next_pos + step, cache_mask, cache, rows)
                continue
            if self.compile and device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are consumed
            out = self._step(tokens[:, None], no_codes if step_codes is None else step_codes[:, None], next_pos + step,
                             cache_mask, cache, rows)

    def stream(self, prompts: list[list[int]], steps: int, vocab: tuple[int, int], sampling: SamplingConfig,
               guided: bool = False, stop: int | None = None, keys: list[int] | None = None,
               codes: list[np.ndarray | None] | None = None):
        """Tokens of vocabulary rows [lo, hi) = vocab, one step at a time (`steps`): yields each step's new tokens [n]."""
        for token, _ in self.loop(prompts, steps, VocabRows(*vocab), sampling, guided, stop, keys, codes):
            yield token

    def decode(self, prompts: list[list[int]], steps: int, vocab: tuple[int, int], sampling: SamplingConfig,
               guided: bool = False, stop: int | None = None, keys: list[int] | None = None,
               codes: list[np.ndarray | None] | None = None) -> torch.Tensor:
        """`stream`, whole: new tokens [n, <= steps]."""
        return torch.stack(list(self.stream(prompts, steps, vocab, sampling, guided, stop, keys, codes)), dim=1)

    # -- the two uses ------------------------------------------------------------------------------------
    def image_prompts(self, captions: list[str], sampling: SamplingConfig,
                      samples: list[int] | None = None) -> tuple[list[list[int]], list[int], bool]:
        """captions -> (prompt rows: conditional, then unconditional when guided; each image's noise key; guided).
        Image r is keyed by (sampling.seed, samples[r], captions[r]); samples defaults to each caption's
        occurrence count in `captions` (0, 1, ...), so a repeated caption gives distinct images and a batch gives
        the images its rows give alone."""
        if not isinstance(captions, (list, tuple)) or not all(isinstance(c, str) for c in captions):
            raise ValueError(f"captions must be a list of strings, got {type(captions).__name__}")
        captions = [c if c.strip() else self.seq_cfg.uncond_prompt for c in captions]  # "": the unconditional prompt
        if samples is None:
            samples = [captions[:r].count(c) for r, c in enumerate(captions)]
        guided = sampling.cfg_scale != 1
        cond = [self.builder.generation_prompt(c) for c in captions]
        rows = cond + [self.builder.generation_prompt(self.seq_cfg.uncond_prompt)] * len(captions) if guided else cond
        return rows, [row_key(sampling.seed, j, c) for j, c in zip(samples, captions)], guided

    def image_ids(self, captions: list[str], sampling: SamplingConfig, samples: list[int] | None = None) -> torch.Tensor:
        """captions -> visual ids as the tokenizer's encode gives them ([B, h, w], or [B, h, w, L] for depth
        codes), keyed as in `image_prompts`."""
        rows, keys, guided = self.image_prompts(captions, sampling, samples)
        codec = self.model.codec
        codes = [c for _, c in self.loop(rows, self.model.ids.positions, codec, sampling, guided, keys=keys)]
        return codec.image(torch.stack(codes, dim=1))  # [B, h*w, L] -> the tokenizer's shape


    def _chat_prompt(self, turns: list[tuple[str, str]], image_ids: torch.Tensor | None) -> tuple[list[int], list]:
        """turns (+ the image's ids) -> the prompt's tokens and the codes beside them ([[T, L]] or [None])"""
        ids = None if image_ids is None else image_ids.flatten().cpu().numpy()
        prompt = self.builder.chat_prompt(turns, ids)
        codes = self.builder.codes_of(prompt, [] if ids is None else [ids])  # [T, L] or None
        return prompt, [codes]

    def answer(self, turns: list[tuple[str, str]], image_ids: torch.Tensor | None, sampling: SamplingConfig,
               max_new_tokens: int = 128) -> str:
        """[(role, text), ...] ending in a user turn (its <image> is replaced by the image) -> the reply"""
        prompt, codes = self._chat_prompt(turns, image_ids)
        tokens = self.decode([prompt], max_new_tokens, (0, len(self.tokenizer)), sampling, stop=self.layout.im_end, codes=codes)
        return self.tokenizer.decode(tokens[0], skip_special_tokens=True).strip()

    def answer_stream(self, turns: list[tuple[str, str]], image_ids: torch.Tensor | None, sampling: SamplingConfig,
                      max_new_tokens: int = 128):
        """`answer`, streamed: yields the reply so far each time it grows (never a half-decoded character); the
        last text yielded is `answer`'s (same tokens: the same decoding loop, step by step)."""
        prompt, codes = self._chat_prompt(turns, image_ids)
        tokens, shown = [], ""
        for token in self.stream([prompt], max_new_tokens, (0, len(self.tokenizer)), sampling, stop=self.layout.im_end,
                                 codes=codes):
            tokens.append(int(token[0]))
            text = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
            if text != shown and not text.endswith("\ufffd"):
                shown = text
                yield text
        if text != shown:  # a reply ending in an undecodable byte, as `answer` gives it
            yield text


# -- files -----------------------------------------------------------------------------------------------
def read_prompts(path: str | Path) -> list[str]:
    """A .txt (one prompt per line) or .jsonl file (rows with "prompt", "caption" or "text") -> prompts."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} not found")
    prompts = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            prompts.append(line.strip())
            continue
        row = loads_json(line, f"{path}:{n}")
        try:
            prompts.append(next(row[k] for k in ("prompt", "caption", "text") if k in row))
        except (StopIteration, TypeError):
            raise ValueError(f"{path}:{n}: expected a JSON object with a 'prompt', 'caption' or 'text' field") from None
    return prompts


def load_sampler(model_dir: str | Path, device: str | None = None, compile: bool = False) -> tuple[Decoder, VisualTokenizer]:
    """A model directory (SemHiTokLM.save_pretrained) or Hub id -> (decoder, its visual tokenizer)."""
    model_dir = resolve_pretrained(model_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    model = SemHiTokLM.from_pretrained(model_dir, device, dtype, attn_implementation="sdpa")
    decoder = Decoder(model, load_text_tokenizer(str(model_dir)), compile)
    return decoder, load_visual_tokenizer(Path(model_dir) / VISUAL_TOKENIZER, device)


def sample_images(decoder: Decoder, visual: VisualTokenizer, prompts: list[str], out: str | Path, sampling: SamplingConfig,
                  batch_size: int = 8, per_prompt: int = 1, grid_limit: int = 64,
                  verdict: Callable[[str, Image.Image], tuple[bool, str] | None] | None = None) -> Path:
    """Generate per_prompt images for every prompt -> out/images/<prompt>_<sample>.png, out/prompts.jsonl
    (prompt, sample, file and the sampling settings; ok and reason where `verdict` judges the image, e.g.
    eval.world_eval.prompt_checker) and out/grid.png (plot.sample_grid: each image with its prompt, framed by
    its verdict; up to grid_limit images). Image (prompt, j) is keyed by (seed, j, prompt): the same whatever
    batch_size."""
    if not 1 <= per_prompt <= MAX_SAMPLES_PER_PROMPT or batch_size < 1:
        raise ValueError(f"samples per prompt must lie in [1, {MAX_SAMPLES_PER_PROMPT}] and batch size be >= 1, "
                         f"got {per_prompt} and {batch_size}")
    if not prompts:
        raise ValueError("no prompts to sample")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    total = len(prompts) * per_prompt
    jobs = ((i, j) for i in range(len(prompts)) for j in range(per_prompt))  # (not a list: drawn a batch at a time)
    settings = {"seed": sampling.seed, "cfg_scale": sampling.cfg_scale, "temperature": sampling.temperature,
                "top_k": sampling.top_k, "top_p": sampling.top_p}
    shown: list[tuple[Image.Image, str, bool | None]] = []
    with open(out / "prompts.jsonl", "w") as index:
        for _ in tqdm(range(0, total, batch_size), desc="sample", unit="batch", dynamic_ncols=True):
            batch = list(itertools.islice(jobs, batch_size))
            ids = decoder.image_ids([prompts[i] for i, _ in batch], sampling, samples=[j for _, j in batch])
            for (i, j), image in zip(batch, visual.decode(ids.to(visual.device))):
                name = f"images/{i:05d}_{j}.png"
                pil = to_pil(image)
                pil.save(out / name)
                judged = verdict(prompts[i], pil) if verdict is not None else None
                row = {"prompt": prompts[i], "sample": j, "file": name, **settings}
                if judged is not None:
                    row.update(ok=judged[0], reason=judged[1])
                index.write(json.dumps(row) + "\n")
                if len(shown) < grid_limit:
                    shown.append((pil, prompts[i], None if judged is None else judged[0]))
    images, texts, verdicts = zip(*shown)
    sample_grid(list(images), list(texts), list(verdicts), per_prompt,
                title=f"generated images (CFG {sampling.cfg_scale:g}, seed {sampling.seed}), each with its prompt").save(out / "grid.png")
    return out / "grid.png"
