"""webdataset sources: shard lists, brace patterns, `pipe:` commands, .txt/.json captions, corrupt members."""

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from semhitok.data_pipelines.config import PretokenizeConfig, SourceConfig
from semhitok.data_pipelines.pretokenize import load_shard, run_pretokenize
from semhitok.data_pipelines.readers import plan_units, read_unit
from tests.conftest import SAMPLE

PHOTOS = sorted({json.loads(l)["image"] for l in open(SAMPLE / "train.jsonl")})


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def read_source(path: str) -> tuple[list, Counter, list]:
    errors = Counter()
    units = plan_units([SourceConfig("web", "wds", path)], 10)
    return [r for u in units for r in read_unit(u, errors)], errors, units


@pytest.fixture(scope="module")
def tars(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tars")
    jpg = (SAMPLE / PHOTOS[0]).read_bytes()
    for i in range(3):
        write_tar(root / f"part-{i:05d}.tar", [(f"s{i}a.jpg", jpg), (f"s{i}a.txt", f"caption {i}a".encode()),
                                               (f"s{i}b.jpg", jpg), (f"s{i}b.json", json.dumps({"caption": f"caption {i}b"}).encode())])
    return root


def test_globs_braces_lists_and_pipes_name_the_same_tars(tars):
    by_glob, errors, units = read_source(str(tars / "part-*.tar"))
    assert errors == {} and [u.file for u in units] == [str(tars / f"part-{i:05d}.tar") for i in range(3)]
    assert [r.text for r in by_glob] == ["caption 0a", "caption 0b", "caption 1a", "caption 1b", "caption 2a", "caption 2b"]
    assert by_glob[0].origin == f"{tars / 'part-00000.tar'}:s0a" and by_glob[0].key == "web/s0a"
    by_brace, _, units = read_source(str(tars / "part-{00000..00002}.tar"))
    assert len(units) == 3 and [r.text for r in by_brace] == [r.text for r in by_glob]
    piped, errors, units = read_source(f"pipe:cat {tars / 'part-00001.tar'}::{tars / 'part-00002.tar'}")
    assert errors == {} and [u.file for u in units] == [f"pipe:cat {tars / 'part-00001.tar'}", str(tars / "part-00002.tar")]
    assert [r.text for r in piped] == [r.text for r in by_glob[2:]]
    assert piped[0].images[0] == (SAMPLE / PHOTOS[0]).read_bytes()
    remote = plan_units([SourceConfig("web", "wds", "https://example.org/part-{000..001}.tar")], 10)  # planned, not read
    assert [u.file for u in remote] == ["https://example.org/part-000.tar", "https://example.org/part-001.tar"]
    with pytest.raises(FileNotFoundError, match="no tar matches"):
        read_source(str(tars / "part-{00003..00004}.tar"))


def test_corrupt_members_and_bad_captions_are_counted_with_their_origin(tmp_path, caplog):
    jpg = (SAMPLE / PHOTOS[0]).read_bytes()
    good = write_tar(tmp_path / "good.tar", [
        ("a.jpg", jpg), ("a.txt", b"fine"),
        ("b.jpg", jpg), ("b.txt", b"\xff\xfe not utf-8"),
        ("c.jpg", jpg), ("c.json", b"{not json"),
        ("d.jpg", jpg), ("d.json", json.dumps({"caption": 42}).encode()),
        ("e.jpg", jpg), ("e.txt", b"   "),
        ("f.txt", b"no image"),
        ("g.jpg", jpg), ("g.json", json.dumps({"caption": "from json"}).encode()),
        ("h.jpg", jpg), ("h.json", json.dumps(["a list"]).encode()),
    ])
    records, errors, _ = read_source(str(good))
    assert [(r.key, r.text) for r in records] == [("web/a", "fine"), ("web/g", "from json")]
    assert errors == {"bad_text": 3, "bad_json": 2, "incomplete_sample": 1}
    for key in "bcdefh":
        assert f"{good}:{key}: skipped" in caplog.text
    # a tar cut in the middle of a member: the samples before it are kept, the break is counted
    data = good.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: data.index(b"from json") - 600])
    records, errors, _ = read_source(f"pipe:cat {cut}")
    assert [r.text for r in records] == ["fine"] and errors["bad_tar"] == 1
    assert f"pipe:cat {cut}: skipped" in caplog.text
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"\x00garbage" * 200)
    records, errors, _ = read_source(str(garbage))
    assert records == [] and errors == {"bad_tar": 1}


def test_pretokenize_streams_a_pipe_source(trained_tokenizer, tars, tmp_path):
    cfg = PretokenizeConfig(sources=[SourceConfig("web", "wds", f"pipe:cat {tars / 'part-00000.tar'}::{tars / 'part-00001.tar'}")],
                            batch_size=3, num_workers=0)
    out = tmp_path / "pre"
    summary = run_pretokenize(cfg, trained_tokenizer, out)
    assert summary["manifest_written"] and summary["images"] == 4
    ids, meta = load_shard(out / "shards" / "web-00000.npz")
    assert [(m["text"], m["origin"], m["ids_row"]) for m in meta] == [
        ("caption 0a", f"pipe:cat {tars / 'part-00000.tar'}:s0a", 0), ("caption 0b", f"pipe:cat {tars / 'part-00000.tar'}:s0b", 1)]
    assert ids.shape[0] == 2
