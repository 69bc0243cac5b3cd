"""Reading a saved tokenizer directory (config.json + model.safetensors) safely, for every kind: the config is
parsed and the weights' names and shapes are checked against the model the config describes (built on the
meta device, so nothing is allocated) before any weight is loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file

from semhitok.common.config_io import from_dict
from semhitok.common.hub import resolve_pretrained
from semhitok.common.io import read_json


def read_meta(path: str | Path, writer: str = "a tokenizer's save_pretrained") -> tuple[dict, Path, Path]:
    """path (a directory, or a Hub id: semhitok.common.hub) -> (config.json's fields ({} when it holds no
    object), config file, weights file); one-line errors naming `writer`, what should have written it."""
    path = resolve_pretrained(path)
    config_file, weights = path / "config.json", path / "model.safetensors"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: pass a directory written by {writer}")
    meta = read_json(config_file)
    return (meta if isinstance(meta, dict) else {}), config_file, weights


def read_config(path: str | Path, kind: str, cls_name: str) -> tuple[dict, Path, Path]:
    """read_meta for a tokenizer of `kind` -> (config.json's fields without model_type, config file, weights file)."""
    meta, config_file, weights = read_meta(path, f"{cls_name}.save_pretrained")
    if meta.pop("model_type", None) != kind:
        raise ValueError(f"{config_file}: model_type is not {kind!r}")
    return meta, config_file, weights


def check_weights(build: Callable[[], nn.Module], config_file: Path, weights: Path) -> None:
    """Raise (one line) unless `weights` holds exactly the tensors, with the shapes, of the model build() makes."""
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found")
    try:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in build().state_dict().items()}
    except Exception as err:  # e.g. a siglip_config that describes no model
        raise ValueError(f"{config_file}: describes no buildable tokenizer ({type(err).__name__}: {err})") from None
    try:
        with safe_open(str(weights), "pt") as f:
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as err:  # a truncated or foreign file
        raise ValueError(f"{weights}: not a readable safetensors file ({type(err).__name__}: {err})") from None
    problems = [f"{k} missing" for k in expected if k not in found] + [f"{k} unexpected" for k in found if k not in expected]
    problems += [f"{k} is {list(found[k])}, config says {list(shape)}" for k, shape in expected.items()
                 if k in found and found[k] != shape]
    if problems:
        raise ValueError(f"{weights} does not match {config_file}: {len(problems)} problem(s), first: {problems[0]}")


def load_staged(cls, config_cls: type, path: str | Path, device: str | torch.device, stages: tuple[int, ...]) -> nn.Module:
    """A tokenizer whose config.json holds its config fields plus `trained_stages` (a list drawn from `stages`):
    read_config, the stages, the config, check_weights, then the weights; eval mode on `device`."""
    meta, config_file, weights = read_config(path, cls.kind, cls.__name__)
    trained = meta.pop("trained_stages", None)
    if not isinstance(trained, list) or not all(s in stages and not isinstance(s, bool) for s in trained):
        raise ValueError(f"{config_file}: trained_stages must be a list of stages {stages}, got {trained!r}")
    cfg = from_dict(config_cls, meta, where=str(config_file))
    check_weights(lambda: cls(cfg), config_file, weights)
    model = cls(cfg)
    model.load_state_dict(load_file(str(weights)))
    model.trained_stages = list(trained)
    return model.to(device).eval()
