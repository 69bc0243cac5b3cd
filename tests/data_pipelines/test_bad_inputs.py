"""Hostile and careless inputs to pre-tokenization: bad text, incompatible resumes, unbounded images,
multi-image LLaVA rows, and an old corpus met at training time."""

import io
import json
import shutil
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from semhitok.data_pipelines.config import MixtureComponent, PretokenizeConfig, SequenceConfig, SourceConfig
from semhitok.data_pipelines.loader import PackedLoader
from semhitok.data_pipelines.pretokenize import load_shard, run_pretokenize, visual_manifest, write_unit
from semhitok.data_pipelines.readers import DataError, WorkUnit, plan_units, read_unit
from semhitok.data_pipelines.sequences import SequenceBuilder
from semhitok.data_pipelines.text_tokenizer import TokenLayout
from semhitok.tokenizer import ImageLimits, ImageRejected, SemHiTok, encode_images, encode_paths, open_rgb
from semhitok.tokenizer.interface import IdStructure
from tests.conftest import SAMPLE


def _write_manifest(root: Path, done: dict) -> None:
    """The manifest pre-tokenization writes for one shard of 4x4 SemHiTok-style flat ids."""
    ids = visual_manifest(IdStructure("semhitok", 4, (256 * 12,), (1,)))
    (root / "manifest.json").write_text(json.dumps({**ids, "shards": [done]}))


PHOTOS = sorted({json.loads(l)["image"] for l in open(SAMPLE / "train.jsonl")})


def png_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


def read_all(source: SourceConfig, records_per_shard: int = 100):
    errors = Counter()
    records = [r for unit in plan_units([source], records_per_shard) for r in read_unit(unit, errors)]
    return records, errors


# -- 13.1 bad text ---------------------------------------------------------------------------------------
def test_bad_text_fields_are_counted_and_skipped_with_their_origin(tmp_path, caplog):
    photo = str(SAMPLE / PHOTOS[0])
    rows = [
        {"image": photo, "caption": "a good caption"},          # 1
        {"image": photo, "caption": 5},                          # 2 int caption
        {"image": photo, "caption": "   "},                      # 3 empty
        {"image": photo, "caption": "lone \ud800 surrogate"},    # 4 not UTF-8 encodable
        {"image": 7, "caption": "image is an int"},              # 5
        {"image": photo},                                        # 6 no caption
        {"image": photo, "caption": "  kept as is  "},           # 7 good, unchanged
    ]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_bytes("".join(json.dumps(r) + "\n" for r in rows).encode() + b"\xff not utf-8\n" + b"[" * 100_000 + b"\n")
    records, errors = read_all(SourceConfig("c", "caption_jsonl", str(jsonl), image_root="/"))
    assert [r.text for r in records] == ["a good caption", "  kept as is  "]
    assert errors == {"bad_text": 4, "bad_json": 3}
    for line in (2, 3, 4, 5, 6, 8, 9):
        assert f"{jsonl}:{line}: skipped" in caplog.text


def test_bad_llava_turns_are_counted_and_skipped(tmp_path, caplog):
    ok = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."}]
    rows = [
        {"image": PHOTOS[0], "conversations": ok},
        {"image": PHOTOS[0], "conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}]},
        {"image": PHOTOS[0], "conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "x"}]},
        {"image": PHOTOS[0], "conversations": [{"from": 1, "value": "hi"}]},
        {"image": PHOTOS[0], "conversations": [{"from": "human", "value": "\udfff"}]},
        {"image": PHOTOS[0], "conversations": [{"from": "human", "value": ""}]},
        {"image": PHOTOS[0], "conversations": "not a list"},
        {"image": PHOTOS[0], "conversations": [{"from": "human", "value": "<image> <image> two tags"}]},
        {"conversations": [{"from": "human", "value": "<image> a tag, no image"}, {"from": "gpt", "value": "x"}]},
        {"conversations": [{"role": "user", "content": "text-only chat"}, {"role": "assistant", "content": "fine"}]},
        ["not", "an", "object"],
        {"image": PHOTOS[0], "conversations": [{"from": "gpt", "value": "an image but no user turn to hold it"}]},
        # the tag in a system turn, which the sequence builder never fills (hypothesis found it)
        {"image": PHOTOS[0], "conversations": [{"from": "system", "value": "<image>"}, {"from": "gpt", "value": "x"}]},
    ]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(rows))
    records, errors = read_all(SourceConfig("l", "llava_json", str(path), image_root=str(SAMPLE)))
    assert [r.conversations for r in records] == [ok, rows[9]["conversations"]]
    assert records[0].images == [str(SAMPLE / PHOTOS[0])] and records[1].images == []
    assert errors == {"bad_text": 3, "bad_json": 4, "image_tag_mismatch": 4}
    for i in (1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12):
        assert f"{path}[{i}]: skipped" in caplog.text


def test_source_names_are_unique_and_not_paths(tmp_path):
    text = tmp_path / "t.jsonl"
    text.write_text('{"text": "x"}\n')
    for bad in ("../escape", "a/b", ".hidden", "", "x..y"):
        with pytest.raises(DataError, match="name"):
            plan_units([SourceConfig(bad, "text_jsonl", str(text))], 10)
    with pytest.raises(DataError, match="two sources"):
        plan_units([SourceConfig("t", "text_jsonl", str(text)), SourceConfig("t", "text_jsonl", str(text))], 10)
    with pytest.raises(DataError, match="records_per_shard"):
        plan_units([SourceConfig("t", "text_jsonl", str(text))], 0)
    broken = tmp_path / "broken.json"
    broken.write_text('[{"conversations": ')
    with pytest.raises(DataError, match="broken.json: not a JSON file"):
        plan_units([SourceConfig("b", "llava_json", str(broken))], 10)


# -- 13.4 bounded images ---------------------------------------------------------------------------------
def test_extreme_images_are_rejected_before_decoding():
    tall = png_bytes(Image.new("L", (1, 1_000_000)), optimize=True)
    assert len(tall) < 8_000
    with pytest.raises(ImageRejected, match="aspect ratio") as err:
        open_rgb(tall, size=64)
    assert err.value.kind == "image_aspect_ratio"
    big = png_bytes(Image.new("1", (7000, 7000)))  # 49M pixels: over the default cap, under PIL's bomb warning
    tracemalloc.start()
    with pytest.raises(ImageRejected) as err:
        open_rgb(big, size=64)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert err.value.kind == "image_too_large" and peak < 20 * 2**20, peak
    assert open_rgb(big, ImageLimits(max_pixels=50_000_000)).size == (7000, 7000)  # the limit is what refused it


def test_decompression_bombs_and_memory_errors_become_rejections(monkeypatch):
    small = png_bytes(Image.new("RGB", (100, 100)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10,000 pixels > 2x: DecompressionBombError
    with pytest.raises(ImageRejected) as err:
        open_rgb(small)
    assert err.value.kind == "image_too_large"
    monkeypatch.undo()

    def oom(*args, **kw):
        raise MemoryError

    monkeypatch.setattr(Image.Image, "convert", oom)
    with pytest.raises(ImageRejected, match="out of memory"):
        open_rgb(small)


def test_jpeg_is_decoded_at_a_reduced_scale():
    buf = io.BytesIO()
    Image.new("RGB", (4000, 3000), (10, 200, 30)).save(buf, "JPEG")
    limits = ImageLimits(max_pixels=1_000_000)
    with pytest.raises(ImageRejected):
        open_rgb(buf.getvalue(), limits)
    img = open_rgb(buf.getvalue(), limits, size=256)  # draft: 1/8 scale still has both sides >= 256
    assert img.size == (500, 375) and img.mode == "RGB"


def test_uncommon_modes_convert_to_the_right_rgb():
    grey = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (8, 1))  # a 16-bit gradient
    img = open_rgb(png_bytes(Image.fromarray(grey)))
    arr = np.asarray(img)
    np.testing.assert_allclose(arr[..., 0], grey / 257, atol=1)
    assert (arr == 255).mean() < 0.05  # was 99.6% white
    colour = Image.new("RGB", (8, 8), (100, 150, 200))
    assert tuple(np.asarray(open_rgb(png_bytes(colour.convert("P", palette=Image.Palette.ADAPTIVE))))[0, 0]) == (100, 150, 200)
    cmyk = io.BytesIO()
    colour.convert("CMYK").save(cmyk, "TIFF")
    assert np.abs(np.asarray(open_rgb(cmyk.getvalue()))[0, 0].astype(int) - [100, 150, 200]).max() <= 2
    transparent = Image.new("LA", (8, 8), (0, 0))  # black, fully transparent: over white
    assert tuple(np.asarray(open_rgb(png_bytes(transparent)))[0, 0]) == (255, 255, 255)
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0])
    pal.info["transparency"] = 0
    assert tuple(np.asarray(open_rgb(png_bytes(pal, transparency=0)))[0, 0]) == (255, 255, 255)
    assert tuple(np.asarray(open_rgb(png_bytes(Image.new("1", (8, 8), 1))))[0, 0]) == (255, 255, 255)
    floats = io.BytesIO()
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(floats, "TIFF")
    assert np.asarray(open_rgb(floats.getvalue()))[0, 0, 0] in (127, 128)


def test_every_entry_point_uses_the_bounded_loader(trained_tokenizer, tmp_path, caplog):
    model = SemHiTok.from_pretrained(trained_tokenizer)
    grey = np.tile(np.linspace(0, 255, 64).round().astype(np.uint8), (64, 1))
    as16 = Image.open(io.BytesIO(png_bytes(Image.fromarray(grey.astype(np.uint16) * 257))))
    assert as16.mode == "I;16"
    eight = encode_images(model, [Image.fromarray(grey)])
    assert torch.equal(encode_images(model, [as16]), eight)  # chat uploads and eval go through encode_images
    (tmp_path / "g16.png").write_bytes(png_bytes(Image.fromarray(grey.astype(np.uint16) * 257)))
    (tmp_path / "tall.png").write_bytes(png_bytes(Image.new("L", (2, 200))))
    kept, ids = encode_paths(model, [tmp_path / "g16.png", tmp_path / "tall.png"])  # the tokenizer CLI's path
    assert kept == [tmp_path / "g16.png"] and torch.equal(ids, eight)
    assert "tall.png: image_aspect_ratio" in caplog.text
    with pytest.raises(ImageRejected):
        encode_images(model, [Image.open(io.BytesIO(png_bytes(Image.new("L", (1, 100)))))])


# -- pre-tokenization end to end: bad images, multi-image rows, resume identity --------------------------
def test_pretokenize_skips_bad_images_and_keeps_multi_image_rows(trained_tokenizer, tmp_path):
    (tmp_path / "tall.png").write_bytes(png_bytes(Image.new("L", (1, 1_000_000)), optimize=True))
    for p in PHOTOS[:2]:
        shutil.copy(SAMPLE / p, tmp_path / Path(p).name)
    a, b = (Path(p).name for p in PHOTOS[:2])
    (tmp_path / "caps.jsonl").write_text(
        json.dumps({"image": a, "caption": "fine"}) + "\n" + json.dumps({"image": "tall.png", "caption": "tall"}) + "\n"
        + json.dumps({"image": a, "caption": 12}) + "\n")
    two = [{"from": "human", "value": "<image> first, then <image> second?"}, {"from": "gpt", "value": "both"}]
    (tmp_path / "llava.json").write_text(json.dumps([
        {"id": "two", "image": [b, a], "conversations": two},
        {"id": "mismatch", "image": [a, b], "conversations": [{"from": "human", "value": "<image> one tag"}]},
    ]))
    sources = [SourceConfig("caps", "caption_jsonl", str(tmp_path / "caps.jsonl")),
               SourceConfig("chat", "llava_json", str(tmp_path / "llava.json"), image_mode="crop")]  # as encode_paths
    out = tmp_path / "pre"
    cfg = PretokenizeConfig(sources=sources, records_per_shard=2, batch_size=4, num_workers=0)
    summary = run_pretokenize(cfg, trained_tokenizer, out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["errors"] == {"image_aspect_ratio": 1, "bad_text": 1, "image_tag_mismatch": 1}
    assert summary["samples"] == 2 and summary["images"] == 3
    ids, meta = load_shard(out / "shards" / "chat-00000.npz")
    assert [m["key"] for m in meta] == ["chat/two"] and meta[0]["ids_rows"] == [0, 1]
    model = SemHiTok.from_pretrained(trained_tokenizer)
    _, direct = encode_paths(model, [tmp_path / b, tmp_path / a])
    assert np.array_equal(ids, direct.flatten(1).numpy())
    # the skipped tall image is recorded: a rerun does not meet it again
    again = run_pretokenize(cfg, trained_tokenizer, out)
    assert again["units_done_now"] == 0 and again["manifest_written"]

    # resume identity: another records_per_shard, another tokenizer -> refused, nothing written
    before = sorted(p.name for p in (out / "shards").iterdir())
    with pytest.raises(DataError, match="records_per_shard was 2, now 3"):
        run_pretokenize(PretokenizeConfig(sources=sources, records_per_shard=3, num_workers=0), trained_tokenizer, out)
    other = tmp_path / "other_tok"
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    model.save_pretrained(other)
    with pytest.raises(DataError, match="tokenizer was"):
        run_pretokenize(cfg, other, out)
    assert sorted(p.name for p in (out / "shards").iterdir()) == before
    assert json.loads((out / "manifest.json").read_text())["tokenizer_id"] == manifest["tokenizer_id"]


# -- 13.1 at training time: an old corpus with a bad document names it ---------------------------------
def test_training_names_the_origin_of_a_bad_document(text_tokenizer, tmp_path):
    layout = TokenLayout.from_tokenizer(text_tokenizer, 256 * 12)
    shard_dir = tmp_path / "shards"
    entries = [{"key": f"old/{i}", "origin": f"old.jsonl:{i + 1}", "kind": "caption", "text": f"caption {i}", "ids_row": i}
               for i in range(3)]
    entries[1]["text"] = 5  # what an older pre-tokenization let through
    unit = WorkUnit(SourceConfig("old", "caption_jsonl", "old.jsonl"), 0, "old.jsonl", 0, 3, 3)
    done = write_unit(unit, shard_dir, entries, [np.arange(16, dtype=np.int32)] * 3, 4, {}, {})
    _write_manifest(tmp_path, done)
    cfg = SequenceConfig(mixture=[MixtureComponent("old", "generation")], max_length=256, micro_batch_size=1,
                         pack_lookahead=4, cfg_dropout=0.0)
    expected = r"^\S*old-00000.npz row 1 \(old.jsonl:2\), source 'old': cannot build a generation document \(.*\)$"
    with pytest.raises(DataError, match=expected):
        PackedLoader(cfg, text_tokenizer, layout, tmp_path).next_batch()
    with pytest.raises(DataError, match=expected):  # built in the background process: still its one line
        next(PackedLoader(cfg, text_tokenizer, layout, tmp_path).batches(prefetch=1))


def test_each_image_span_stands_where_its_tag_is(text_tokenizer):
    layout = TokenLayout.from_tokenizer(text_tokenizer, 256 * 12)
    builder = SequenceBuilder(text_tokenizer, layout, SequenceConfig())
    first, second = np.arange(16), np.arange(100, 116)
    meta = {"conversations": [{"from": "human", "value": "<image> and <image>?"}, {"from": "gpt", "value": "two"}]}
    doc = builder.understanding(meta, [first, second])
    starts = np.flatnonzero(doc.tokens == layout.image_start)
    assert len(starts) == 2
    for start, ids in zip(starts, (first, second)):
        np.testing.assert_array_equal(doc.tokens[start + 1 : start + 17] - layout.visual_offset, ids)
        assert doc.tokens[start + 17] == layout.image_end


def test_the_loader_gives_a_multi_image_row_all_its_images(text_tokenizer, tmp_path):
    layout = TokenLayout.from_tokenizer(text_tokenizer, 256 * 12)
    conv = [{"from": "human", "value": "<image> vs <image>?"}, {"from": "gpt", "value": "same"}]
    entries = [{"key": "m/0", "origin": "m.json[0]", "kind": "conversation", "conversations": conv, "ids_row": 0, "ids_rows": [0, 1]}]
    rows = [np.full(16, 7, np.int32), np.full(16, 9, np.int32)]
    unit = WorkUnit(SourceConfig("m", "llava_json", "m.json"), 0, "m.json", 0, 1, 1)
    done = write_unit(unit, tmp_path / "shards", entries, rows, 4, {}, {})
    _write_manifest(tmp_path, done)
    cfg = SequenceConfig(mixture=[MixtureComponent("m", "understanding")], max_length=128, micro_batch_size=1, pack_lookahead=1)
    tokens = PackedLoader(cfg, text_tokenizer, layout, tmp_path).next_batch()["input_ids"][0].numpy()
    start = int(np.flatnonzero(tokens == layout.image_start)[0])
    spans = tokens[tokens >= layout.visual_offset] - layout.visual_offset
    assert spans[:32].tolist() == [7] * 16 + [9] * 16 and tokens[start + 17] == layout.image_end
