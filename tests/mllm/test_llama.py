"""A LLaMA-family base end to end: a sentencepiece tokenizer (trained offline on the shipped text), Vicuna v1
documents as LLaVA-1.5 writes them, DeepSpeed training and resume, sampling and chat; and the adapter's
semantic-only input switch."""

import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from semhitok.data_pipelines.config import SequenceConfig
from semhitok.data_pipelines.pretokenize import load_shard
from semhitok.data_pipelines.sequences import IGNORE, IMAGE, SequenceBuilder
from semhitok.data_pipelines.text_tokenizer import DEFAULT_SYSTEM, TokenLayout, resolve_text_tokenizer
from semhitok.mllm.config import MLLMConfig
from semhitok.mllm.model import SemHiTokLM
from semhitok.tokenizer import SemHiTok
from tests.conftest import SAMPLE, run_train

pytest.importorskip("sentencepiece", reason="the dev extra's sentencepiece trains the tiny LLaMA tokenizer")

TINY_LLAMA = dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False)
LLAMA_OVERRIDES = ["mllm.text_tokenizer=tiny-llama", "mllm.base_config={" + ", ".join(f"{k}: {v}" for k, v in TINY_LLAMA.items()) + "}"]


@pytest.fixture(scope="module")
def llama_tokenizer(tmp_path_factory):
    return resolve_text_tokenizer("tiny-llama", tmp_path_factory.mktemp("llama_tok") / "tok", SAMPLE)


def test_vicuna_documents_as_llava_writes_them(llama_tokenizer, pretokenized_sample):
    tok = llama_tokenizer
    assert type(tok).__name__ == "LlamaTokenizer" and len(tok) == 514  # 512 pieces + the two image delimiters
    layout = TokenLayout.from_tokenizer(tok, 256 * 12)
    assert (layout.image_start, layout.image_end) == (512, 513) and layout.im_end == layout.eos == tok.eos_token_id
    builder = SequenceBuilder(tok, layout, SequenceConfig())
    assert builder.format == "vicuna_v1"
    ids, meta = load_shard(pretokenized_sample / "shards" / "coco_llava-00000.npz")
    doc = builder.understanding(meta[0], ids[meta[0]["ids_row"]])
    visual = doc.tokens >= layout.visual_offset
    np.testing.assert_array_equal(doc.tokens[visual] - layout.visual_offset, ids[meta[0]["ids_row"]])
    turns = meta[0]["conversations"]
    text = DEFAULT_SYSTEM["vicuna_v1"] + " " + "".join(  # LLaVA-1.5's conv_vicuna_v1.get_prompt()
        f"USER: {t['value']} " if t["from"] == "human" else f"ASSISTANT: {t['value']}</s>" for t in turns).replace("<image>", IMAGE)
    assert doc.tokens[~visual].tolist() == tok(text).input_ids  # with <s>, in one tokenization
    messages = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"].replace("<image>", IMAGE)} for t in turns]
    rendered = tok.apply_chat_template(messages, tokenize=False)  # the template renders the same text
    assert rendered == text and doc.tokens[~visual].tolist() == tok(rendered).input_ids
    supervised = np.flatnonzero(doc.labels != IGNORE)  # runs of positions with loss: each answer and its </s>
    runs = np.split(supervised, np.flatnonzero(np.diff(supervised) > 1) + 1)
    assert [tok.decode(doc.tokens[r]) for r in runs] == [t["value"] + "</s>" for t in turns if t["from"] == "gpt"]
    prompt = builder.generation_prompt("a red bus")
    assert prompt[0] == tok.bos_token_id and prompt[-1] == layout.image_start
    assert tok.decode(prompt[:-1], skip_special_tokens=True).endswith("USER: a red bus ASSISTANT: ")  # role + ": " + message
    gen = builder.generation({"text": "a red bus"}, np.arange(64), uncond=False)
    assert gen.labels[gen.labels != IGNORE].tolist() == (np.arange(64) + layout.visual_offset).tolist() + [layout.image_end, tok.eos_token_id]
    assert builder.text({"text": "two dogs"}).tokens.tolist() == tok("two dogs").input_ids + [tok.eos_token_id]


def test_semantic_only_adapter_switch(trained_tokenizer, llama_tokenizer, tmp_path):
    visual = SemHiTok.from_pretrained(trained_tokenizer)
    m = visual.codes_per_group
    same_sem = torch.tensor([5 * m, 5 * m + 1])  # one semantic code, two pixel codes
    for inputs in ("both", "semantic"):
        torch.manual_seed(0)
        cfg = MLLMConfig(base_model="random", base_config=TINY_LLAMA, adapter_inputs=inputs)
        model = SemHiTokLM.build(cfg, visual, llama_tokenizer).eval()
        assert type(model.lm).__name__ == "LlamaForCausalLM" and model.layout.text_vocab_size == 576  # 514 rounded to 64
        assert (model.adapter.pix_mlp is None) == (inputs == "semantic")
        with torch.no_grad():
            emb = model.adapter(same_sem)
        assert emb.shape == (2, 64) and torch.equal(emb[0], emb[1]) == (inputs == "semantic")
        model.save_pretrained(tmp_path / inputs, llama_tokenizer, trained_tokenizer)
        again = SemHiTokLM.from_pretrained(tmp_path / inputs)
        with torch.no_grad():
            torch.testing.assert_close(again.adapter(same_sem), emb)


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, open(run_dir / "mllm" / "metrics.jsonl"))}


@pytest.mark.slow
def test_tiny_llama_trains_resumes_samples_and_chats(trained_tokenizer, pretokenized_sample, tmp_path):
    from semhitok.mllm.chat import ChatEngine
    from semhitok.mllm.config import SamplingConfig
    from semhitok.mllm.sample import load_sampler

    run = tmp_path / "run"
    run_train(run, trained_tokenizer, pretokenized_sample, *LLAMA_OVERRIDES, "mllm_train.max_steps=4", "mllm_train.ckpt_every=2")
    seen = losses(run)
    assert sorted(seen) == [1, 2, 3, 4] and all(np.isfinite(list(seen.values())))
    resumed = tmp_path / "resumed"  # a job killed after the step-2 checkpoint and started again
    (resumed / "mllm" / "checkpoints").mkdir(parents=True)
    shutil.copytree(run / "mllm" / "checkpoints" / "step00000002", resumed / "mllm" / "checkpoints" / "step00000002")
    (resumed / "mllm" / "checkpoints" / "latest").write_text("step00000002")
    shutil.copytree(run / "mllm" / "text_tokenizer", resumed / "mllm" / "text_tokenizer")
    run_train(resumed, trained_tokenizer, pretokenized_sample, *LLAMA_OVERRIDES, "mllm_train.max_steps=4", "mllm_train.ckpt_every=2")
    again = losses(resumed)
    assert sorted(again) == [3, 4] and all(again[s] == pytest.approx(seen[s], rel=1e-5, abs=1e-6) for s in (3, 4))

    decoder, visual = load_sampler(run / "mllm" / "final", "cpu")
    assert type(decoder.model.lm).__name__ == "LlamaForCausalLM" and decoder.builder.format == "vicuna_v1"
    ids = decoder.image_ids(["a red bus on a street"], SamplingConfig(seed=0))  # CFG 2
    assert ids.shape == (1, visual.grid, visual.grid) and 0 <= int(ids.min()) and int(ids.max()) < visual.vocab_size
    engine = ChatEngine(decoder, visual, max_upload_bytes=1_000_000, max_pixels=10_000_000, max_new_tokens=6)
    photo = io.BytesIO()
    Image.open(next((SAMPLE / "images").glob("*.jpg"))).save(photo, format="PNG")
    assert "ask me about it" in engine.upload("s", photo.getvalue())
    reply = engine.message("s", "What is in the picture?")
    assert reply["kind"] == "text" and isinstance(reply["text"], str)
    prompt = decoder.builder.chat_prompt(engine._visible_turns(engine.sessions["s"].turns)[:1], engine.sessions["s"].image_ids.flatten().numpy())
    assert llama_decode_ends_with(decoder.tokenizer, prompt, "What is in the picture? ASSISTANT:")
    assert engine.message("s", "/image a bowl of fruit")["kind"] == "image"


def llama_decode_ends_with(tokenizer, tokens: list[int], suffix: str) -> bool:
    return tokenizer.decode([t for t in tokens if t < len(tokenizer)], skip_special_tokens=True).endswith(suffix)
