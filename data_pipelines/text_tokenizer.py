"""Text tokenizers of the supported LLM families and the unified token layout (text ids, then visual ids).

Layout of the LLM's vocabulary (what the embedding rows and head columns mean):

    [0, text_vocab_size)                                text tokens (Qwen2.5: 151,936 rows, incl. specials)
    [text_vocab_size, text_vocab_size + K*m)            visual id h = sem * m + pix  ->  token text_vocab_size + h

Qwen2.5 at the 256 preset: 151,936 + 16,384 * 12 = 348,544 rows. Image spans are `<|vision_start|>` ids
`<|vision_end|>` (Qwen2.5 already has both special tokens; they are added when a tokenizer lacks them,
e.g. LLaMA/Vicuna's sentencepiece tokenizer, whose text rows then grow by two). Visual ids are not
strings in the text tokenizer; `TokenLayout` converts between the two ranges.

Families and their chat formats (data_pipelines/sequences.py renders them; `chat_format` below picks one):
    qwen2.5    ChatML, default system "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    qwen2      ChatML, default system "You are a helpful assistant."
    vicuna_v1  LLaVA-1.5's conversation: "<s>{system} USER: ... ASSISTANT: ...</s>USER: ..."

`tiny` builds a small byte-level BPE of Qwen2.5's kind (trained on the shipped sample's text, Qwen2.5's
special tokens and chat template); `tiny-llama` a sentencepiece BPE of LLaMA's kind (a tokenizer.model
loaded by LlamaTokenizer), so tests and tiny presets need nothing from the hub.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

IMAGE_START, IMAGE_END = "<|vision_start|>", "<|vision_end|>"
IM_START, IM_END, EOS = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
SPECIAL_TOKENS = [EOS, IM_START, IM_END, IMAGE_START, IMAGE_END]

CHAT_FORMATS = ("qwen2.5", "qwen2", "vicuna_v1")
QWEN25_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
DEFAULT_SYSTEM = {
    "qwen2.5": QWEN25_SYSTEM,
    "qwen2": "You are a helpful assistant.",
    "vicuna_v1": "A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.",
}

# Qwen2.5's chat template without the tool-calling branches (the formatting of plain turns is identical).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\n" + QWEN25_SYSTEM + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# LLaVA-1.5's conv_vicuna_v1 (sep " ", sep2 eos) as a chat template, for tokenizers that ship none. Without
# bos_token in the text: LLaVA tokenizes the prompt with the bos added by the tokenizer (tokenizer(prompt)),
# and a "<s>" written in the text would change the first word's sentencepiece ("A", not "▁A").
VICUNA_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system = '" + DEFAULT_SYSTEM["vicuna_v1"].replace("'", "\\'") + "' %}{%- endif %}"
    "{%- if system %}{{- system + ' ' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{- 'USER: ' + message['content'] + ' ' }}"
    "{%- else %}{{- 'ASSISTANT: ' + message['content'] + eos_token }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- 'ASSISTANT:' }}{%- endif %}"
)


def chat_format(tokenizer, requested: str = "auto") -> str:
    """The chat format of a tokenizer's family: ChatML tokenizers (<|im_start|>) are Qwen (qwen2 when their
    template's default system prompt is Qwen2's, else qwen2.5), others (LLaMA) vicuna_v1."""
    if requested != "auto":
        if requested not in CHAT_FORMATS:
            raise ValueError(f"data.chat_format={requested!r}: expected auto or one of {CHAT_FORMATS}")
        return requested
    if IM_START not in tokenizer.get_vocab():
        return "vicuna_v1"
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    if "You are a helpful assistant." in template and "created by Alibaba Cloud" not in template:
        return "qwen2"
    return "qwen2.5"


class TextTokenizerUnavailable(RuntimeError):
    pass


@dataclass(frozen=True)
class TokenLayout:
    text_vocab_size: int  # embedding rows for text (>= len(tokenizer); Qwen pads to a multiple of 128)
    visual_vocab_size: int  # the visual rows: every id when L == 1 (SemHiTok: K * m), one placeholder when L > 1
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
        """text_vocab_size defaults to len(tokenizer) rounded up to a multiple of 64. Without ChatML tokens
        (LLaMA), im_start/im_end are the tokenizer's bos/eos (a Vicuna turn ends in eos) and eos is its eos."""
        n = len(tokenizer)
        text_vocab_size = text_vocab_size or -(-n // 64) * 64
        if text_vocab_size < n:
            raise ValueError(f"text_vocab_size {text_vocab_size} is smaller than the tokenizer ({n} tokens)")
        vocab = tokenizer.get_vocab()
        missing = [t for t in (IMAGE_START, IMAGE_END) if t not in vocab]
        if missing or tokenizer.eos_token_id is None and EOS not in vocab:
            raise ValueError(f"the text tokenizer lacks {missing or 'an eos token'} (load it with load_text_tokenizer)")
        eos = vocab.get(EOS, tokenizer.eos_token_id)
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
        return cls(text_vocab_size, visual_vocab_size, image_start=vocab[IMAGE_START], image_end=vocab[IMAGE_END],
                   im_start=vocab.get(IM_START, bos), im_end=vocab.get(IM_END, tokenizer.eos_token_id), eos=eos)


def load_text_tokenizer(name_or_path: str):
    """A Qwen2/2.5 or LLaMA-family tokenizer (tokenizer.json, or a sentencepiece tokenizer.model) by HF name or
    local path, with the image delimiters present and a chat template of its family."""
    from transformers import AutoTokenizer

    from semhitok.common.hub import export_base_config

    try:
        # an MLLM export's config.json needs remote code: its tokenizer is the base LLM's (semhitok.common.hub)
        base = export_base_config(name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **({"config": base} if base is not None else {}))
    except OSError as err:
        raise TextTokenizerUnavailable(
            f"text tokenizer {name_or_path!r} is not available offline: run `hf download "
            f"{name_or_path}` on a connected machine and pass its local directory ({type(err).__name__})"
        ) from None
    except ValueError as err:  # e.g. sentencepiece >= 0.2.3's model proto with protobuf < 7: transformers then
        if not (Path(name_or_path) / "tokenizer.model").is_file():  # misreads tokenizer.model as tiktoken ranks
            raise
        raise TextTokenizerUnavailable(
            f"{name_or_path}/tokenizer.model could not be read as a sentencepiece model ({err}); sentencepiece's "
            "model proto needs a protobuf at least as new as the one it was generated with: install "
            "'sentencepiece<0.2.3' (or protobuf>=7)") from None
    if not getattr(tokenizer, "is_fast", False):
        raise TextTokenizerUnavailable(f"text tokenizer {name_or_path!r} has no fast (tokenizers) backend: documents "
                                       "are aligned to the chat format through its character offsets")
    family = chat_format(tokenizer)  # before anything is added: the family is what the tokenizer shipped with
    missing = [t for t in (IMAGE_START, IMAGE_END) if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = VICUNA_TEMPLATE if family == "vicuna_v1" else CHAT_TEMPLATE
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


def train_tiny_sentencepiece(texts: list[str], out_dir: str | Path, vocab_size: int = 512) -> None:
    """A sentencepiece BPE of LLaMA's kind (<unk> <s> </s>, byte fallback) trained on `texts`, written as
    out_dir/tokenizer.model + tokenizer_config.json (LlamaTokenizer), like a Vicuna checkpoint ships it."""
    import io

    try:
        import sentencepiece as spm
    except ImportError:
        raise TextTokenizerUnavailable("tiny-llama needs the sentencepiece package (pip install sentencepiece)") from None
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type="bpe",
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, character_coverage=1.0,
                                   split_digits=True, normalization_rule_name="identity", num_threads=1, minloglevel=2)
    out_dir = Path(out_dir)
    (out_dir / "tokenizer.model").write_bytes(model.getvalue())
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "add_bos_token": True, "add_eos_token": False, "legacy": False}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


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
    """`tiny` (byte-level BPE, Qwen2.5's kind) or `tiny-llama` (sentencepiece, LLaMA's kind) -> trained on the
    shipped sample and saved under cache_dir once; else load_text_tokenizer."""
    if name_or_path not in ("tiny", "tiny-llama"):
        return load_text_tokenizer(name_or_path)
    cache_dir = Path(cache_dir)
    if not (cache_dir / "tokenizer_config.json").is_file():
        from semhitok.common.io import atomic_dir

        with atomic_dir(cache_dir) as tmp:
            if name_or_path == "tiny":
                train_tiny_text_tokenizer(sample_texts(sample_dir)).save_pretrained(tmp)
            else:
                train_tiny_sentencepiece(sample_texts(sample_dir), tmp)
    return load_text_tokenizer(str(cache_dir))
