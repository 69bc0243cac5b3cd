import io
import json
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from semhitok.data_pipelines.config import PretokenizeConfig, SourceConfig
from semhitok.data_pipelines.pretokenize import job_split, load_shard, run_pretokenize
from semhitok.tokenizer import SemHiTok, encode_paths
from tests.conftest import REPO, SAMPLE

TRAIN_ROWS = [json.loads(l) for l in open(SAMPLE / "train.jsonl")]
LLAVA = json.loads((SAMPLE / "llava.json").read_text())


def sample_config(**kw) -> PretokenizeConfig:
    return PretokenizeConfig(
        sources=[SourceConfig("coco_captions", "caption_jsonl", str(SAMPLE / "train.jsonl")),
                 SourceConfig("coco_llava", "llava_json", str(SAMPLE / "llava.json"))],
        records_per_shard=kw.pop("records_per_shard", 16), batch_size=8, num_workers=kw.pop("num_workers", 0), **kw)


def all_samples(out: Path) -> dict[str, tuple[dict, np.ndarray | None]]:
    found = {}
    for shard in sorted((out / "shards").glob("*.npz")):
        ids, meta = load_shard(shard)
        for m in meta:
            assert m["key"] not in found, f"{m['key']} written twice"
            found[m["key"]] = (m, ids[m["ids_row"]] if m["ids_row"] >= 0 else None)
    return found


def test_shipped_sample_caption_and_llava_forms(trained_tokenizer, tmp_path):
    out = tmp_path / "pre"
    summary = run_pretokenize(sample_config(num_workers=2), trained_tokenizer, out)
    assert summary["manifest_written"] and summary["images"] == len(TRAIN_ROWS) + len(LLAVA)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["samples"] == len(TRAIN_ROWS) + len(LLAVA) and manifest["errors"] == {}
    model = SemHiTok.from_pretrained(trained_tokenizer)
    assert manifest["grid"] == [model.grid, model.grid] and manifest["visual_vocab_size"] == model.vocab_size
    import hashlib
    for entry in manifest["shards"]:
        assert hashlib.sha256((out / "shards" / entry["file"]).read_bytes()).hexdigest() == entry["sha256"]
    samples = all_samples(out)
    captions = {m["text"] for m, _ in samples.values() if m["kind"] == "caption"}
    assert captions == {r["caption"] for r in TRAIN_ROWS}
    conv = [m for m, _ in samples.values() if m["kind"] == "conversation"]
    assert len(conv) == len(LLAVA) and conv[0]["conversations"][0]["value"].startswith("<image>")
    # ids are exactly what the tokenizer's own encode gives for that image
    first = TRAIN_ROWS[0]
    _, direct = encode_paths(model, [SAMPLE / first["image"]])
    stored = next(ids for m, ids in samples.values() if m["kind"] == "caption" and m["text"] == first["caption"])
    assert stored.dtype == np.int32 and np.array_equal(stored, direct[0].flatten().numpy())
    # a second run finds everything done and writes nothing new
    again = run_pretokenize(sample_config(), trained_tokenizer, out)
    assert again["units_done_now"] == 0 and again["units_already_done"] == summary["units_done_now"]


def test_a_picture_in_several_rows_of_a_batch_is_encoded_once_with_the_same_ids(trained_tokenizer, tmp_path, monkeypatch):
    rows = [{"image": str(SAMPLE / r["image"]), "caption": f"{r['caption']} ({k})"} for r in TRAIN_ROWS[:4] for k in range(3)]
    path = tmp_path / "repeated.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    encoded = []
    real = SemHiTok.encode
    monkeypatch.setattr(SemHiTok, "encode", lambda self, x: encoded.append(len(x)) or real(self, x))  # a spy
    cfg = PretokenizeConfig(sources=[SourceConfig("repeated", "caption_jsonl", str(path))], records_per_shard=100,
                            batch_size=6, num_workers=0)
    run_pretokenize(cfg, trained_tokenizer, tmp_path / "pre")
    assert encoded == [2, 2]  # 12 rows in batches of 6: 2 pictures each
    monkeypatch.undo()
    model = SemHiTok.from_pretrained(trained_tokenizer)
    _, direct = encode_paths(model, [SAMPLE / r["image"] for r in TRAIN_ROWS[:4]])
    stored = {m["text"]: ids for m, ids in all_samples(tmp_path / "pre").values()}
    for i, r in enumerate(rows):
        assert np.array_equal(stored[r["caption"]], direct[i // 3].flatten().numpy()), r


def _write_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_webdataset_text_and_bad_inputs_are_counted_with_their_origin(trained_tokenizer, tmp_path, caplog):
    imgs = [(SAMPLE / r["image"]).read_bytes() for r in TRAIN_ROWS[:3]]
    _write_tar(tmp_path / "part-00000.tar", {
        "000.jpg": imgs[0], "000.txt": b"a caption from txt",
        "001.jpg": imgs[1], "001.json": json.dumps({"caption": "a caption from json"}).encode(),
        "002.jpg": b"\xff\xd8 broken jpeg", "002.txt": b"corrupt image",
        "003.jpg": imgs[2],  # no caption
    })
    _write_tar(tmp_path / "part-00001.tar", {"100.png": imgs[0], "100.txt": b"second tar"})
    text = tmp_path / "text.jsonl"
    text.write_text('{"text": "plain text one"}\n{oops\n{"text": "plain text two"}\n')
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"image": str(SAMPLE / TRAIN_ROWS[0]["image"]), "caption": "ok"}) + "\n"
                     + json.dumps({"image": "nowhere.jpg", "caption": "missing"}) + "\n")
    cfg = PretokenizeConfig(sources=[
        SourceConfig("web", "wds", str(tmp_path / "part-*.tar")),
        SourceConfig("text", "text_jsonl", str(text)),
        SourceConfig("pairs", "caption_jsonl", str(pairs), image_root="/"),
    ], records_per_shard=10, batch_size=4, num_workers=0)
    out = tmp_path / "pre"
    summary = run_pretokenize(cfg, trained_tokenizer, out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["errors"] == {"corrupt_image": 1, "incomplete_sample": 1, "bad_json": 1, "missing_file": 1}
    samples = all_samples(out)
    texts = sorted(m["text"] for m, _ in samples.values())
    assert texts == sorted(["a caption from txt", "a caption from json", "second tar", "plain text one",
                            "plain text two", "ok"])
    assert all((ids is None) == (m["kind"] == "text") for m, ids in samples.values())
    assert summary["images"] == 4
    log = caplog.text
    assert "part-00000.tar:002" in log and "part-00000.tar:003" in log and f"{text}:2" in log and "nowhere.jpg" in log


def test_jobs_split_units_disjointly_and_completely(trained_tokenizer, tmp_path):
    out = tmp_path / "pre"
    a = run_pretokenize(sample_config(), trained_tokenizer, out, num_shards=2, shard_index=0)
    assert not a["manifest_written"]
    b = run_pretokenize(sample_config(), trained_tokenizer, out, num_shards=2, shard_index=1)
    assert b["manifest_written"] and a["units_done_now"] > 0 and b["units_done_now"] > 0
    assert len(all_samples(out)) == len(TRAIN_ROWS) + len(LLAVA)


def test_slurm_environment_sets_the_split(monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert job_split() == (4, 3)
    assert job_split(2, 1) == (2, 1)
    with pytest.raises(ValueError, match="outside"):
        job_split(2, 2)


@pytest.mark.slow
def test_killed_job_resumes_and_writes_every_sample_once(trained_tokenizer, tmp_path):
    out = tmp_path / "pre"
    cmd = [sys.executable, "-m", "semhitok.cli", "pretokenize", "--config", "tiny",
           f"pretokenize.tokenizer={trained_tokenizer}", f"pretokenize.output_dir={out}",
           "pretokenize.records_per_shard=3", "pretokenize.batch_size=3",
           f"pretokenize.sources=[{{name: coco_captions, kind: caption_jsonl, path: {SAMPLE / 'train.jsonl'}}}, "
           f"{{name: coco_llava, kind: llava_json, path: {SAMPLE / 'llava.json'}}}]"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "shards").glob("*.done.json"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list((out / "shards").glob("*.done.json")))
    total_units = -(-len(TRAIN_ROWS) // 3) + -(-len(LLAVA) // 3)
    assert 3 <= done_before < total_units, "the kill should land mid-job"
    assert not (out / "manifest.json").exists()
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    samples = all_samples(out)  # asserts no key twice
    assert len(samples) == len(TRAIN_ROWS) + len(LLAVA)
    assert json.loads((out / "manifest.json").read_text())["samples"] == len(samples)
    assert not list((out / "shards").glob(".*.tmp"))
