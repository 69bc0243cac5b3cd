"""Atomic file writes: a reader never sees a half-written file, a crash never corrupts an old one.

Files and directories written here get the permissions a plain open()/mkdir() would give (0666/0777 less
the umask), not mkstemp's 0600/0700. A directory of checkpoint files can carry a completion marker
(`write_manifest`) listing every file's size (and SHA-256 of the small ones), written last and atomically;
`verify_manifest` says what is wrong with a directory before anything in it is trusted.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

MANIFEST = "COMPLETE.json"
HASH_LIMIT = 64 * 2**20  # files up to this size are checksummed too; larger ones by size only (hashing GBs is slow)


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask is the only portable way, and it races)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _plain_mode(path: Path, is_dir: bool) -> None:
    os.chmod(path, (0o777 if is_dir else 0o666) & ~_umask())


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        if os.path.isfile(tmp):
            _plain_mode(Path(tmp), is_dir=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


MAX_JSON_DEPTH = 100  # nesting of the JSON we read (configs, prompts, labels); json.loads recurses per level


def loads_json(text: str | bytes, where: str):
    """json.loads with a depth limit: ValueError (one line naming `where`) for invalid or too deeply nested JSON,
    instead of a RecursionError from the parser or from whatever walks the result later."""
    try:
        obj = json.loads(text)
    except RecursionError:
        raise ValueError(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{where}: not valid JSON ({str(err).splitlines()[0][:200]})") from None
    level, depth = [obj], 0
    while level:  # breadth first, without recursion
        depth += 1
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
        level = [c for node in level if isinstance(node, (dict, list))
                 for c in (node.values() if isinstance(node, dict) else node) if isinstance(c, (dict, list))]
    return obj


def read_json(path: str | Path):
    """A JSON file -> its value (loads_json's checks; errors name the file)."""
    try:
        text = Path(path).read_bytes()
    except OSError as err:
        raise ValueError(f"{path}: cannot read ({err.strerror or err})") from None
    return loads_json(text, str(path))


def read_jsonl(path: str | Path) -> list[dict]:
    """A JSON-lines file -> its rows (blank lines skipped), each an object read with loads_json's depth limit;
    ValueError (one line naming path:line) for a row that is not valid JSON or not an object."""
    try:
        lines = Path(path).read_bytes().splitlines()
    except OSError as err:
        raise ValueError(f"{path}: cannot read ({err.strerror or err})") from None
    rows = []
    for lineno, line in enumerate(lines, 1):
        if line.strip():
            row = loads_json(line, f"{path}:{lineno}")
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: a row must be a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def check_output_dir(path: str | Path, what: str = "output folder") -> Path:
    """A folder a job will create or write into: ValueError (one line) when it, or a folder above it, is a file."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                raise ValueError(f"{what} {path}: {'it' if p == path else p} is a file, not a folder")
            break
    return path


def write_json(path: str | Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a directory under a temporary name and rename it into place when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        _plain_mode(tmp, is_dir=True)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- completion markers ----------------------------------------------------------------------------
def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


@functools.lru_cache(maxsize=256)
def sha256_file_cached(path: str, size: int, mtime_ns: int) -> str:
    """sha256_file of a file known by its resolved path, size and mtime: hashed once per process while those
    stay the same (the key is the cache's; the caller stats the file)."""
    return sha256_file(path)


def write_manifest(directory: str | Path, extra: dict | None = None) -> None:
    """Mark `directory` complete: every file under it (relative path -> size, sha256 when small) plus
    `extra`, written atomically as MANIFEST. Call it after everything else in the directory is written."""
    directory = Path(directory)
    files = {}
    for p in sorted(directory.rglob("*")):
        rel = p.relative_to(directory).as_posix()
        if not p.is_file() or rel == MANIFEST or (p.name.startswith(".") and p.name.endswith(".tmp")):  # atomic_path's
            continue
        size = p.stat().st_size
        files[rel] = {"size": size, **({"sha256": sha256_file(p)} if size <= HASH_LIMIT else {})}
    write_json(directory / MANIFEST, {"files": files, **(extra or {})})


def verify_manifest(directory: str | Path) -> tuple[dict | None, str]:
    """(the manifest, "") when `directory` is complete and every listed file matches; (None, what is wrong)
    otherwise."""
    directory = Path(directory)
    marker = directory / MANIFEST
    if not directory.is_dir():
        return None, "missing"
    if not marker.is_file():
        return None, f"no {MANIFEST} (the save did not finish)"
    try:
        manifest = loads_json(marker.read_bytes(), str(marker))
        files = manifest["files"]
        if not isinstance(files, dict) or not files or not all(isinstance(w, dict) for w in files.values()):
            raise ValueError("no files listed, or an entry that is not an object")
    except (OSError, ValueError, KeyError, TypeError) as err:
        return None, f"unreadable {MANIFEST} ({err})"
    for rel, want in files.items():
        p = directory / rel
        if not p.is_file():
            return None, f"{rel} is missing"
        size = p.stat().st_size
        if size != want.get("size"):
            return None, f"{rel} is {size} bytes, {want.get('size')} when saved"
        if "sha256" in want and sha256_file(p) != want["sha256"]:
            return None, f"{rel} does not match its checksum"
    return manifest, ""


def intact_dirs(dirs: Iterable[Path], skipped: list[str]) -> Iterator[tuple[Path, dict]]:
    """(directory, manifest) for each of `dirs`, in order, whose completion marker matches its files; each
    other one is noted in `skipped` as "name: what is wrong" (resume walks checkpoints newest first)."""
    for path in dirs:
        manifest, problem = verify_manifest(path)
        if manifest is None:
            skipped.append(f"{path.name}: {problem}")
        else:
            yield path, manifest
