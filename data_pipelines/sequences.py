"""Pre-tokenized samples -> token documents for the LLM, with the positions that carry loss.

A document is rendered as text in its family's chat format (`[img]` = <|vision_start|> + the image's h*w
visual tokens + <|vision_end|>), tokenized in one piece, so its tokens equal the tokenizer's own
tokenization of the same conversation (`apply_chat_template`), also where a turn starts with a newline
or a space that merges with the template's text; visual ids are then inserted inside each image span.
Loss sits on the tokens whose characters overlap the supervised text (character offsets).

    qwen2.5 / qwen2 (ChatML)
    understanding   <|im_start|>system\\n{system}<|im_end|>\\n
                    <|im_start|>user\\n{text with [img] where <image> stands}<|im_end|>\\n
                    <|im_start|>assistant\\n{answer}<|im_end|>\\n   ... more turns
                    loss: each answer and its <|im_end|>
    generation      <|im_start|>system ... <|im_start|>user\\n{caption}<|im_end|>\\n<|im_start|>assistant\\n[img]<|im_end|>\\n
                    loss: the visual tokens, <|vision_end|> and <|im_end|>; the caption is replaced by the
                    unconditional prompt for a seeded `cfg_dropout` share of documents
    text            {text}<|endoftext|>, loss on every token

    vicuna_v1 (LLaVA-1.5 on LLaMA/Vicuna)
    understanding   <s>{system} USER: {text with [img]} ASSISTANT: {answer}</s>USER: ... ASSISTANT: ...</s>
                    loss: " {answer}</s>" of each answer
    generation      <s>{system} USER: {caption} ASSISTANT: [img]</s>, loss after <|vision_start|>
    text            <s>{text}</s>

An image row becomes tokens through the tokenizer's visual codec (tokenizer/codec.py): flat ids are
vocabulary rows of their own; depth codes are one placeholder token per position (also its label where
supervised) with the position's L codes beside it in `Document.codes` [T, L] (-1 at non-visual tokens).

The system prompt is `SequenceConfig.system_prompt`, or the family's default (text_tokenizer.DEFAULT_SYSTEM).
`generation_prompt` is the generation document up to and including <|vision_start|>: the sampler's prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from semhitok.data_pipelines.config import TASKS, SequenceConfig
from semhitok.data_pipelines.text_tokenizer import DEFAULT_SYSTEM, IMAGE_END, IMAGE_START, TokenLayout, chat_format
from semhitok.tokenizer.codec import VisualCodec
from semhitok.tokenizer.interface import IdStructure

IGNORE = -100  # label of positions without loss
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IMAGE = IMAGE_START + IMAGE_END  # an image's place in rendered text; its ids go between the two tokens
Piece = tuple[str, bool]  # (text, carries loss)


class UnsuitableSample(ValueError):
    """The sample cannot make a document of the requested task (e.g. generation from a text-only row)."""


@dataclass
class Document:
    tokens: np.ndarray  # int64 [T]
    labels: np.ndarray  # int64 [T], IGNORE where no loss (unshifted: label t is token t)
    task: str
    origin: str  # where the sample came from (file:line), for error reports
    uncond: bool = False  # generation caption replaced by the unconditional prompt
    codes: np.ndarray | None = None  # int64 [T, L] beside the tokens (the codec's side codes), -1 at non-visual tokens

    def __len__(self) -> int:
        return len(self.tokens)


def render(fmt: str, system: str, turns: list[tuple[str, str]], eos: str, open_answer: bool = False) -> list[Piece]:
    """A conversation [(role, text), ...] in chat format `fmt` -> pieces; open_answer: end with the opening of
    the assistant's next answer (the generation prompt)."""
    if fmt == "vicuna_v1":  # LLaVA-1.5 conv_vicuna_v1: SeparatorStyle.TWO, sep " ", sep2 eos
        pieces = [(system + " ", False)] if system else []
        for role, text in turns:
            pieces += [(f"USER: {text} ", False)] if role != "assistant" else [("ASSISTANT:", False), (f" {text}{eos}", True)]
        return pieces + ([("ASSISTANT:", False)] if open_answer else [])
    pieces = [(f"<|im_start|>system\n{system}<|im_end|>\n", False)] if system else []
    for role, text in turns:
        if role == "assistant":
            pieces += [("<|im_start|>assistant\n", False), (text + "<|im_end|>", True), ("\n", False)]
        else:
            pieces += [(f"<|im_start|>{role}\n{text}<|im_end|>\n", False)]
    return pieces + ([("<|im_start|>assistant\n", False)] if open_answer else [])


class SequenceBuilder:
    def __init__(self, tokenizer, layout: TokenLayout, cfg: SequenceConfig, ids: IdStructure | None = None):
        """ids: the tokenizer's id structure (None: one flat id per position, as many as the layout's visual rows)."""
        self.tokenizer, self.layout, self.cfg = tokenizer, layout, cfg
        ids = ids or IdStructure("", 0, (layout.visual_vocab_size,), (1,))
        if ids.visual_vocab_size != layout.visual_vocab_size:
            raise ValueError(f"a tokenizer with codes {list(ids.code_vocab_sizes)} needs {ids.visual_vocab_size} visual "
                             f"row(s) in the layout, not {layout.visual_vocab_size}")
        self.codec = VisualCodec.of(ids, layout.visual_offset)
        self.format = chat_format(tokenizer, cfg.chat_format)
        self.system = DEFAULT_SYSTEM[self.format] if cfg.system_prompt is None else cfg.system_prompt
        self.bos = [tokenizer.bos_token_id] if self.format == "vicuna_v1" and tokenizer.bos_token_id is not None else []
        # what the tokenizer reads as one special token wherever it stands in a text: in a person's text one would end
        # a turn, open a system turn or place an image
        specials = set(tokenizer.all_special_tokens) | {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
        self.control_tokens = sorted(specials - {""})

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def visual_tokens(self, ids: np.ndarray) -> list[int]:
        """an image row [h*w*L] -> its h*w LLM tokens"""
        return self.codec.tokens(ids)

    def image_span(self, ids: np.ndarray) -> list[int]:
        """visual ids [h*w*L] -> <|vision_start|> tokens <|vision_end|>"""
        return [self.layout.image_start, *self.visual_tokens(ids), self.layout.image_end]

    def codes_of(self, tokens: list[int], images: list[np.ndarray]) -> np.ndarray | None:
        """the codes beside a document's tokens [T, L] (-1 elsewhere), or None when the codec has none"""
        return self.codec.side_codes(tokens, images)

    def tokenize(self, pieces: list[Piece], images: list[np.ndarray]) -> tuple[list[int], list[int]]:
        """Rendered pieces with one IMAGE per entry of `images` -> (tokens, labels). The text is tokenized in
        one piece; a token carries loss when its characters overlap a supervised piece; each image's visual
        ids follow its <|vision_start|> and carry loss when its <|vision_end|> does."""
        text = "".join(t for t, _ in pieces)
        supervised = np.concatenate([np.full(len(t), s, bool) for t, s in pieces] + [np.zeros(0, bool)])
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], np.int64)
        spans = np.asarray(enc["offset_mapping"], np.int64).reshape(-1, 2)
        covered = np.concatenate([[0], np.cumsum(supervised)])  # [chars + 1]
        labelled = covered[spans[:, 1]] > covered[spans[:, 0]]
        starts = np.flatnonzero(ids == self.layout.image_start)
        if len(starts) != len(images) or (ids == self.layout.image_end).sum() != len(images):
            raise UnsuitableSample(f"expected {len(images)} image span(s), the text makes {len(starts)} start(s) and "
                                   f"{int((ids == self.layout.image_end).sum())} end(s) (an image delimiter token written in the text?)")
        tokens, labels, at = list(self.bos), [IGNORE] * len(self.bos), 0
        for start, image in zip(starts, images):
            tokens += ids[at : start + 1].tolist()
            labels += np.where(labelled[at:start], ids[at:start], IGNORE).tolist() + [IGNORE]  # never <|vision_start|>
            visual = self.visual_tokens(image)
            tokens += visual
            labels += visual if labelled[start + 1] else [IGNORE] * len(visual)
            at = start + 1
        tokens += ids[at:].tolist()
        labels += np.where(labelled[at:], ids[at:], IGNORE).tolist()
        return tokens, labels

    def _turns(self, turns: list[tuple[str, str]]) -> tuple[str, list[tuple[str, str]]]:
        """A leading system turn replaces the default system prompt."""
        if turns and turns[0][0] == "system":
            return turns[0][1], turns[1:]
        return self.system, turns

    def check_typed(self, text: str) -> str:
        """Text a person typed (a chat message, a question, a prompt) -> itself, or UnsuitableSample naming the control
        token it holds (the tokenizer would read it as that token, not as text)."""
        held = [(text.find(token), -len(token), token) for token in self.control_tokens if token in text]
        if held:  # the first one in the text (the longest of those starting there)
            raise UnsuitableSample(f"the text holds {min(held)[2]!r}, a control token of the model's chat format: remove it")
        return text

    def _user_text(self, text: str) -> str:
        return self.check_typed(text).replace("<image>", IMAGE)

    def generation_prompt(self, caption: str) -> list[int]:
        """The prefix a generation document (and the sampler) starts from, ending in <|vision_start|>. The caption is
        typed text (check_typed)."""
        tokens, _ = self._generation_tokens(self.check_typed(caption), np.zeros(0, np.int64))
        return tokens[: tokens.index(self.layout.image_start) + 1]

    def chat_prompt(self, turns: list[tuple[str, str]], ids: np.ndarray | None = None) -> list[int]:
        """[(role, text), ...] ending in a user turn -> tokens up to the assistant's answer (for chat)."""
        system, turns = self._turns(turns)
        turns = [(r, self._user_text(t) if r == "user" else t) for r, t in turns]
        images = [ids] * sum(t.count(IMAGE) for r, t in turns if r == "user")  # the one image, wherever placed
        if images and ids is None:
            raise UnsuitableSample("the conversation has an <image> but no image was given")
        return self.tokenize(render(self.format, system, turns, self.tokenizer.eos_token, open_answer=True), images)[0]

    # -- documents -------------------------------------------------------------------------------------
    def understanding(self, meta: dict, ids: np.ndarray | list[np.ndarray] | None) -> Document:
        """ids: one image's ids [h*w], or a list of them (one per <image>, in order)."""
        if ids is None:
            raise UnsuitableSample("understanding needs an image")
        if "conversations" in meta:
            turns = [(ROLES.get(t.get("from", t.get("role")), ""), t.get("value", t.get("content", ""))) for t in meta["conversations"]]
            if any(role == "" for role, _ in turns):
                raise UnsuitableSample("a conversation turn has an unknown role")
            users = [i for i, (role, _) in enumerate(turns) if role == "user"]
            if not users:
                raise UnsuitableSample("the conversation has no user turn")
            if not any("<image>" in turns[i][1] for i in users):
                first = users[0]
                turns[first] = ("user", "<image>\n" + turns[first][1])  # LLaVA convention: image before the first turn
        else:
            turns = [("user", f"<image>\n{self.cfg.caption_prompt}"), ("assistant", meta["text"])]
        system, turns = self._turns(turns)
        turns = [(r, self._user_text(t) if r == "user" else t) for r, t in turns]
        images = [ids] if isinstance(ids, np.ndarray) else list(ids)
        tags = sum(t.count(IMAGE) for r, t in turns if r == "user")
        if tags != len(images):
            raise UnsuitableSample(f"more {'<image> tags than images' if tags > len(images) else 'images than <image> tags'}")
        tokens, labels = self.tokenize(render(self.format, system, turns, self.tokenizer.eos_token), images)
        return Document(np.array(tokens, np.int64), np.array(labels, np.int64), "understanding", meta.get("origin", ""),
                        codes=self.codes_of(tokens, images))

    def _generation_tokens(self, caption: str, ids: np.ndarray) -> tuple[list[int], list[int]]:
        pieces = render(self.format, self.system, [("user", caption), ("assistant", IMAGE)], self.tokenizer.eos_token)
        tokens, labels = self.tokenize(pieces, [ids])
        start = tokens.index(self.layout.image_start)
        return tokens, [IGNORE] * (start + 1) + labels[start + 1 :]  # loss only after <|vision_start|>

    def generation(self, meta: dict, ids: np.ndarray | None, uncond: bool) -> Document:
        if ids is None or not isinstance(ids, np.ndarray) or "text" not in meta:
            raise UnsuitableSample("generation needs a caption and an image")
        if IMAGE_START in meta["text"] or IMAGE_END in meta["text"]:
            raise UnsuitableSample("the caption contains an image delimiter token")
        tokens, labels = self._generation_tokens(self.cfg.uncond_prompt if uncond else meta["text"], ids)
        return Document(np.array(tokens, np.int64), np.array(labels, np.int64), "generation", meta.get("origin", ""), uncond,
                        codes=self.codes_of(tokens, [ids]))

    def text(self, meta: dict) -> Document:
        if "text" not in meta:
            raise UnsuitableSample("text needs a 'text' field")
        tokens = np.array(self.bos + self.encode_text(meta["text"]) + [self.layout.eos], np.int64)
        return Document(tokens, tokens.copy(), "text", meta.get("origin", ""))

    def build(self, task: str, meta: dict, ids: np.ndarray | None, uncond: bool = False) -> Document:
        if task == "understanding":
            return self.understanding(meta, ids)
        if task == "generation":
            return self.generation(meta, ids, uncond)
        if task == "text":
            return self.text(meta)
        raise ValueError(f"unknown task {task!r} (one of {TASKS})")
