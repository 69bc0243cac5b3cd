"""The text tokenizer and the unified token layout (text ids, then visual ids).

Layout of the LLM's vocabulary (what the embedding rows and head columns mean):

    [0, text_vocab_size)                                text tokens (Qwen2.5: 151,936 rows, incl. specials)
    [text_vocab_size, text_vocab_size + K*m)            visual id h = sem * m + pix  ->  token text_vocab_size + h

Qwen2.5 at defaults: 151,936 + 16,384 * 12 = 348,544 rows. Image spans are `<|vision_start|>` ids
`<|vision_end|>` (Qwen2.5 already has both special tokens; they are added when a tokenizer lacks them).
Visual ids are not strings in the text tokenizer; `TokenLayout` converts between the two ranges.

`tiny` builds a small byte-level BPE of the same kind (trained on the shipped sample's text, Qwen2.5's
special tokens and chat template), so tests and the tiny preset need nothing from the hub.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

IMAGE_START, IMAGE_END = "<|vision_start|>", "<|vision_end|>"
IM_START, IM_END, EOS = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
SPECIAL_TOKENS = [EOS, IM_START, IM_END, IMAGE_START, IMAGE_END]

# Qwen2.5's chat template without the tool-calling branches (the formatting of plain turns is identical).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


class TextTokenizerUnavailable(RuntimeError):
    pass


@dataclass(frozen=True)
class TokenLayout:
    text_vocab_size: int  # embedding rows for text (>= len(tokenizer); Qwen pads to a multiple of 128)
    visual_vocab_size: int  # K * m
    image_start: int
    image_end: int
    im_start: int
    im_end: int
    eos: int

    @property
    def visual_offset(self) -> int:
        return self.text_vocab_size

    @property
    def vocab_size(self) -> int:
        return self.text_vocab_size + self.visual_vocab_size

    @classmethod
    def from_tokenizer(cls, tokenizer, visual_vocab_size: int, text_vocab_size: int | None = None) -> TokenLayout:
        """text_vocab_size defaults to len(tokenizer) rounded up to a multiple of 64."""
        n = len(tokenizer)
        text_vocab_size = text_vocab_size or -(-n // 64) * 64
        if text_vocab_size < n:
            raise ValueError(f"text_vocab_size {text_vocab_size} is smaller than the tokenizer ({n} tokens)")
        token_id = tokenizer.convert_tokens_to_ids
        return cls(text_vocab_size, visual_vocab_size, image_start=token_id(IMAGE_START), image_end=token_id(IMAGE_END),
                   im_start=token_id(IM_START), im_end=token_id(IM_END), eos=token_id(EOS))


def load_text_tokenizer(name_or_path: str):
    """A Qwen2.5-style tokenizer by HF name or local path, with the image delimiters present."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except OSError as err:
        raise TextTokenizerUnavailable(
            f"text tokenizer {name_or_path!r} is not available offline: run `hf download "
            f"{name_or_path}` on a connected machine and pass its local directory ({type(err).__name__})"
        ) from None
    missing = [t for t in SPECIAL_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def train_tiny_text_tokenizer(texts: list[str], vocab_size: int = 1024):
    """A byte-level BPE of Qwen2.5's kind (same special tokens and chat template) trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, pad_token=EOS,
                                   additional_special_tokens=SPECIAL_TOKENS[1:], chat_template=CHAT_TEMPLATE)


def sample_texts(sample_dir: str | Path) -> list[str]:
    """Every piece of text in the shipped sample (captions, conversations, paragraphs, instructions)."""
    from semhitok.common.resources import shipped

    sample_dir = Path(shipped(sample_dir))
    texts = [json.loads(line)["caption"] for line in open(sample_dir / "captions.jsonl")]
    texts += [json.loads(line)["text"] for line in open(sample_dir / "text.jsonl")]
    for conv in json.loads((sample_dir / "llava.json").read_text()):
        texts += [turn["value"].replace("<image>", "") for turn in conv["conversations"]]
    return texts


def resolve_text_tokenizer(name_or_path: str, cache_dir: str | Path, sample_dir: str | Path = "data/sample"):
    """`tiny` -> a BPE trained on the shipped sample (saved under cache_dir once); else load_text_tokenizer."""
    if name_or_path != "tiny":
        return load_text_tokenizer(name_or_path)
    cache_dir = Path(cache_dir)
    if not (cache_dir / "tokenizer.json").is_file():
        from semhitok.common.io import atomic_dir

        with atomic_dir(cache_dir) as tmp:
            train_tiny_text_tokenizer(sample_texts(sample_dir)).save_pretrained(tmp)
    return load_text_tokenizer(str(cache_dir))
