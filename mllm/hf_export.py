"""What makes an MLLM export a Hugging Face model: config with remote code, generation config, processor, card.

An export (SemHiTokLM.save_pretrained) holds the base LLM's weights under their plain names (model.*,
lm_head.*), the adapter (adapter.safetensors), the text tokenizer and the visual tokenizer (visual_tokenizer/).
Its config.json is model_type "semhitok_mllm" with the base LLM's config as `text_config` and an `auto_map`
to the Python files of mllm/hf_remote/, copied in (they import only torch, transformers, safetensors, PIL):

    AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True)  # visual ids through the adapter
    AutoProcessor.from_pretrained(d, trust_remote_code=True)         # (text with <image>, images) -> input_ids
    pipeline("image-text-to-text", model=d, trust_remote_code=True)  # (AutoModelForImageTextToText) chat -> answer

Without trust_remote_code transformers refuses the directory (it names the flag): a plain causal LM of the
base class would read visual ids from the tied head rows instead of the adapter, silently wrong, so that
load is not offered. generation_config.json stops at the end of a turn (<|im_end|>) or <|endoftext|>.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from transformers import AutoConfig, GenerationConfig, PretrainedConfig

from semhitok.common.hub import MLLM_MODEL_TYPE, export_base_config, push_folder
from semhitok.common.model_card import training_sources, write_model_card

REMOTE_DIR = Path(__file__).parent / "hf_remote"
REMOTE_FILES = ("configuration_semhitok.py", "modeling_semhitok.py", "processing_semhitok.py")
AUTO_MAP = {
    "AutoConfig": "configuration_semhitok.SemHiTokMLLMConfig",
    "AutoModel": "modeling_semhitok.SemHiTokForCausalLM",
    "AutoModelForCausalLM": "modeling_semhitok.SemHiTokForCausalLM",
    "AutoModelForImageTextToText": "modeling_semhitok.SemHiTokForCausalLM",  # pipeline("image-text-to-text")
    "AutoProcessor": "processing_semhitok.SemHiTokProcessor",
}
MAX_NEW_TOKENS = 1024  # an answer; raised to fit a whole image span (grid^2 + 2) at larger grids


def text_config(path: str | Path) -> PretrainedConfig:
    """The base LLM's config of an export (config.json's text_config; an older export's config.json itself)."""
    base = export_base_config(path)
    return base if base is not None else AutoConfig.from_pretrained(path)


def finish_export(folder: Path, model, text_tokenizer, target: Path) -> None:
    """Turn `folder` (lm.save_pretrained output + adapter + tokenizers) into a transformers-loadable export;
    `target`: where it will live (for the run's config and eval summary in the card)."""
    base = json.loads((folder / "config.json").read_text())
    layout, adapter = model.layout, model.adapter
    config = {"model_type": MLLM_MODEL_TYPE, "text_config": base, "text_vocab_size": layout.text_vocab_size,
              "visual_vocab_size": layout.visual_vocab_size, "image_start": layout.image_start, "image_end": layout.image_end,
              "image_grid": model.image_grid, "tie_word_embeddings": bool(base.get("tie_word_embeddings", False)),
              "dtype": base.get("dtype"), "transformers_version": base.get("transformers_version")}
    # The remote code implements SemHiTok's dual-MLP adapter over flat ids; another kind's export has no auto_map,
    # so transformers refuses it (load it with SemHiTokLM.from_pretrained / load_sampler)
    remote = model.ids.kind == "semhitok"
    if remote:
        config.update({"architectures": ["SemHiTokForCausalLM"], "auto_map": AUTO_MAP, "text_tokens": len(text_tokenizer),
                       "codes_per_group": adapter.codes_per_group,
                       "sem_code_dim": adapter.features.sem_codes.shape[1], "pix_code_dim": adapter.features.pix_codes.shape[1],
                       "adapter_hidden": adapter.hidden, "adapter_inputs": model.config.adapter_inputs})
    else:
        config["visual_tokenizer_kind"] = model.ids.kind
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if remote:
        for name in REMOTE_FILES:
            shutil.copyfile(REMOTE_DIR / name, folder / name)
        processor = {"processor_class": "SemHiTokProcessor", "auto_map": {"AutoProcessor": AUTO_MAP["AutoProcessor"]},
                     "text_vocab_size": layout.text_vocab_size, "image_start": layout.image_start, "image_end": layout.image_end,
                     "image_mode": model.sequence_config.understanding_image}
        (folder / "processor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    generation_config(layout, text_tokenizer, model.image_grid).save_pretrained(folder)
    write_mllm_card(folder, target)


def push_export(save, repo_id: str, private: bool | None = None, token: str | None = None, api=None) -> str:
    """save(dir) writes a fresh export; it is uploaded to `repo_id` with a card naming the repo -> the commit URL."""
    with tempfile.TemporaryDirectory(prefix="semhitok-push-") as tmp:
        out = Path(tmp) / "export"
        save(out)
        write_mllm_card(out, repo=repo_id)
        return push_folder(out, repo_id, private, token, api=api)


def generation_config(layout, text_tokenizer, image_grid: int) -> GenerationConfig:
    """Stop at the end of the assistant's turn or at <|endoftext|> (Vicuna: </s>); greedy; room for an image span."""
    eos = list(dict.fromkeys([layout.im_end, layout.eos]))
    pad = text_tokenizer.pad_token_id if text_tokenizer.pad_token_id is not None else layout.eos
    return GenerationConfig(eos_token_id=eos, pad_token_id=pad, bos_token_id=text_tokenizer.bos_token_id, do_sample=False,
                            max_new_tokens=max(MAX_NEW_TOKENS, image_grid * image_grid + 2))


USAGE = """With semhitok (`pip install semhitok`), by Hub id or local path:

```python
from semhitok.mllm.sample import load_sampler
decoder, visual = load_sampler("{repo}")  # chat, CFG image generation: `semhitok chat --model {repo}`
```

With transformers alone (the model code ships in this repository, hence `trust_remote_code=True`):

```python
from PIL import Image
from transformers import pipeline

pipe = pipeline("image-text-to-text", model="{repo}", trust_remote_code=True)
messages = [{{"role": "user", "content": [{{"type": "image", "image": Image.open("photo.jpg")}},
                                         {{"type": "text", "text": "What is in the picture?"}}]}}]
print(pipe(text=messages, return_full_text=False)[0]["generated_text"])
```

or step by step (a message's content may also be a string, "<image>\\nWhat is in the picture?"):

```python
from transformers import AutoModelForImageTextToText, AutoProcessor

processor = AutoProcessor.from_pretrained("{repo}", trust_remote_code=True)
model = AutoModelForImageTextToText.from_pretrained("{repo}", trust_remote_code=True)
inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
out = model.generate(**inputs)  # stops at <|im_end|> / <|endoftext|> (generation_config.json)
print(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

Without `trust_remote_code=True` transformers refuses to load this repository: the base LLM class alone would
read image tokens through its embedding rows instead of the visual adapter (silently wrong). Images generated by
`generate` are visual ids; decode them with the visual tokenizer in `visual_tokenizer/` (semhitok)."""


def write_mllm_card(folder: Path, target: Path | None = None, repo: str | None = None) -> Path:
    """README.md for an export, from its own files (nothing is loaded); `target`: where it will live."""
    meta = json.loads((folder / "semhitok_mllm.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    visual = json.loads((folder / "visual_tokenizer" / "config.json").read_text())
    cfg, layout, grid = meta["config"], meta["layout"], meta["image_grid"]
    kind = (config.get("text_config") or config).get("model_type", "?")
    base = None if cfg.get("base_model") == "random" else cfg.get("base_model")
    about = [
        "A unified image-token multimodal LLM: a causal LLM whose vocabulary is extended by SemHiTok's visual ids "
        "(understanding and text-to-image generation in one next-token model).",
        "",
        f"- base LLM: {base or 'a randomly initialised ' + kind + ' (tiny preset)'} ({kind}, "
        f"{layout['text_vocab_size']:,} text rows)",
        f"- visual tokenizer (in `visual_tokenizer/`): SemHiTok, {grid}x{grid} ids per image, "
        f"{layout['visual_vocab_size']:,} visual ids, semantic teacher {visual.get('teacher')}",
        f"- visual ids enter through the adapter (adapter_inputs={cfg.get('adapter_inputs')}: both = a dual MLP, concat = "
        "one MLP on the concatenated code vectors, semantic = the semantic MLP); the head scores text and visual ids",
    ]
    return write_model_card(folder, title="SemHiTok unified MLLM", about=about, pipeline_tag="image-text-to-text",
                            usage=USAGE.format(repo=repo or "ORG/NAME"), base_model=base,
                            tags=["multimodal", "image-generation", "custom_code"], sources=training_sources(target or folder),
                            run_dir=target or folder)
