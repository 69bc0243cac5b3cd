"""Property-based checks of the readers on random and hostile input (Hypothesis).

For any jsonl line, LLaVA row, tar member or image bytes: no exception escapes (only ImageRejected from
the image loader, which callers count), every skipped sample is counted and logged with its origin, every
good sample comes through unchanged, and what comes through can be built into a training document."""

import io
import json
import logging
import tarfile
import tempfile
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from semhitok.data_pipelines.config import SequenceConfig, SourceConfig
from semhitok.data_pipelines.readers import IMAGE_TAG, plan_units, read_unit, text_problem
from semhitok.data_pipelines.sequences import ROLES, SequenceBuilder, UnsuitableSample
from semhitok.data_pipelines.text_tokenizer import TokenLayout
from semhitok.tokenizer import ImageLimits, ImageRejected, open_rgb
from tests.conftest import SAMPLE

PHOTOS = sorted({json.loads(l)["image"] for l in open(SAMPLE / "train.jsonl")})[:3]
SETTINGS = settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))

json_scalar = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
json_value = st.recursive(json_scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                          max_leaves=8)
hostile_text = st.text(alphabet=st.characters(categories=["L", "Zs", "Cs", "Cc"]), max_size=12) | json_value
good_text = st.text(min_size=1, max_size=20).filter(lambda s: text_problem(s) is None)


@contextmanager
def warnings_logged():
    messages: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("semhitok")
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def read_source(source: SourceConfig) -> tuple[list, Counter, list[str]]:
    errors = Counter()
    with warnings_logged() as messages:
        records = [r for unit in plan_units([source], 7) for r in read_unit(unit, errors)]
    return records, errors, messages


@st.composite
def caption_lines(draw):
    """(line bytes, the caption if the row is a good one)"""
    kind = draw(st.sampled_from(["good", "caption", "image", "value", "bytes"]))
    photo = draw(st.sampled_from(PHOTOS))
    if kind == "good":
        caption = draw(good_text)
        return json.dumps({"image": photo, "caption": caption, "extra": draw(json_value)}).encode(), caption
    if kind == "caption":
        return json.dumps({"image": photo, "caption": draw(hostile_text)}).encode(), None
    if kind == "image":
        return json.dumps({"image": draw(json_value), "caption": draw(good_text)}).encode(), None
    if kind == "value":
        return json.dumps(draw(json_value)).encode(), None
    return draw(st.binary(max_size=30)).replace(b"\n", b" "), None


@SETTINGS
@given(st.lists(caption_lines(), min_size=1, max_size=12))
def test_caption_rows(lines):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.jsonl"
        path.write_bytes(b"".join(line + b"\n" for line, _ in lines))
        records, errors, messages = read_source(SourceConfig("c", "caption_jsonl", str(path), image_root=str(SAMPLE)))
    good = [caption for _, caption in lines if caption is not None]
    assert [r.text for r in records if r.origin in {f"{path}:{i}" for i, (_, c) in enumerate(lines, 1) if c is not None}] == good
    counted = {r.origin for r in records}
    blank = {f"{path}:{i}" for i, (line, _) in enumerate(lines, 1) if not line.strip()}
    skipped = [f"{path}:{i}" for i in range(1, len(lines) + 1) if f"{path}:{i}" not in counted | blank]
    assert sum(errors.values()) == len(skipped)
    for origin in skipped:
        assert any(m.startswith(f"{origin}: skipped") for m in messages), origin
    for r in records:
        assert text_problem(r.text) is None and all(Path(p).is_file() for p in r.images)


@st.composite
def llava_rows(draw):
    """(row, True if it was built to be good)"""
    n_images = draw(st.integers(0, 3))
    images = draw(st.lists(st.sampled_from(PHOTOS), min_size=n_images, max_size=n_images))
    if draw(st.booleans()):  # good: one tag per image, alternating human / gpt turns
        turns = []
        for i in range(draw(st.integers(1, 3))):
            question = draw(good_text.filter(lambda s: IMAGE_TAG not in s))
            if i == 0:
                question = " ".join([IMAGE_TAG] * n_images + [question])
            turns += [{"from": "human", "value": question}, {"from": "gpt", "value": draw(good_text)}]
        row = {"conversations": turns}
        if images:
            row["image"] = images if len(images) > 1 else images[0]
        return row, True
    turn = st.fixed_dictionaries({}, optional={"from": st.sampled_from([*ROLES, "robot", 3, None]),
                                               "value": hostile_text | st.sampled_from([IMAGE_TAG, f"{IMAGE_TAG}x{IMAGE_TAG}"])})
    row = {"conversations": draw(st.lists(turn, max_size=3) | json_value)}
    if draw(st.booleans()):
        row["image"] = draw(st.sampled_from([images, images[:1] or "", 5, [3], "missing.jpg"]))
    return row, False


@SETTINGS
@given(st.lists(llava_rows(), min_size=1, max_size=8))
def test_llava_rows(text_tokenizer, rows):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "llava.json"
        path.write_text(json.dumps([row for row, _ in rows]))
        records, errors, messages = read_source(SourceConfig("l", "llava_json", str(path), image_root=str(SAMPLE)))
    by_origin = {r.origin: r for r in records}
    for i, (row, good) in enumerate(rows):
        origin = f"{path}[{i}]"
        if good:
            assert by_origin[origin].conversations == row["conversations"]
        elif origin not in by_origin:
            assert any(m.startswith(f"{origin}: skipped") for m in messages), origin
    assert len(records) + sum(errors.values()) == len(rows)
    # what passes builds a training document (or is unsuitable for a task, which training counts)
    layout = TokenLayout.from_tokenizer(text_tokenizer, 256 * 12)
    builder = SequenceBuilder(text_tokenizer, layout, SequenceConfig())
    for r in records:
        ids = [np.arange(4) + 10 * k for k in range(len(r.images))]
        meta = {"conversations": r.conversations, "origin": r.origin}
        try:
            doc = builder.understanding(meta, ids[0] if len(ids) == 1 else ids or None)
        except UnsuitableSample:
            assert not r.images, r.origin
            continue
        assert (doc.tokens == layout.image_start).sum() == len(r.images)


def test_a_text_with_a_control_token_is_skipped_with_one_line(tmp_path):
    """Hypothesis found it: an answer reading "<|vision_end|>" tokenizes as the image delimiter and breaks the
    document's image spans. The reader skips such a row and names the row and the token."""
    rows = [{"conversations": [{"from": "human", "value": f"{IMAGE_TAG} what is it?"}, {"from": "gpt", "value": answer}],
             "image": PHOTOS[0]} for answer in ("a bus", "<|vision_end|>", "fine<|im_end|>then")]
    (tmp_path / "llava.json").write_text(json.dumps(rows))
    records, errors, messages = read_source(SourceConfig("l", "llava_json", str(tmp_path / "llava.json"), image_root=str(SAMPLE)))
    assert [r.origin.rsplit("[", 1)[1] for r in records] == ["0]"] and sum(errors.values()) == 2
    assert any("llava.json[1]: skipped" in m and "<|vision_end|>" in m for m in messages), messages
    assert any("llava.json[2]: skipped" in m and "<|im_end|>" in m for m in messages), messages


@st.composite
def tar_samples(draw):
    """(members of one key, the caption if it is a good sample)"""
    photo = (SAMPLE / PHOTOS[0]).read_bytes()
    image = draw(st.sampled_from([None, ("jpg", photo), ("png", photo), ("jpg", b"junk")]))
    caption = draw(st.sampled_from(["txt", "json", "none"]))
    text = draw(good_text | hostile_text)
    members = [image] if image else []
    if caption == "txt":  # what a reader finds there: the stripped text, if it is UTF-8
        text = text if isinstance(text, str) else json.dumps(text)
        members.append(("txt", text.encode("utf-8", "surrogatepass")))
        text = text.strip()
    elif caption == "json":  # the caption as is
        members.append(("json", json.dumps({"caption": text}).encode()))
    good = image is not None and caption != "none" and isinstance(text, str) and text_problem(text) is None
    return members, text if good else None


@SETTINGS
@given(st.lists(tar_samples(), min_size=1, max_size=6), st.none() | st.integers(0, 30_000))
def test_tar_members(samples, cut):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "shard.tar"
        with tarfile.open(path, "w") as tar:
            for k, (members, _) in enumerate(samples):
                for ext, data in members:
                    info = tarfile.TarInfo(f"{k:03d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        if cut is not None:
            path.write_bytes(path.read_bytes()[:cut])
        records, errors, messages = read_source(SourceConfig("w", "wds", str(path)))
    for r in records:
        assert text_problem(r.text) is None and isinstance(r.images[0], bytes)
    if cut is None:  # intact: every good sample comes through unchanged, every other one is counted
        good = {f"{path}:{k:03d}": caption for k, (_, caption) in enumerate(samples) if caption is not None}
        assert {r.origin: r.text for r in records} == good
        for k, (members, _) in enumerate(samples):
            origin = f"{path}:{k:03d}"
            if origin not in good and members:
                assert any(m.startswith(f"{origin}: skipped") for m in messages), origin
        assert len(records) + sum(errors.values()) == sum(1 for members, _ in samples if members)


MODES = ["1", "L", "P", "RGB", "RGBA", "LA", "I", "I;16", "F", "CMYK"]


@st.composite
def image_bytes(draw):
    """(encoded bytes, the image's size if it is intact)"""
    mode = draw(st.sampled_from(MODES))
    size = (draw(st.integers(1, 90)), draw(st.integers(1, 90)))
    fmt = draw(st.sampled_from(["PNG", "TIFF", "JPEG", "GIF", "BMP", "WEBP"]))
    img = Image.new("RGB", size, tuple(draw(st.tuples(*[st.integers(0, 255)] * 3)))).convert(mode if mode != "I;16" else "I")
    if mode == "I;16":
        img = Image.fromarray(np.full(size[::-1], draw(st.integers(0, 65535)), np.uint16))
    buf = io.BytesIO()
    try:
        img.save(buf, fmt)
    except (OSError, ValueError, KeyError):  # a mode this format cannot hold
        return draw(st.binary(max_size=200)), None
    data = buf.getvalue()
    damage = draw(st.sampled_from(["none", "truncate", "flip", "random"]))
    if damage == "truncate":
        return data[: draw(st.integers(0, max(0, len(data) - 1)))], None
    if damage == "flip":
        i = draw(st.integers(0, len(data) - 1))
        return data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :], None
    if damage == "random":
        return draw(st.binary(max_size=200)), None
    return data, size


@SETTINGS
@given(image_bytes())
def test_image_bytes(item):
    data, size = item
    limits = ImageLimits(max_pixels=4000, max_aspect_ratio=6.0)
    try:
        img = open_rgb(data, limits)
    except ImageRejected as err:
        assert err.kind in ("corrupt_image", "image_too_large", "image_aspect_ratio") and "\n" not in str(err)
        if size is not None:  # an intact image is refused only for its bounds
            w, h = size
            assert err.kind != "corrupt_image" and (w * h > limits.max_pixels or max(w, h) / min(w, h) > limits.max_aspect_ratio)
        return
    assert img.mode == "RGB" and img.width * img.height <= limits.max_pixels
    if size is not None:
        assert img.size == size
