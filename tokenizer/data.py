"""Images for the tokenizer: listing sources, decoding robustly, and the [-1, 1] tensor convention.

A source is an image folder (searched recursively) or a jsonl whose rows have an "image" path relative to
the jsonl's folder. Files that are not images, or do not decode, are skipped with a warning naming them.
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

log = logging.getLogger("semhitok")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError, SyntaxError)


def list_images(sources: list[str | Path]) -> list[Path]:
    """Folders (recursive), jsonl files with an "image" field, or single image files -> image paths."""
    paths: list[Path] = []
    for source in map(Path, sources):
        if source.is_dir():
            paths += sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif source.suffix == ".jsonl" and source.is_file():
            with open(source) as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        path = source.parent / json.loads(line)["image"]
                    except (ValueError, KeyError, TypeError, RecursionError) as err:
                        log.warning("%s:%d: skipped, no usable \"image\" field (%s)", source, lineno, err)
                        continue
                    if path.exists() and not path.is_file():  # a FIFO or device would block the reader forever
                        log.warning("%s:%d: skipped, %s is not a regular file", source, lineno, path)
                        continue
                    paths.append(path)  # (a missing one is named when it is read)
        elif source.is_file():
            paths.append(source)
        elif source.exists():
            raise ValueError(f"image source {source}: not a regular file or folder (a FIFO or device would block)")
        else:
            raise FileNotFoundError(f"image source not found: {source}")
    return paths


@dataclass(frozen=True)
class ImageLimits:
    """Bounds checked on the header, before any pixel is decoded."""

    max_pixels: int = 36_000_000  # width * height after JPEG draft reduction (8K UHD is 33.2M)
    max_aspect_ratio: float = 20.0  # longer side / shorter side


class ImageRejected(ValueError):
    """An image that is skipped: `kind` is corrupt_image, image_too_large or image_aspect_ratio."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind


def to_rgb(img: Image.Image, limits: ImageLimits = ImageLimits(), size: int | None = None) -> Image.Image:
    """A PIL image (opened, not necessarily decoded) -> RGB, checking `limits` before decoding.

    `size`: the side the image will be resized to; a JPEG is then decoded at the smallest DCT scale that
    keeps both sides >= size (PIL's draft). High-bit-depth and uncommon modes are rescaled to 8 bits
    (I;16: /257; I: as is when within [0, 255], else clipped to 16 bits and /257; F: [0, 1] scaled,
    else clipped to [0, 255]); transparency goes over white."""
    w, h = img.size
    if w < 1 or h < 1:
        raise ImageRejected("corrupt_image", f"empty image ({w}x{h})")
    if max(w, h) / min(w, h) > limits.max_aspect_ratio:
        raise ImageRejected("image_aspect_ratio", f"{w}x{h} has an aspect ratio above {limits.max_aspect_ratio:g}")
    if size and img.format == "JPEG" and min(w, h) >= 2 * size:
        img.draft("RGB", (size, size))
        w, h = img.size
    if w * h > limits.max_pixels:
        raise ImageRejected("image_too_large", f"{w}x{h} is above the limit of {limits.max_pixels:,} pixels")
    if img.mode.startswith("I") or img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16"):
            arr = arr / 257.0
        elif img.mode.startswith("I") and arr.size and arr.max() > 255:
            arr = np.clip(arr, 0, 65535) / 257.0
        elif arr.size and np.nanmax(arr) <= 1.0:
            arr = arr * 255.0
        img = Image.fromarray(np.nan_to_num(arr).clip(0, 255).round().astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def open_rgb(source: str | Path | bytes, limits: ImageLimits = ImageLimits(), size: int | None = None) -> Image.Image:
    """A file path or encoded bytes -> decoded RGB image; ImageRejected (one line) for anything unusable,
    including decompression bombs and running out of memory."""
    if not isinstance(source, bytes) and Path(source).exists() and not Path(source).is_file():
        raise ImageRejected("corrupt_image", "not a regular file (a FIFO, device or folder would block or fail the reader)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
                rgb = to_rgb(img, limits, size)
                rgb.load()
                return rgb
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageRejected("image_too_large", f"{type(err).__name__}: {err}") from None
    except MemoryError:
        raise ImageRejected("image_too_large", "out of memory while decoding") from None
    except UnidentifiedImageError:
        raise ImageRejected("corrupt_image", "not an image format PIL recognises") from None
    except DECODE_ERRORS as err:
        raise ImageRejected("corrupt_image", f"{type(err).__name__}: {err}") from None


def load_rgb(path: str | Path, limits: ImageLimits = ImageLimits(), size: int | None = None) -> Image.Image | None:
    """`open_rgb`, or None with a warning naming the file when it is unusable."""
    try:
        return open_rgb(path, limits, size)
    except ImageRejected as err:
        log.warning("skipping %s: %s (%s)", path, err.kind, err)
        return None


def center_crop_resize(img: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to `size` (bicubic) and crop the centre square."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


# The pad colour of understanding images: LLaVA-1.5's expand2square fills with the image processor's mean,
# tuple(int(x * 255) for x in image_mean); SigLIP's processor mean is 0.5 (the [-1, 1] input convention here).
PAD_FILL = (127, 127, 127)


def pad_to_square(img: Image.Image, size: int, fill: tuple[int, int, int] = PAD_FILL) -> Image.Image:
    """Resize so the longer side is `size`, then pad the shorter side with `fill` (the vision processor's mean, as
    LLaVA-1.5), centred, to size x size. LLaVA-1.5 pads first and resizes after; resizing first bounds the memory
    by the image's and the output's: padding a 1341x26820 image first would build a 26820^2 canvas, 2.2 GB."""
    w, h = img.size
    img = img.resize((max(1, round(w * size / max(w, h))), max(1, round(h * size / max(w, h)))), Image.BICUBIC)
    if img.width == img.height:
        return img
    canvas = Image.new("RGB", (size, size), fill)
    canvas.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
    return canvas


def square(img: Image.Image, size: int, mode: str = "crop") -> Image.Image:
    """crop: centre crop (generation); pad: resize the longer side to `size`, then pad to square (understanding,
    as LLaVA-1.5, which pads first: the same picture but for the blend at the image's border)."""
    if mode == "pad":
        return pad_to_square(img, size)
    if mode != "crop":
        raise ValueError(f"image mode {mode!r}: expected crop or pad")
    return center_crop_resize(img, size)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> [3, H, W] float in [-1, 1]"""
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def to_pil(image: torch.Tensor) -> Image.Image:
    """[3, H, W] in [-1, 1] -> PIL RGB"""
    arr = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(arr.permute(1, 2, 0).cpu().numpy())


def preprocess(images: list[Image.Image], size: int, mode: str = "crop") -> torch.Tensor:
    """PIL images -> [B, 3, size, size] in [-1, 1], centre-cropped or padded to square (see `square`)"""
    return torch.stack([to_tensor(square(img, size, mode)) for img in images])


class ImageDataset(torch.utils.data.Dataset):
    """Items are (image [3, S, S], index) or None for an unreadable file (dropped by `collate_images`).
    Random flips are drawn from a generator seeded by (seed, epoch, index): the same on any resume."""

    def __init__(self, sources: list[str | Path], size: int, random_flip: bool = False, seed: int = 0):
        self.paths = list_images(sources)
        if not self.paths:
            raise ValueError(f"no images found in {list(map(str, sources))}")
        self.size, self.random_flip, self.seed, self.epoch = size, random_flip, seed, 0

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        img = load_rgb(self.paths[index], size=self.size)
        if img is None:
            return None
        x = to_tensor(center_crop_resize(img, self.size))
        if self.random_flip:
            g = torch.Generator().manual_seed(hash((self.seed, self.epoch, index)) & 0x7FFFFFFF)
            if torch.rand((), generator=g) < 0.5:
                x = x.flip(-1)
        return x, index


def collate_images(items):
    """Drop unreadable items -> (images [B, 3, S, S], indices [B]); None if the whole batch was unreadable."""
    items = [it for it in items if it is not None]
    if not items:
        return None
    return torch.stack([x for x, _ in items]), torch.tensor([i for _, i in items])


def image_grid(rows: list[torch.Tensor], pad: int = 2) -> Image.Image:
    """rows: tensors [B, 3, H, W] in [-1, 1] of equal shape -> one picture, a row per tensor."""
    b, _, h, w = rows[0].shape
    canvas = Image.new("RGB", (b * (w + pad) + pad, len(rows) * (h + pad) + pad), (255, 255, 255))
    for r, row in enumerate(rows):
        for c in range(b):
            canvas.paste(to_pil(row[c]), (pad + c * (w + pad), pad + r * (h + pad)))
    return canvas


def id_map_image(ids: torch.Tensor, size: int) -> torch.Tensor:
    """semantic ids [B, h, w] -> [B, 3, size, size] in [-1, 1], one fixed pseudo-colour per id."""
    palette_r = (ids * 2654435761) % 255
    palette_g = (ids * 40503) % 255
    palette_b = (ids * 2246822519) % 255
    rgb = torch.stack([palette_r, palette_g, palette_b], dim=1).float() / 127.5 - 1.0  # [B, 3, h, w]
    return torch.nn.functional.interpolate(rgb, size=(size, size), mode="nearest")
