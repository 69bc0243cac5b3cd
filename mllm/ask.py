"""`semhitok ask`: one question, answered once (LLaVA's run_llava), about an image or about nothing.

    semhitok ask --model runs/shapes/mllm/final --image runs/shapes/world/images/holdout_00000.png "What color is the circle?"

The image goes through the loader the chat and POPE use (bounded: size and aspect ratio checked before any
pixel is decoded; padded or cropped as the model's data.understanding_image says), and the answer comes from
Decoder.answer, so it is the chat's first answer about the same upload and question.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from semhitok.mllm.config import SamplingConfig
from semhitok.mllm.sample import Decoder
from semhitok.tokenizer import ImageLimits, ImageRejected, encode_images, open_rgb
from semhitok.tokenizer.interface import VisualTokenizer


def read_image(path: str | Path, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """An image file -> RGB; a one-line error naming the file when it is missing or not a usable image."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    try:
        return open_rgb(path, limits)
    except ImageRejected as err:
        raise ValueError(f"{path}: not a usable image ({err})") from None


@torch.no_grad()
def ask(decoder: Decoder, visual: VisualTokenizer, question: str, image: Image.Image | None = None,
        sampling: SamplingConfig | None = None, max_new_tokens: int = 128) -> str:
    """The model's answer to `question` about `image` (None: a text-only question); greedy by default."""
    question = question.replace("<image>", "").strip()  # only `image` places an image
    if not question:
        raise ValueError("empty question")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    sampling = sampling or SamplingConfig(temperature=0.0)
    if image is None:
        turns, ids = [("user", question)], None
    else:
        turns, ids = [("user", "<image>\n" + question)], encode_images(visual, [image], decoder.seq_cfg.understanding_image)[0]
    context = decoder.model.lm.config.max_position_embeddings
    prompt = len(decoder.builder.chat_prompt(turns, None if ids is None else ids.flatten().cpu().numpy()))
    if prompt + max_new_tokens > context:
        raise ValueError(f"the question ({prompt} prompt tokens) plus {max_new_tokens} new tokens do not fit the "
                         f"model's context of {context} tokens")
    return decoder.answer(turns, ids, sampling, max_new_tokens)
