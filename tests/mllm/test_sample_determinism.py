"""An image depends on (seed, prompt, sample index) only: not on the batch size, the batch's other rows or
the prompt's position; the per-row Gumbel-max draw samples the filtered distribution."""

import json

import numpy as np
import torch
from PIL import Image

from semhitok.mllm.config import SamplingConfig
from semhitok.mllm.sample import Decoder, gumbel_noise, row_key, sample_images, sample_rows
from semhitok.tokenizer import SemHiTok

PROMPTS = ["a red bus on a street", "two dogs playing in the snow", "a bowl of fruit"]


def test_gumbel_max_draws_follow_the_distribution_and_each_row_its_own_stream():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0])
    logp = probs.log().expand(20_000, -1)
    keys = torch.tensor([row_key(7, r) for r in range(20_000)])
    counts = torch.bincount(sample_rows(logp, keys, step=3), minlength=5).double()
    expected = probs.double() * 20_000
    assert counts[4] == 0  # -inf (filtered out) is never drawn
    sigma = (expected[:4] * (1 - probs[:4].double())).sqrt()
    assert ((counts[:4] - expected[:4]).abs() < 5 * sigma).all(), counts
    noise = gumbel_noise(keys[:4], 2, 6)
    assert torch.equal(gumbel_noise(keys[2:3], 2, 6)[0], noise[2])  # a row's noise ignores the other rows
    assert not torch.equal(gumbel_noise(keys[:4], 3, 6), noise)  # and changes with the step


def test_batched_and_single_sampling_give_the_same_images(tiny_mllm, text_tokenizer, trained_tokenizer, tmp_path):
    decoder = Decoder(tiny_mllm, text_tokenizer)
    visual = SemHiTok.from_pretrained(trained_tokenizer)
    sampling = SamplingConfig(cfg_scale=2.5, temperature=1.0, top_k=50, top_p=0.95, seed=11)
    one = sample_images(decoder, visual, PROMPTS, tmp_path / "b1", sampling, batch_size=1, per_prompt=2)
    many = sample_images(decoder, visual, PROMPTS, tmp_path / "b8", sampling, batch_size=8, per_prompt=2)
    rows1 = [json.loads(line) for line in (tmp_path / "b1" / "prompts.jsonl").read_text().splitlines()]
    rows8 = [json.loads(line) for line in (tmp_path / "b8" / "prompts.jsonl").read_text().splitlines()]
    assert rows1 == rows8 and len(rows1) == 6
    assert rows1[1] == {"prompt": PROMPTS[0], "sample": 1, "file": "images/00000_1.png", "seed": 11, "cfg_scale": 2.5,
                        "temperature": 1.0, "top_k": 50, "top_p": 0.95}
    pixels = {}
    for row in rows1:
        a = np.asarray(Image.open(tmp_path / "b1" / row["file"]))
        assert np.array_equal(a, np.asarray(Image.open(tmp_path / "b8" / row["file"]))), row
        pixels[row["file"]] = a
    assert not np.array_equal(pixels["images/00000_0.png"], pixels["images/00000_1.png"])  # samples differ
    # the ids themselves: a prompt alone, or last in a batch with others, gives the same image
    alone = decoder.image_ids([PROMPTS[2]], sampling)
    assert torch.equal(decoder.image_ids(PROMPTS, sampling)[2], alone[0])
    assert not torch.equal(decoder.image_ids([PROMPTS[2]], SamplingConfig(cfg_scale=2.5, top_k=50, top_p=0.95, seed=12))[0], alone[0])
    # grid.png shows every sample: 3 prompts x 2 samples
    side = pixels["images/00000_0.png"].shape[0]
    with Image.open(one) as grid1, Image.open(many) as grid8:
        assert grid1.size == grid8.size and grid1.height > 3 * side and grid1.width > 2 * side
        assert np.array_equal(np.asarray(grid1), np.asarray(grid8))
