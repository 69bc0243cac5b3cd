"""The SigLIP vision tower every tokenizer kind reads: the frozen teacher (by HF name, local path or random at a
config's size), its features, and loading a transformers model with every weight present."""

from __future__ import annotations

import torch
import torch.nn as nn
from transformers import SiglipVisionConfig, SiglipVisionModel

from semhitok.common.hub import WeightsUnavailable
from semhitok.tokenizer.config import TokenizerConfig

RANDOM_TEACHER = "random"


def load_teacher(cfg: TokenizerConfig, head: bool = False) -> SiglipVisionModel:
    """The frozen SigLIP vision tower, by HF name or local path; or a random one of `cfg.siglip_config`;
    head: with its pooling head (DualToken's official variant), else without.

    A path or name may hold a vision-only SiglipVisionModel or a full SiglipModel (the google/siglip-* repos:
    text and vision towers, `vision_model.` key prefix, nested `vision_config`): transformers maps the
    latter's vision keys and config. Every vision weight must load: a missing or mis-shaped key is an error,
    never a silently random teacher."""
    if cfg.teacher == RANDOM_TEACHER:
        if cfg.siglip_config is None:
            raise ValueError("tokenizer.teacher=random needs tokenizer.siglip_config (SiglipVisionConfig fields)")
        teacher = SiglipVisionModel(SiglipVisionConfig.from_dict({**cfg.siglip_config, "vision_use_head": head}))
    else:
        teacher = load_complete(SiglipVisionModel, cfg.teacher, "tokenizer.teacher", "vision weights", vision_use_head=head)
    return teacher.eval().requires_grad_(False)


def teacher_features(teacher: SiglipVisionModel, images: torch.Tensor, layer: str = "last") -> torch.Tensor:
    """images [B, 3, H, W] -> the teacher features stage 1 distils [B, N, D] (TokenizerConfig.distill_layer):
    last = last_hidden_state (after the final LayerNorm), penultimate = hidden_states[-2] (no norm)."""
    if layer == "last":
        return teacher(pixel_values=images).last_hidden_state
    if layer == "penultimate":
        return teacher(pixel_values=images, output_hidden_states=True).hidden_states[-2]
    raise ValueError(f"distill_layer {layer!r}: expected last or penultimate")


def load_complete(cls, name: str, option: str, what: str = "weights", **kwargs) -> nn.Module:
    """cls.from_pretrained(name) in fp32 with every weight loaded: offline and not cached, WeightsUnavailable
    naming the download and `option` to point at it; a missing or mis-shaped key, a one-line error."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    # (quiet: a full SiglipModel's text tower and head are "unexpected" in a vision tower, listed key by key;
    # what matters, a missing or mis-shaped vision key, is checked below)
    hf_logging.set_verbosity_error()
    try:
        model, info = cls.from_pretrained(name, dtype=torch.float32, output_loading_info=True, **kwargs)
    except OSError as err:
        raise WeightsUnavailable(
            f"cannot load SigLIP teacher {name!r} ({type(err).__name__}): on a machine with network run "
            f"`hf download {name} --local-dir /path/siglip` and pass {option}=/path/siglip"
        ) from None
    finally:
        hf_logging.set_verbosity(level)
    missing = sorted(info["missing_keys"]) + [str(k[0]) if isinstance(k, tuple) else str(k) for k in info["mismatched_keys"]]
    if missing:
        raise ValueError(
            f"SigLIP teacher {name!r}: {len(missing)} {what} missing or mis-shaped "
            f"(first: {missing[0]}); the directory is incomplete or not a SigLIP checkpoint"
        )
    return model
