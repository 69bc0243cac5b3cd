"""File-level helpers over any VisualTokenizer's encode/decode, shared by the CLI, the pre-tokenizer and eval."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
from PIL import Image
from tqdm import tqdm

from semhitok.common.plot import reconstruction_grid
from semhitok.tokenizer.data import ImageLimits, image_grid, load_rgb, preprocess, to_pil, to_rgb
from semhitok.tokenizer.interface import VisualTokenizer, load_visual_tokenizer


def pick_device(device: str | None = None) -> torch.device:
    return torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_tokenizer(path: str | Path, device: str | None = None) -> VisualTokenizer:
    """A trained tokenizer directory of any kind (save_pretrained output) on `device` (GPU when present), eval mode."""
    return load_visual_tokenizer(path, device=pick_device(device))


def iter_image_batches(
    paths: list[Path], size: int, batch_size: int, progress: str | None = None
) -> Iterator[tuple[list[Path], torch.Tensor]]:
    """Readable images in batches -> (their paths, [B, 3, size, size] in [-1, 1]); unreadable ones are
    skipped with a warning naming them."""
    bar = tqdm(total=len(paths), desc=progress, disable=progress is None, unit="img")
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        loaded = [(p, img) for p in chunk if (img := load_rgb(p, size=size)) is not None]
        bar.update(len(chunk))
        if loaded:
            yield [p for p, _ in loaded], preprocess([img for _, img in loaded], size)
    bar.close()


@torch.no_grad()
def encode_images(model: VisualTokenizer, images: list, mode: str = "crop", limits: ImageLimits = ImageLimits()) -> torch.Tensor:
    """PIL images (any size and mode; centre-cropped, or padded to square with mode="pad", and resized) -> visual
    ids [B, h, w] on the model's device. Images beyond `limits` raise ImageRejected (checked on the header when
    not yet decoded)."""
    rgb = [to_rgb(img, limits, model.image_size) for img in images]
    return model.encode(preprocess(rgb, model.image_size, mode).to(model.device))


def encode_paths(model: VisualTokenizer, paths: list[Path], batch_size: int = 32) -> tuple[list[Path], torch.Tensor]:
    """Image files -> (the readable ones, ids [B, h, w] (or [B, h, w, L]) int64 on CPU)."""
    kept, ids = [], []
    for batch_paths, images in iter_image_batches(paths, model.image_size, batch_size, progress="encode"):
        kept += batch_paths
        ids.append(model.encode(images.to(model.device)).cpu())
    if not ids:
        extra = () if len(model.code_vocab_sizes) == 1 else (len(model.code_vocab_sizes),)
        return [], torch.empty(0, model.grid, model.grid, *extra, dtype=torch.long)
    return kept, torch.cat(ids)


@torch.no_grad()
def reconstruct_to_dir(model: VisualTokenizer, paths: list[Path], out: Path, batch_size: int = 32, grid: int = 8) -> Path:
    """Encode + decode each image; write <stem>_recon.png (input above reconstruction) per image and an
    overview grid.png of the first `grid` images (rows labelled input / reconstruction, file stems beneath).
    Returns the grid's path."""
    out.mkdir(parents=True, exist_ok=True)
    shown: list[tuple[Image.Image, Image.Image, str]] = []
    for batch_paths, images in iter_image_batches(paths, model.image_size, batch_size, progress="reconstruct"):
        images = images.to(model.device)
        recon = model.decode(model.encode(images)).cpu()
        for path, x, y in zip(batch_paths, images.cpu(), recon):
            image_grid([x[None], y[None]]).save(out / f"{path.stem}_recon.png")
            if len(shown) < grid:
                shown.append((to_pil(x), to_pil(y), path.stem))
    if not shown:
        raise ValueError(f"no readable images among {len(paths)} paths")
    inputs, recons, names = zip(*shown)
    return reconstruction_grid(list(inputs), list(recons), list(names)).save(out / "grid.png")
