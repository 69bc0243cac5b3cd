"""What a run directory records about the job that wrote it, written atomically at job start.

    config.yaml   the resolved project config (loadable again: `--config <dir>/config.yaml`)
    run.json      job, preset, overrides, command line, code revision, package version, start time, host
    runs.jsonl    one line per start (a resumed or requeued job appends), with the keys that changed

A resumed job whose resolved config differs from the recorded one goes on (longer schedules and other
logging are legitimate reasons to resume with new values) but warns, naming every changed key; the
previous config stays in runs.jsonl's history (its hash) and in config.previous.yaml. Values that name
files are compared by what they name, not how they are spelled: `data/sample/train.jsonl` and the installed
package's `.../site-packages/semhitok/data/sample/train.jsonl` are the same value when both files have the
same bytes (size, then sha256), and two spellings of one folder are the same (`same_path`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from semhitok import IS_CHECKOUT, REPO_ROOT, __version__
from semhitok.common.io import atomic_path, check_output_dir, sha256_file_cached, write_json
from semhitok.common.resources import shipped

log = logging.getLogger("semhitok")
CONFIG_FILE, RUN_FILE, HISTORY_FILE = "config.yaml", "run.json", "runs.jsonl"


@functools.cache
def code_revision() -> str:
    """`git describe --always --dirty` plus the commit sha in a checkout, else `semhitok <version>`."""
    if IS_CHECKOUT and shutil.which("git"):
        try:
            run = functools.partial(subprocess.run, cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True)
            describe = run(["git", "describe", "--always", "--dirty", "--tags"]).stdout.strip()
            sha = run(["git", "rev-parse", "HEAD"]).stdout.strip()
            return f"{describe} ({sha})" if describe and not sha.startswith(describe.removesuffix("-dirty")) else (describe or sha)
        except (OSError, subprocess.SubprocessError):
            pass
    return f"semhitok {__version__}"


def plain(cfg: Any) -> dict:
    """A dataclass config -> plain YAML/JSON-safe dicts and lists."""
    return json.loads(json.dumps(dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg))


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: tree}


def _content(path: Path) -> tuple:
    st = path.stat()
    return st.st_size, sha256_file_cached(str(path.resolve()), st.st_size, st.st_mtime_ns)


def _listing(folder: Path, limit: int = 10_000) -> list[tuple[str, int]] | None:
    """(relative path, size) of every file under folder, sorted; None when it holds more than `limit`."""
    found = []
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            found.append((path.relative_to(folder).as_posix(), path.stat().st_size))
            if len(found) > limit:
                return None
    return found


def same_path(a: str, b: str) -> bool:
    """Two spellings of one file or folder, or two files with the same bytes, or two folders with the same files
    (names and sizes; up to 10,000 files). A relative `data/...` is found as the config loader finds it (the
    current directory's, else the shipped copy: semhitok.common.resources)."""
    if not a or not b:  # "" is no path (Path("") is the current directory)
        return False
    try:
        pa, pb = Path(shipped(a)), Path(shipped(b))
        if not (pa.exists() and pb.exists()):
            return False
        if pa.resolve() == pb.resolve():
            return True
        if pa.is_file() and pb.is_file():
            return pa.stat().st_size == pb.stat().st_size and _content(pa) == _content(pb)
        if pa.is_dir() and pb.is_dir():
            listing = _listing(pa)
            return listing is not None and listing == _listing(pb)
    except (OSError, ValueError):  # unreadable, a name too long, a NUL in a string that was never a path
        pass
    return False


def same_value(a: Any, b: Any) -> bool:
    """Equal, or equal once every string naming a file or folder is compared by what it names (same_path)."""
    if a == b:
        return True
    if isinstance(a, str) and isinstance(b, str):
        return same_path(a, b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    return False


def changed_keys(old: dict, new: dict) -> list[str]:
    """The flattened keys whose values differ; a key one side lacks counts as null (a field one version has and
    the other not, left unset)."""
    a, b = flatten(old), flatten(new)
    return sorted(k for k in set(a) | set(b) if not same_value(a.get(k), b.get(k)))


def refuse_other_config(checkpoint: Path, saved: dict, now: dict, elsewhere: str) -> None:
    """Raise ValueError (one line) when `now` differs from `saved`, the configuration `checkpoint` was written with,
    naming up to six changed keys as "key old -> new" (the trainers' resume checks, before anything is recorded)."""
    changed = changed_keys(saved, now)
    if changed:
        old, new = flatten(saved), flatten(now)
        shown = ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:6])
        raise ValueError(f"{checkpoint} was written by another configuration ({shown}): resume with the same values, "
                         f"or train into {elsewhere}")


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def record_run(job_dir: str | Path, cfg: Any, job: str, preset: str | None = None, overrides: list[str] | None = None) -> None:
    """Write config.yaml, run.json and a runs.jsonl line into job_dir (rank 0 only; atomic)."""
    if not is_main_process():
        return
    job_dir = check_output_dir(job_dir, f"{job}'s folder")
    job_dir.mkdir(parents=True, exist_ok=True)
    config = plain(cfg)
    text = yaml.safe_dump(config, sort_keys=False)
    changed: list[str] = []
    previous = job_dir / CONFIG_FILE
    if previous.is_file():
        old = yaml.safe_load(previous.read_text()) or {}
        changed = changed_keys(old, config)
        if changed:
            shown = ", ".join(changed[:12]) + (f" and {len(changed) - 12} more" if len(changed) > 12 else "")
            log.warning("%s: resuming with a different config than the one recorded (%s); changed: %s "
                        "(the old one is kept as config.previous.yaml)", job_dir, previous, shown)
            with atomic_path(job_dir / "config.previous.yaml") as tmp:
                tmp.write_text(previous.read_text())
    with atomic_path(previous) as tmp:
        tmp.write_text(text)
    info = {"job": job, "preset": None if preset is None else str(preset), "overrides": list(overrides or []),
            "argv": sys.argv, "revision": code_revision(), "version": __version__,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(),
            "config_sha256": hashlib.sha256(text.encode()).hexdigest()}
    write_json(job_dir / RUN_FILE, info)
    with open(job_dir / HISTORY_FILE, "a") as f:
        f.write(json.dumps({**info, "changed": changed}) + "\n")


def find_run_config(path: str | Path, levels: int = 3) -> Path | None:
    """The config.yaml recorded for `path` (a model or job directory) or for one of its parents."""
    path = Path(path).resolve()
    for folder in [path, *path.parents][: levels + 1]:
        if (folder / CONFIG_FILE).is_file() and (folder / RUN_FILE).is_file():
            return folder / CONFIG_FILE
    return None
