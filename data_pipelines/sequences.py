"""Pre-tokenized samples -> token documents for the LLM, with the positions that carry loss.

Formats (Qwen2.5 chat template; `[img]` = <|vision_start|> + the image's h*w visual tokens + <|vision_end|>):

    understanding   <|im_start|>system\\n{system}<|im_end|>\\n
                    <|im_start|>user\\n{text with [img] where <image> stands}<|im_end|>\\n
                    <|im_start|>assistant\\n{answer}<|im_end|>\\n   ... more turns
                    loss: each answer and its <|im_end|>
    generation      <|im_start|>system ... <|im_start|>user\\n{caption}<|im_end|>\\n<|im_start|>assistant\\n[img]<|im_end|>\\n
                    loss: the visual tokens, <|vision_end|> and <|im_end|>; the caption is replaced by the
                    unconditional prompt for a seeded `cfg_dropout` share of documents
    text            {text}<|endoftext|>, loss on every token

`generation_prompt` is the generation format up to and including <|vision_start|>: the sampler's prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from semhitok.data_pipelines.config import SequenceConfig
from semhitok.data_pipelines.text_tokenizer import TokenLayout

IGNORE = -100  # label of positions without loss
TASKS = ("understanding", "generation", "text")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class UnsuitableSample(ValueError):
    """The sample cannot make a document of the requested task (e.g. generation from a text-only row)."""


@dataclass
class Document:
    tokens: np.ndarray  # int64 [T]
    labels: np.ndarray  # int64 [T], IGNORE where no loss (unshifted: label t is token t)
    task: str
    origin: str  # where the sample came from (file:line), for error reports
    uncond: bool = False  # generation caption replaced by the unconditional prompt

    def __len__(self) -> int:
        return len(self.tokens)


class SequenceBuilder:
    def __init__(self, tokenizer, layout: TokenLayout, cfg: SequenceConfig):
        self.tokenizer, self.layout, self.cfg = tokenizer, layout, cfg

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def image_span(self, ids: np.ndarray) -> list[int]:
        """visual ids [h*w] in [0, K*m) -> <|vision_start|> tokens <|vision_end|>"""
        return [self.layout.image_start, *(np.asarray(ids, np.int64) + self.layout.visual_offset).tolist(), self.layout.image_end]

    # -- chat pieces ----------------------------------------------------------------------------------
    def _turn_open(self, role: str) -> list[int]:
        return [self.layout.im_start, *self.encode_text(f"{role}\n")]

    def _turn_close(self) -> tuple[list[int], list[int]]:
        return [self.layout.im_end], self.encode_text("\n")

    def _system(self) -> list[int]:
        if not self.cfg.system_prompt:
            return []
        close, newline = self._turn_close()
        return self._turn_open("system") + self.encode_text(self.cfg.system_prompt) + close + newline

    def _content(self, text: str, images: Iterator[np.ndarray]) -> list[int]:
        """A user turn's text with the next image's span where each <image> stands."""
        pieces = text.split("<image>")
        out = self.encode_text(pieces[0])
        for piece in pieces[1:]:
            ids = next(images, None)
            if ids is None:
                raise UnsuitableSample("more <image> tags than images")
            out += self.image_span(ids) + self.encode_text(piece)
        return out

    def generation_prompt(self, caption: str) -> list[int]:
        """The prefix a generation document (and the sampler) starts from, ending in <|vision_start|>."""
        close, newline = self._turn_close()
        return (self._system() + self._turn_open("user") + self.encode_text(caption) + close + newline
                + self._turn_open("assistant") + [self.layout.image_start])

    def chat_prompt(self, turns: list[tuple[str, str]], ids: np.ndarray | None = None) -> list[int]:
        """[(role, text), ...] ending in a user turn -> tokens up to the assistant's answer (for chat)."""
        tokens = self._system()
        close, newline = self._turn_close()
        for role, text in turns:
            images = iter([] if ids is None else [ids])  # the one image, wherever the user turns place it
            tokens += self._turn_open(role) + (self._content(text, images) if role == "user" else self.encode_text(text)) + close + newline
        return tokens + self._turn_open("assistant")

    # -- documents -------------------------------------------------------------------------------------
    def understanding(self, meta: dict, ids: np.ndarray | list[np.ndarray] | None) -> Document:
        """ids: one image's ids [h*w], or a list of them (one per <image>, in order)."""
        if ids is None:
            raise UnsuitableSample("understanding needs an image")
        if "conversations" in meta:
            turns = [(ROLES.get(t.get("from", t.get("role")), ""), t.get("value", t.get("content", ""))) for t in meta["conversations"]]
            if any(role == "" for role, _ in turns):
                raise UnsuitableSample("a conversation turn has an unknown role")
            if not any("<image>" in text for role, text in turns if role == "user") and isinstance(ids, np.ndarray):
                first = next(i for i, (role, _) in enumerate(turns) if role == "user")
                turns[first] = ("user", "<image>\n" + turns[first][1])  # LLaVA convention: image before the first turn
        else:
            turns = [("user", f"<image>\n{self.cfg.caption_prompt}"), ("assistant", meta["text"])]
        system = self._system()
        tokens, labels = list(system), [IGNORE] * len(system)
        close, newline = self._turn_close()
        images = iter([ids] if isinstance(ids, np.ndarray) else ids)
        for role, text in turns:
            head = self._turn_open(role)
            if role == "assistant":
                answer = self.encode_text(text) + close
                tokens += head + answer + newline
                labels += [IGNORE] * len(head) + answer + [IGNORE] * len(newline)
            else:
                body = head + self._content(text, images) + close + newline
                tokens += body
                labels += [IGNORE] * len(body)
        if next(images, None) is not None:
            raise UnsuitableSample("more images than <image> tags")
        return Document(np.array(tokens, np.int64), np.array(labels, np.int64), "understanding", meta.get("origin", ""))

    def generation(self, meta: dict, ids: np.ndarray | None, uncond: bool) -> Document:
        if ids is None or not isinstance(ids, np.ndarray) or "text" not in meta:
            raise UnsuitableSample("generation needs a caption and an image")
        prompt = self.generation_prompt(self.cfg.uncond_prompt if uncond else meta["text"])
        target = (np.asarray(ids, np.int64) + self.layout.visual_offset).tolist() + [self.layout.image_end, self.layout.im_end]
        newline = self.encode_text("\n")
        tokens = prompt + target + newline
        labels = [IGNORE] * len(prompt) + target + [IGNORE] * len(newline)
        return Document(np.array(tokens, np.int64), np.array(labels, np.int64), "generation", meta.get("origin", ""), uncond)

    def text(self, meta: dict) -> Document:
        if "text" not in meta:
            raise UnsuitableSample("text needs a 'text' field")
        tokens = np.array(self.encode_text(meta["text"]) + [self.layout.eos], np.int64)
        return Document(tokens, tokens.copy(), "text", meta.get("origin", ""))

    def build(self, task: str, meta: dict, ids: np.ndarray | None, uncond: bool = False) -> Document:
        if task == "understanding":
            return self.understanding(meta, ids)
        if task == "generation":
            return self.generation(meta, ids, uncond)
        if task == "text":
            return self.text(meta)
        raise ValueError(f"unknown task {task!r} (one of {TASKS})")
