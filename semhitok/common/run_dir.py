"""What a run directory records about the job that wrote it, written atomically at job start.

    config.yaml   the resolved project config (loadable again: `--config <dir>/config.yaml`)
    run.json      job, preset, overrides, command line, code revision, package version, start time, host
    runs.jsonl    one line per start (a resumed or requeued job appends), with the keys that changed

A resumed job whose resolved config differs from the recorded one goes on (longer schedules and other
logging are legitimate reasons to resume with new values) but warns, naming every changed key; the
previous config stays in runs.jsonl's history (its hash) and in config.previous.yaml.
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
from semhitok.common.io import atomic_path, write_json

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


def changed_keys(old: dict, new: dict) -> list[str]:
    a, b = flatten(old), flatten(new)
    return sorted(k for k in set(a) | set(b) if a.get(k, "<unset>") != b.get(k, "<unset>"))


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def record_run(job_dir: str | Path, cfg: Any, job: str, preset: str | None = None, overrides: list[str] | None = None) -> None:
    """Write config.yaml, run.json and a runs.jsonl line into job_dir (rank 0 only; atomic)."""
    if not is_main_process():
        return
    job_dir = Path(job_dir)
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
