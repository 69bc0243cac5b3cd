"""SemHiTok image tokenizer: the public API other packages use.

    tok = load_tokenizer("runs/tiny/tokenizer/stage2/final")
    ids = tok.encode(images)          # [B, 3, H, W] in [-1, 1] -> [B, h, w], ids = sem * m + pix
    images = tok.decode(ids)          # -> [B, 3, H, W] in [-1, 1]
    sem, pix = tok.split_ids(ids)

The names of api, data, model and siglip (torch) are imported on first use (PEP 562), so the configs import no torch.
"""

import importlib

from semhitok.tokenizer.config import TokenizerConfig, TokenizerTrainConfig

# public name -> the submodule that defines it
_LAZY = {
    **dict.fromkeys(["encode_images", "encode_paths", "iter_image_batches", "load_tokenizer", "reconstruct_to_dir"], "api"),
    **dict.fromkeys(["ImageLimits", "ImageRejected", "image_grid", "list_images", "load_rgb", "open_rgb", "preprocess",
                     "to_pil"], "data"),
    "SemHiTok": "semhitok.model",
    "WeightsUnavailable": "siglip",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


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
