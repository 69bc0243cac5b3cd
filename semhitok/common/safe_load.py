"""Reading training states (.pt) without running code from them.

A .pt file is a pickle: loaded with torch.load(weights_only=False), it can call any function it names (a
planted `os.system` runs on resume). Every resume here reads .pt files through `load_state`: torch's
weights-only unpickler, which builds tensors, plain containers and primitives, plus the few types a caller
names (DeepSpeed's loss scaler, ...). A file that asks for anything else is refused with one line naming it.
A plain pickle a library reads with pickle.load (torch.distributed.checkpoint's .metadata) is checked first by
`check_pickle` against the types such a file holds.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch


class UnsafeCheckpoint(ValueError):
    """A training state that needs more than tensors, containers and the allowed types to load."""


def _refused_name(message: str) -> str | None:
    """What the weights-only unpickler refused (a global, a call, an object), or None for other failures"""
    found = re.search(r"GLOBAL (\S+)|unrecognized function (.+?)(?:\n|$)|but got (.+?)(?:\n|$)", message)
    return next((g for g in found.groups() if g), None) if found else None


def load_state(path: str | Path, allow: Sequence[type] = (), map_location=None):
    """torch.load that unpickles only tensors, containers, primitives and the types in `allow`.

    A torch (zip) file asking for anything else -> UnsafeCheckpoint naming the file and what it asked for;
    nothing in it runs. Other unreadable content (garbage, a non-torch pickle) -> ValueError naming the file."""
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        refused = _refused_name(str(err))
        if refused and zipfile.is_zipfile(path):  # a well-formed torch file whose pickle asks for code: crafted
            allowed = ", ".join(t.__name__ for t in allow) or "nothing else"
            raise UnsafeCheckpoint(f"{path}: refused to load: it needs {refused}, and a training state may hold only "
                                   f"tensors, containers and {allowed} (not written by this trainer?)") from None
        first = next((line for line in str(err).splitlines() if line.strip() and "Weights only" not in line), type(err).__name__)
        raise ValueError(f"{path}: not a readable training state ({first.strip()[:200]})") from None


@contextmanager
def weights_only_loads(allow: Sequence[type] = ()) -> Iterator[None]:
    """Inside, every torch.load (a library's too, whatever weights_only it passes) unpickles only tensors,
    containers, primitives and `allow` (torch's TORCH_FORCE_WEIGHTS_ONLY_LOAD); for loads not routed through
    load_state."""
    names = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")  # (both set: torch.load refuses)
    before = {k: os.environ.pop(k, None) for k in names}
    os.environ[names[0]] = "1"
    try:
        with torch.serialization.safe_globals(list(allow)):
            yield
    finally:
        for k, v in before.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v


def check_pickle(path: str | Path, allowed: Collection[tuple[str, str]]) -> None:
    """Refuse (UnsafeCheckpoint, one line naming the file) a plain pickle that needs a global outside `allowed`
    ((module, name) pairs), before a library unpickles it with pickle.load (torch.distributed.checkpoint's .metadata):
    the file is read here with an unpickler that builds only those, so nothing else in it runs."""

    class Checked(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) not in allowed:
                raise UnsafeCheckpoint(f"{path}: refused to load: it needs {module}.{name}, which this kind of file never "
                                       "holds (not written by this trainer?)")
            return super().find_class(module, name)

        def persistent_load(self, pid):
            raise UnsafeCheckpoint(f"{path}: refused to load: it holds a persistent reference ({str(pid)[:80]})")

    try:
        with open(path, "rb") as f:
            Checked(f).load()
    except UnsafeCheckpoint:
        raise
    except Exception as err:  # truncated, garbage: whatever the unpickler raises
        raise ValueError(f"{path}: not a readable pickle ({type(err).__name__}: {str(err)[:200]})") from None
