import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from semhitok.cli import main
from semhitok.mllm.config import SamplingConfig
from semhitok.mllm.sample import Decoder, cfg_mix, filter_logits, read_prompts
from tests.conftest import SAMPLE
from tests.mllm.reference_decoder import reference_decode, reference_image_ids

CAPTIONS = ["a red bus on a street", "two dogs playing in the snow", "a bowl of fruit"]


@pytest.fixture(scope="module")
def decoder(tiny_mllm, text_tokenizer) -> Decoder:
    return Decoder(tiny_mllm, text_tokenizer)


def test_cfg_mixes_conditional_and_unconditional_logits_like_a_direct_computation(decoder):
    lo, hi = decoder.layout.visual_offset, decoder.layout.vocab_size
    cond = [decoder.builder.generation_prompt(c) for c in CAPTIONS]
    uncond = [decoder.builder.generation_prompt(decoder.seq_cfg.uncond_prompt)] * len(CAPTIONS)
    batched = decoder.first_logits(cond + uncond, (lo, hi), cfg_scale=3.0)  # padded, masked, one batch
    model = decoder.model
    for i, prompt in enumerate(cond):
        with torch.no_grad():  # each prompt alone, no padding, full-vocabulary head
            c = model.logits(model.hidden_states(torch.tensor([prompt])).last_hidden_state[0, -1])[lo:hi]
            u = model.logits(model.hidden_states(torch.tensor([uncond[0]])).last_hidden_state[0, -1])[lo:hi]
        torch.testing.assert_close(batched[i], u + 3.0 * (c - u), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cfg_mix(torch.ones(2), torch.zeros(2), 1.0), torch.ones(2))  # scale 1: conditional


def test_cached_and_uncached_decoding_give_identical_ids(decoder):
    sampling = SamplingConfig(cfg_scale=2.5, temperature=1.0, top_k=200, top_p=0.95, seed=3)
    cached = decoder.image_ids(CAPTIONS, sampling)
    uncached = reference_image_ids(decoder, CAPTIONS, sampling)
    grid = decoder.model.image_grid
    assert cached.shape == (3, grid, grid)  # exactly h*w ids per image
    assert cached.min() >= 0 and cached.max() < decoder.layout.visual_vocab_size  # visual ids only
    assert torch.equal(cached, uncached)
    assert torch.equal(decoder.image_ids(CAPTIONS, sampling), cached)  # deterministic for a seed
    assert not torch.equal(decoder.image_ids(CAPTIONS, SamplingConfig(cfg_scale=2.5, seed=4)), cached)


def test_compiled_decoding_is_one_graph_per_vocabulary_and_gives_the_same_ids(tiny_mllm, text_tokenizer, decoder):
    """torch.compile of the decoding step (inductor here; CUDA graphs on GPUs): a single graph (no breaks),
    no recompilation from step to step or call to call, the same ids as eager decoding."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = Decoder(tiny_mllm, text_tokenizer, compile=True)
    sampling = SamplingConfig(cfg_scale=2.5, temperature=1.0, top_k=200, seed=5)
    for captions in (CAPTIONS, ["a cat", "a very long caption about a small boat on a lake", "snow"]):
        assert torch.equal(compiled.image_ids(captions, sampling), decoder.image_ids(captions, sampling))
    assert counters["stats"]["unique_graphs"] == 1
    image = torch.randint(0, decoder.layout.visual_vocab_size, (decoder.model.image_grid,) * 2)
    turns = [("user", "<image>\nWhat is in the picture?")]
    greedy = SamplingConfig(temperature=0.0)
    assert compiled.answer(turns, image, greedy, 12) == decoder.answer(turns, image, greedy, 12)
    assert counters["stats"]["unique_graphs"] == 2  # text rows: a second graph, compiled once


def test_static_embedding_equals_the_training_embedding(tiny_mllm):
    ids = torch.tensor([[5, tiny_mllm.layout.visual_offset + 7, 9, tiny_mllm.layout.vocab_size - 1]])
    with torch.no_grad():
        torch.testing.assert_close(tiny_mllm.embed_static(ids), tiny_mllm.embed(ids))


def test_chat_answers_are_text_and_stop(decoder):
    image = torch.randint(0, decoder.layout.visual_vocab_size, (decoder.model.image_grid,) * 2)
    sampling = SamplingConfig(temperature=0.0)
    reply = decoder.answer([("user", "<image>\nWhat is in the picture?")], image, sampling, max_new_tokens=12)
    assert isinstance(reply, str)
    prompt = decoder.builder.chat_prompt([("user", "<image>\nWhat is in the picture?")], image.flatten().numpy())
    tokens = decoder.decode([prompt], 12, (0, len(decoder.tokenizer)), sampling, stop=decoder.layout.im_end)
    assert tokens.max() < len(decoder.tokenizer) and reply == decoder.tokenizer.decode(tokens[0], skip_special_tokens=True).strip()


def test_filtering_keeps_top_k_and_the_top_p_prefix():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(filter_logits(logits, 1.0, 2, 1.0)).sum() == 2
    kept = torch.isfinite(filter_logits(logits, 1.0, 0, 0.7))[0].tolist()
    assert kept == [True, True, False, False]  # 0.5 < 0.7 <= 0.8
    torch.testing.assert_close(filter_logits(logits, 1.0, 0, 1.0).exp(), logits.exp())


def test_sample_cli_writes_pngs_a_grid_and_an_index(tiny_mllm_dir, tmp_path):
    args = ["sample", "--model", str(tiny_mllm_dir), "--prompts", str(SAMPLE / "holdout.jsonl"), "--batch-size", "5",
            "--samples-per-prompt", "2", "--cfg-scale", "3", "--top-k", "100"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    rows = [json.loads(line) for line in open(tmp_path / "a" / "prompts.jsonl")]
    assert len(rows) == 24 and {r["prompt"] for r in rows} == set(read_prompts(SAMPLE / "holdout.jsonl"))
    first = np.asarray(Image.open(tmp_path / "a" / rows[0]["file"]))
    assert first.shape == (64, 64, 3) and (tmp_path / "a" / "grid.png").is_file()
    assert main(args + ["--out", str(tmp_path / "b")]) == 0  # same seed, same pictures
    assert np.array_equal(first, np.asarray(Image.open(tmp_path / "b" / rows[0]["file"])))


def test_bad_prompts_file_is_named(tmp_path, capsys):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"nope": 1}\n')
    assert main(["sample", "--model", "x", "--prompts", str(bad), "--out", str(tmp_path)]) == 2
    assert f"{bad}:2" in capsys.readouterr().err


def test_a_streamed_answer_grows_and_ends_as_the_whole_answer_at_the_same_seed(decoder):
    image = torch.randint(0, decoder.layout.visual_vocab_size, (decoder.model.image_grid,) * 2)
    turns = [("user", "<image>\nWhat is in the picture?")]
    sampling = SamplingConfig(temperature=1.0, top_k=50, seed=7)  # sampled: the noise must line up step by step
    prompt = decoder.builder.chat_prompt(turns, image.flatten().numpy())
    vocab, stop = (0, len(decoder.tokenizer)), decoder.layout.im_end
    steps = list(decoder.stream([prompt], 16, vocab, sampling, stop=stop))
    assert torch.equal(torch.stack(steps, 1), decoder.decode([prompt], 16, vocab, sampling, stop=stop))
    assert torch.equal(torch.stack(steps, 1), reference_decode(decoder, [prompt], 16, vocab, sampling, stop=stop))  # the cache
    parts = list(decoder.answer_stream(turns, image, sampling, max_new_tokens=16))
    assert len(parts) > 1 and all(b.startswith(a) or len(b) > len(a) for a, b in zip(parts, parts[1:]))
    assert parts[-1] == decoder.answer(turns, image, sampling, max_new_tokens=16)
    other = list(decoder.answer_stream(turns, image, dataclasses.replace(sampling, seed=8), max_new_tokens=16))
    assert other[-1] != parts[-1]  # the seed matters: the equality above is not two greedy runs agreeing
