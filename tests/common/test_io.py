"""Atomic writes honour the umask; completion markers catch damage; metrics rows past a resumed step go."""

import json
import os
import stat

import pytest

from semhitok.common.io import MANIFEST, atomic_dir, atomic_path, verify_manifest, write_json, write_manifest
from semhitok.common.metrics_log import MetricLogger, drop_rows_after


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_writes_get_the_modes_the_umask_gives(tmp_path, umask_027):
    write_json(tmp_path / "a.json", {"x": 1})
    with atomic_path(tmp_path / "b.bin") as tmp:
        tmp.write_bytes(b"x")
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "f").write_text("x")
    assert mode(tmp_path / "a.json") == 0o640 and mode(tmp_path / "b.bin") == 0o640  # not mkstemp's 0600
    assert mode(tmp_path / "d") == 0o750  # not mkdtemp's 0700


def test_manifest_catches_truncation_garbage_and_missing_files(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "weights.bin").write_bytes(b"w" * 1000)
    (d / "sub").mkdir()
    (d / "sub" / "state.json").write_text("{}")
    (d / "sub" / ".metadata").write_bytes(b"m")  # a hidden file is part of the save (torch.distributed.checkpoint's)
    (d / ".state.json.x1y2.tmp").write_text("")  # atomic_path's leftover is not
    assert verify_manifest(d) == (None, f"no {MANIFEST} (the save did not finish)")
    write_manifest(d, {"step": 7})
    manifest, problem = verify_manifest(d)
    assert problem == "" and manifest["step"] == 7 and set(manifest["files"]) == {"weights.bin", "sub/state.json", "sub/.metadata"}
    (d / "weights.bin").write_bytes(b"x" * 1000)  # same size, other bytes
    assert "checksum" in verify_manifest(d)[1]
    (d / "weights.bin").write_bytes(b"w" * 10)
    assert "10 bytes" in verify_manifest(d)[1]
    (d / "weights.bin").unlink()
    assert "missing" in verify_manifest(d)[1]
    (d / MANIFEST).write_text("")
    assert "unreadable" in verify_manifest(d)[1]
    assert verify_manifest(tmp_path / "nowhere") == (None, "missing")


def test_resumed_metrics_keep_one_row_set_per_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": float(s)}) for s in range(0, 34)] + ['{"step": 34, "lo']  # cut by a kill
    path.write_text("\n".join(lines))
    logger = MetricLogger(tmp_path, ["jsonl"], {}, resume_step=20)
    for s in range(21, 41):
        logger.log(s, {"loss": float(s)})
    logger.close()
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines()]
    assert steps == list(range(0, 41))
    assert drop_rows_after(path, 0) == 41 and path.read_text() == ""  # a fresh start keeps nothing
