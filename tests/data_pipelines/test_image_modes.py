"""Paper defaults: understanding images padded to square (LLaVA-1.5), generation images centre-cropped, CFG 2."""

import numpy as np
from PIL import Image

from semhitok.data_pipelines.config import SequenceConfig, SourceConfig
from semhitok.data_pipelines.pretokenize import image_mode
from semhitok.mllm.config import SamplingConfig
from semhitok.tokenizer.data import pad_to_square, preprocess


def wide_image() -> Image.Image:
    """144x48: a red left third, a green middle, a blue right third."""
    arr = np.zeros((48, 144, 3), np.uint8)
    arr[:, :48, 0] = arr[:, 48:96, 1] = arr[:, 96:, 2] = 255
    return Image.fromarray(arr)


def test_pad_keeps_the_whole_image_and_fills_with_the_processors_mean():
    img = wide_image()
    padded = np.asarray(pad_to_square(img, 144))  # 144 wide already: padded, not resized
    assert padded.shape == (144, 144, 3)
    np.testing.assert_array_equal(padded[48:96], np.asarray(img))  # centred, nothing cut
    # LLaVA-1.5's fill: the vision processor's mean (SigLIP's 0.5 -> 127), not the image's own (85 here)
    np.testing.assert_array_equal(padded[:48], np.full((48, 144, 3), 127, np.uint8))
    dark = Image.fromarray(np.zeros((10, 30, 3), np.uint8))
    assert np.asarray(pad_to_square(dark, 30))[0, 0].tolist() == [127, 127, 127]  # the same for any image
    pad, crop = preprocess([img], 32, "pad")[0], preprocess([img], 32, "crop")[0]  # [3, 32, 32] in [-1, 1]
    assert pad[0, 16, 1] > 0.9 and pad[2, 16, -2] > 0.9  # red and blue edges survive padding
    assert crop[1].mean() > 0.9 and crop[0, :, 1:-1].max() < -0.5  # the crop keeps the green middle only


def test_paper_defaults():
    assert SamplingConfig().cfg_scale == 2.0
    assert SequenceConfig().understanding_image == "pad"
    assert image_mode(SourceConfig("a", "llava_json", "x.json")) == "pad"
    assert image_mode(SourceConfig("b", "caption_jsonl", "x.jsonl")) == "crop"
    assert image_mode(SourceConfig("c", "llava_json", "x.json", image_mode="crop")) == "crop"
