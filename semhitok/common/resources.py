"""Relative paths into the shipped files (`configs/...`, `data/...`) work from any directory.

Rule: a relative path is read from the current directory when it exists there; otherwise, when it starts
with `configs/`, `data/` or `eval/` and exists under semhitok.RESOURCE_ROOT (the repository in a checkout, the
installed package in a wheel), that copy is used. Anything else is left as given, so errors name it.
"""

from __future__ import annotations

import dataclasses
import glob
from pathlib import Path
from typing import Any, Callable

from semhitok import RESOURCE_ROOT

SHIPPED_PREFIXES = ("configs/", "data/", "eval/")  # eval/: data files shipped beside the eval package


def shipped(path: str | Path) -> str:
    """`data/sample/train.jsonl` -> an absolute path to the shipped copy when the cwd has none (globs too)."""
    text = str(path)
    if not text.startswith(SHIPPED_PREFIXES) or Path(text).is_absolute():
        return text
    if glob.has_magic(text):
        return text if glob.glob(text) or not glob.glob(str(RESOURCE_ROOT / text)) else str(RESOURCE_ROOT / text)
    if Path(text).exists() or not (RESOURCE_ROOT / text).exists():
        return text
    return str(RESOURCE_ROOT / text)


def map_strings(obj: Any, fn: Callable[[str], str]) -> Any:
    """Apply `fn` to every string field of a (nested) dataclass config, in place; returns it."""
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            setattr(obj, f.name, map_strings(getattr(obj, f.name), fn))
        return obj
    if isinstance(obj, str):
        return fn(obj)
    if isinstance(obj, list):
        return [map_strings(v, fn) for v in obj]
    if isinstance(obj, tuple):
        return tuple(map_strings(v, fn) for v in obj)
    if isinstance(obj, dict):
        return {k: map_strings(v, fn) for k, v in obj.items()}
    return obj


def resolve_shipped(obj: Any) -> Any:
    """Apply `shipped` to every string field of a (nested) dataclass config, in place; returns it."""
    return map_strings(obj, shipped)
