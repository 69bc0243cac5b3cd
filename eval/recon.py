"""Tokenizer reconstruction metrics on an image folder: PSNR, SSIM, codebook usage, rFID."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch

from semhitok.eval.fid import FIDUnavailable, GaussianStats, InceptionFeatures, frechet_distance
from semhitok.tokenizer import iter_image_batches, list_images
from semhitok.tokenizer.interface import VisualTokenizer
from semhitok.tokenizer.metrics import psnr, ssim

log = logging.getLogger("semhitok")


@torch.no_grad()
def evaluate_reconstruction(
    model: VisualTokenizer, sources: list[str | Path], batch_size: int = 32, fid: bool = True,
    observe: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
) -> dict:
    """Encode -> decode every readable image of `sources`; return metrics (rfid None with a reason when
    the Inception weights are unavailable). Usage: visual_id_usage is the share of each code's vocabulary used,
    averaged over the L codes of a position (code_usage lists them when L > 1); a tokenizer with id_parts adds
    each part's (SemHiTok: semantic_codebook_usage). observe(images, ids, recon), when given, sees every batch (eval/compare.py measures more
    on the same pass)."""
    paths = list_images(sources)
    features = None
    result: dict = {"rfid": None}
    if fid:
        try:
            features = InceptionFeatures(model.device)
        except FIDUnavailable as err:
            log.warning("rFID skipped: %s", err)
            result["rfid_error"] = str(err)
    real, fake = (GaussianStats(InceptionFeatures.dim), GaussianStats(InceptionFeatures.dim)) if features else (None, None)
    n, psnr_sum, ssim_sum = 0, 0.0, 0.0
    parts_of = getattr(model, "id_parts", None)  # interface.py: named parts of each id (SemHiTok: its semantic id)
    parts_used: dict[str, torch.Tensor] = {}
    codes_used = [torch.zeros(v, dtype=torch.bool) for v in model.code_vocab_sizes]
    for _, images in iter_image_batches(paths, model.image_size, batch_size, progress="reconstruct"):
        images = images.to(model.device)
        ids = model.encode(images)
        recon = model.decode(ids)
        b = images.shape[0]
        n += b
        psnr_sum += float(psnr(recon, images)) * b
        ssim_sum += float(ssim(recon, images)) * b
        flat = ids.reshape(-1, len(codes_used)).cpu()  # [B*N, L]
        for used, column in zip(codes_used, flat.unbind(1)):
            used[column] = True
        for name, (part, size) in (parts_of(ids) if parts_of else {}).items():
            parts_used.setdefault(name, torch.zeros(size, dtype=torch.bool))[part.flatten().cpu()] = True
        if observe is not None:
            observe(images, ids, recon)
        if features:
            real.update(features(images))
            fake.update(features(recon))
    if n == 0:
        raise ValueError(f"no readable images in {list(map(str, sources))}")
    result.update(
        images=n,
        psnr=psnr_sum / n,
        ssim=ssim_sum / n,
        visual_id_usage=sum(float(u.float().mean()) for u in codes_used) / len(codes_used),
    )
    result.update({f"{name}_usage": float(used.float().mean()) for name, used in parts_used.items()})
    if len(codes_used) > 1:
        result["code_usage"] = [float(u.float().mean()) for u in codes_used]
    if features:
        result["rfid"] = frechet_distance(*real.mean_cov(), *fake.mean_cov())
    return result
