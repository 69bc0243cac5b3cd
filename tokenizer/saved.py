"""Reading a saved tokenizer directory (config.json + model.safetensors) safely, for every kind: the config is
parsed and the weights' names and shapes are checked against the model the config describes (built on the
meta device, so nothing is allocated) before any weight is loaded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from safetensors import safe_open

from semhitok.common.hub import resolve_pretrained


def read_config(path: str | Path, kind: str, cls_name: str) -> tuple[dict, Path, Path]:
    """path (a directory, or a Hub id: semhitok.common.hub) -> (config.json's fields without model_type, config
    file, weights file); one-line errors."""
    path = resolve_pretrained(path)
    config_file, weights = path / "config.json", path / "model.safetensors"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: pass a directory written by {cls_name}.save_pretrained")
    try:
        meta = json.loads(config_file.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_file}: not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.pop("model_type", None) != kind:
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
