"""Pre-tokenization resumes by content, not spelling; a stream that fails is never sealed; a refused resume
records nothing; over-long texts are counted, not stored."""

import io
import json
import tarfile
from pathlib import Path

import pytest

from semhitok.cli import main
from semhitok.common.run_dir import changed_keys, plain
from semhitok.config import load_project_config
from semhitok.data_pipelines.config import PretokenizeConfig, SourceConfig
from semhitok.data_pipelines.pretokenize import run_pretokenize
from semhitok.data_pipelines.readers import DataError
from tests.conftest import REPO, SAMPLE

ROWS = [json.loads(line) for line in (SAMPLE / "train.jsonl").read_text().splitlines()][:6]


def write_captions(path: Path, rows: list[dict]) -> Path:
    """A caption jsonl whose image paths are absolute (so the file can live anywhere)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"image": str(SAMPLE / r["image"]), "caption": r["caption"]}) + "\n" for r in rows))
    return path


def captions_config(path: str, **kw) -> PretokenizeConfig:
    return PretokenizeConfig(sources=[SourceConfig("cap", "caption_jsonl", path)], records_per_shard=3, batch_size=8,
                             num_workers=0, **kw)


def test_the_same_corpus_spelled_another_way_resumes(trained_tokenizer, tmp_path, monkeypatch):
    data = write_captions(tmp_path / "data" / "cap.jsonl", ROWS)
    out = tmp_path / "pre"
    first = run_pretokenize(captions_config(str(data)), trained_tokenizer, out)
    assert first["units_done_now"] == 2 and first["manifest_written"]
    (tmp_path / "alias").symlink_to(tmp_path / "data")
    copy = tmp_path / "site-packages" / "semhitok" / "data" / "cap.jsonl"  # an installed wheel's copy of the same file
    copy.parent.mkdir(parents=True)
    copy.write_bytes(data.read_bytes())
    monkeypatch.chdir(tmp_path)
    for spelling in (str(tmp_path / "alias" / "cap.jsonl"), "data/cap.jsonl", "./alias/../data/cap.jsonl", str(copy)):
        again = run_pretokenize(captions_config(spelling), trained_tokenizer, out)
        assert (again["units_done_now"], again["units_already_done"]) == (0, 2), spelling


def test_the_run_record_compares_paths_by_content(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    checkout = plain(load_project_config("tiny"))  # data/sample/... relative to the checkout
    assert checkout["pretokenize"]["sources"][0]["path"] == "data/sample/train.jsonl"
    monkeypatch.chdir(tmp_path)
    elsewhere = plain(load_project_config("tiny"))  # the same files, spelled absolute
    assert elsewhere["pretokenize"]["sources"][0]["path"] == str(REPO / "data/sample/train.jsonl")
    assert changed_keys(checkout, elsewhere) == []
    wheel = tmp_path / "site-packages" / "semhitok" / "data" / "sample"  # a copy elsewhere with the same bytes
    wheel.mkdir(parents=True)
    (wheel / "train.jsonl").write_bytes((SAMPLE / "train.jsonl").read_bytes())
    elsewhere["pretokenize"]["sources"][0]["path"] = str(wheel / "train.jsonl")
    assert changed_keys(checkout, elsewhere) == []
    (wheel / "train.jsonl").write_text('{"image": "x.jpg", "caption": "other"}\n')  # other bytes: a change
    assert changed_keys(checkout, elsewhere) == ["pretokenize.sources"]


def test_a_field_recorded_null_by_an_older_version_and_gone_now_is_no_change():
    now = plain(load_project_config("tiny"))
    older = {**now, "mllm": {**now["mllm"], "qwen2_config": None}, "tokenizer": {**now["tokenizer"], "pix_width": None}}
    assert "qwen2_config" not in now["mllm"] and changed_keys(older, now) == []
    older["tokenizer"]["pix_width"] = 128  # a value, not null: a change
    assert changed_keys(older, now) == ["tokenizer.pix_width"]


def test_a_replaced_input_is_refused_in_one_line_and_the_records_stay(trained_tokenizer, tmp_path, capsys):
    data = write_captions(tmp_path / "cap.jsonl", ROWS)
    run = tmp_path / "run"
    args = ["pretokenize", "--config", "tiny", f"run_dir={run}", f"pretokenize.tokenizer={trained_tokenizer}",
            "pretokenize.records_per_shard=3", "pretokenize.num_workers=0",
            f"pretokenize.sources=[{{name: cap, kind: caption_jsonl, path: {data}}}]"]
    assert main(args + ["--num-shards", "2", "--shard-index", "0"]) == 0  # a partial run: unit 0 of 2
    shards = run / "pretokenized" / "shards"
    assert sorted(p.name for p in shards.glob("*.done.json")) == ["cap-00000.done.json"]
    records = {name: (run / "pretokenized" / name).read_bytes() for name in ("config.yaml", "run.json", "runs.jsonl")}
    write_captions(data, [{**r, "caption": r["caption"].upper()} for r in ROWS])  # replaced: other captions
    capsys.readouterr()
    for overrides in ([], ["pretokenize.batch_size=4"]):  # two refused resumes, one with another config
        assert main(args + overrides) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "unit cap-00000 was pre-tokenized differently" in err and "other content" in err
        assert {name: (run / "pretokenized" / name).read_bytes() for name in records} == records
    assert not (shards / "cap-00001.done.json").exists()


def write_tar(path: Path, samples: int) -> Path:
    with tarfile.open(path, "w") as tar:
        for i, row in enumerate(ROWS[:samples]):
            for name, data in ((f"{i:03d}.jpg", (SAMPLE / row["image"]).read_bytes()), (f"{i:03d}.txt", row["caption"].encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_a_stream_that_fails_midway_is_not_done_and_a_rerun_retries_it(trained_tokenizer, tmp_path):
    tar = write_tar(tmp_path / "part.tar", 4)
    half = tar.stat().st_size // 2  # some samples whole, then the command fails
    healed = tmp_path / "healed"
    command = f"pipe:sh -c 'if [ -e {healed} ]; then cat {tar}; else head -c {half} {tar}; exit 1; fi'"
    cfg = PretokenizeConfig(sources=[SourceConfig("web", "wds", command)], batch_size=8, num_workers=0)
    out = tmp_path / "pre"
    with pytest.raises(DataError, match="1 unit.*not read to the end.*web-00000.*exit 1.*run again"):
        run_pretokenize(cfg, trained_tokenizer, out)
    assert not (out / "shards" / "web-00000.done.json").exists() and not (out / "manifest.json").exists()
    healed.touch()  # the stream works now: the rerun retries the unit, it is not "already done"
    summary = run_pretokenize(cfg, trained_tokenizer, out)
    assert (summary["units_done_now"], summary["units_already_done"], summary["samples"]) == (1, 0, 4)
    assert summary["manifest_written"]
    done = json.loads((out / "shards" / "web-00000.done.json").read_text())
    assert done["identity"]["input"]["bytes"] == tar.stat().st_size  # the whole stream, to its end


def test_an_unreachable_url_is_not_done(trained_tokenizer, tmp_path):
    cfg = PretokenizeConfig(sources=[SourceConfig("web", "wds", "http://127.0.0.1:9/part.tar")], num_workers=0)
    with pytest.raises(DataError, match="not read to the end"):
        run_pretokenize(cfg, trained_tokenizer, tmp_path / "pre")
    assert not (tmp_path / "pre" / "shards" / "web-00000.done.json").exists()


def test_an_over_long_caption_is_counted_text_too_long(trained_tokenizer, tmp_path):
    long_words = " ".join(["word"] * 51)  # 51 words: at least 51 tokens
    no_spaces = "x" * (50 * 128 + 1)  # one word, but more bytes than 50 tokens can hold
    kept = " ".join(["word"] * 50)
    rows = [{**ROWS[0], "caption": long_words}, {**ROWS[1], "caption": no_spaces}, {**ROWS[2], "caption": kept}]
    data = write_captions(tmp_path / "cap.jsonl", rows)
    tar = tmp_path / "part.tar"
    with tarfile.open(tar, "w") as t:
        for name, payload in (("a.jpg", (SAMPLE / ROWS[0]["image"]).read_bytes()), ("a.txt", long_words.encode())):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            t.addfile(info, io.BytesIO(payload))
    llava = tmp_path / "llava.json"
    llava.write_text(json.dumps([{"id": "c", "image": str(SAMPLE / ROWS[0]["image"]), "conversations": [
        {"from": "human", "value": "<image>\n" + " ".join(["ask"] * 30)}, {"from": "gpt", "value": " ".join(["say"] * 30)}]}]))
    cfg = PretokenizeConfig(sources=[SourceConfig("cap", "caption_jsonl", str(data)), SourceConfig("web", "wds", str(tar)),
                                     SourceConfig("chat", "llava_json", str(llava), image_root="/")],
                            batch_size=8, num_workers=0, max_text_tokens=50)
    out = tmp_path / "pre"
    summary = run_pretokenize(cfg, trained_tokenizer, out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["errors"] == {"text_too_long": 4} and summary["samples"] == 1


def test_fewest_tokens_is_a_lower_bound_of_the_text_tokenizer(text_tokenizer):
    from semhitok.data_pipelines.readers import fewest_tokens

    texts = ["a family is sitting down at a table", "x" * 5000, "   ".join(["spaced"] * 40), "数字 " * 300,
             "\n\n".join(["line"] * 100), "-" * 1000 + " end", "word " * 2000]
    for text in texts:
        assert len(text_tokenizer(text, add_special_tokens=False).input_ids) >= fewest_tokens(text), text[:30]
