"""SemHiTok image tokenizer: the public API other packages use.

    tok = load_tokenizer("runs/tiny/tokenizer/stage2/final")
    ids = tok.encode(images)          # [B, 3, H, W] in [-1, 1] -> [B, h, w], ids = sem * m + pix
    images = tok.decode(ids)          # -> [B, 3, H, W] in [-1, 1]
    sem, pix = tok.split_ids(ids)
"""

from semhitok.tokenizer.api import encode_images, encode_paths, iter_image_batches, load_tokenizer, reconstruct_to_dir
from semhitok.tokenizer.config import TokenizerConfig, TokenizerTrainConfig
from semhitok.tokenizer.data import ImageLimits, ImageRejected, image_grid, list_images, load_rgb, open_rgb, preprocess, to_pil
from semhitok.tokenizer.model import SemHiTok, WeightsUnavailable

__all__ = [
    "SemHiTok",
    "TokenizerConfig",
    "TokenizerTrainConfig",
    "ImageLimits",
    "ImageRejected",
    "WeightsUnavailable",
    "encode_images",
    "encode_paths",
    "image_grid",
    "iter_image_batches",
    "list_images",
    "load_rgb",
    "load_tokenizer",
    "open_rgb",
    "preprocess",
    "reconstruct_to_dir",
    "to_pil",
]
