"""Files shipped in the repository (data/sample, data/eval), found from any working directory."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]  # semhitok/common/shipped.py -> the repository


def shipped(relative: str) -> str:
    """'data/eval/pope.jsonl' -> its absolute path in the repository (whatever the current directory)."""
    return str(REPO_ROOT / relative)
