"""Training trusts nothing in its corpus: shards of a real pre-tokenized corpus flipped, truncated, deleted, emptied,
or rewritten (with their .done.json's sha256 made to match) with ids out of range, rows of another grid or a
broken meta list stop the loader with one line naming the shard, before any row of it is used; with
data.skip_bad_shards they are skipped, logged and counted. A mixture component that can make no document is an
error before the first step, naming its source."""

import json
import os
import re
import shutil

import numpy as np
import pytest

from semhitok.common.io import sha256_file
from semhitok.data_pipelines.config import MixtureComponent, SequenceConfig
from semhitok.data_pipelines.loader import BadShard, PackedLoader
from semhitok.data_pipelines.pretokenize import load_shard
from semhitok.data_pipelines.readers import DataError
from semhitok.data_pipelines.text_tokenizer import TokenLayout

DEEP = b"[" * 100_000 + b"]" * 100_000  # json.loads: RecursionError
VICTIM = "coco_llava-00002.npz"  # images and conversations; not the first shard, so found while drawing


def reseal(shard, ids=None, meta=None, meta_bytes=None):
    """Rewrite a shard's arrays and make its .done.json's sha256 match: only the content checks can tell."""
    old_ids, old_meta = load_shard(shard)
    ids = old_ids if ids is None else ids
    raw = meta_bytes if meta_bytes is not None else json.dumps(old_meta if meta is None else meta).encode()
    with open(shard, "wb") as f:
        np.savez(f, ids=ids, meta_json=np.frombuffer(raw, np.uint8))
    done = shard.with_name(shard.name.removesuffix(".npz") + ".done.json")
    done.write_text(json.dumps({**json.loads(done.read_text()), "sha256": sha256_file(shard)}))


def flip_byte(shard):
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))


def truncate(shard):
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)


def shifted(shard):  # ids moved up by one code vocabulary: past the visual range
    ids, _ = load_shard(shard)
    reseal(shard, ids=ids + 3072)


def negative(shard):
    ids, _ = load_shard(shard)
    ids[1, 5] = -7
    reseal(shard, ids=ids)


def wide(shard, width):
    ids, _ = load_shard(shard)
    reseal(shard, ids=np.resize(ids, (len(ids), width)))


def dropped_sample(shard):
    _, meta = load_shard(shard)
    reseal(shard, meta=meta[:-1])


def bad_image_row(shard):
    _, meta = load_shard(shard)
    meta[3]["ids_row"] = 10_000
    reseal(shard, meta=meta)


CORRUPTIONS = {  # name -> (damage, what the one line says after "<shard>: bad shard, ")
    "one flipped byte": (flip_byte, r"sha256 \w+… is not the \w+… of its coco_llava-00002.done.json"),
    "truncated": (truncate, r"sha256 \w+… is not the \w+… of its coco_llava-00002.done.json \(\d+ bytes"),
    "emptied": (lambda s: s.write_bytes(b""), r"sha256 \w+… is not .*\(0 bytes"),
    "deleted": (lambda s: s.unlink(), r"cannot be read \(FileNotFoundError\)"),
    "its .done.json deleted": (lambda s: s.with_name("coco_llava-00002.done.json").unlink(),
                               r"its coco_llava-00002.done.json is unreadable \(FileNotFoundError\)"),
    "ids shifted past the visual range": (shifted, r"image row 0 has ids outside \[0, 3072\) \(min \d+, max \d+\)"),
    "an id of -7": (negative, r"image row 1 has ids outside \[0, 3072\) \(min -7"),
    "rows 32 ids wide": (lambda s: wide(s, 32), r"rows of 32 ids, the manifest's grid and 1 code\(s\) per position make 64"),
    "rows 128 ids wide": (lambda s: wide(s, 128), r"rows of 128 ids"),
    "meta_json truncated": (lambda s: reseal(s, meta_bytes=json.dumps(load_shard(s)[1]).encode()[:-40]),
                            r"unreadable \(ValueError: meta_json: not valid JSON"),
    "meta_json nested 100,000 deep": (lambda s: reseal(s, meta_bytes=DEEP), r"unreadable \(ValueError: meta_json: JSON nested deeper than 100"),
    "its .done.json nested 100,000 deep": (lambda s: s.with_name("coco_llava-00002.done.json").write_bytes(DEEP),
                                           r"its coco_llava-00002.done.json is unreadable \(ValueError\)"),
    "meta_json an object": (lambda s: reseal(s, meta={"not": "a list"}), r"meta_json is a JSON dict, not a list"),
    "meta_json shorter than the manifest's count": (dropped_sample, r"15 samples in meta_json, the manifest says 16"),
    "a sample's image row past the ids": (bad_image_row, r"sample 3: not an object with ids_row .* among its 16 image rows"),
}


@pytest.fixture
def corpus(pretokenized_sample, tmp_path):
    shutil.copytree(pretokenized_sample, tmp_path / "corpus")
    return tmp_path / "corpus"


def loader(corpus, text_tokenizer, **cfg):
    cfg = SequenceConfig(**{"max_length": 512, "micro_batch_size": 2, **cfg})
    return PackedLoader(cfg, text_tokenizer, TokenLayout.from_tokenizer(text_tokenizer, 256 * 12), corpus)


def drain(corpus, text_tokenizer, batches=200, **cfg):
    """Build batches (every shard is drawn from well within 200); the loader."""
    packed = loader(corpus, text_tokenizer, **cfg)
    for _ in range(batches):
        packed.next_batch()
    return packed


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_a_corrupted_shard_stops_training_with_one_line_naming_it(corpus, text_tokenizer, name):
    damage, says = CORRUPTIONS[name]
    victim = corpus / "shards" / VICTIM
    damage(victim)
    with pytest.raises(BadShard) as err:
        drain(corpus, text_tokenizer)
    message = str(err.value)
    assert "\n" not in message
    assert re.match(rf"{re.escape(str(victim))}: bad shard, {says}", message), message
    assert message.endswith("or set data.skip_bad_shards=true")


def test_a_manifest_nested_100000_deep_is_one_line_naming_it(corpus, text_tokenizer):
    (corpus / "manifest.json").write_bytes(DEEP)
    with pytest.raises(DataError, match=rf"^{re.escape(str(corpus / 'manifest.json'))}: unreadable \(ValueError: manifest.json: "
                                        r"JSON nested deeper than 100"):
        loader(corpus, text_tokenizer)


def test_the_background_worker_reports_a_bad_shard_in_one_line(corpus, text_tokenizer):
    victim = corpus / "shards" / VICTIM
    flip_byte(victim)
    batches = loader(corpus, text_tokenizer).batches(prefetch=1)
    with pytest.raises(BadShard) as err:
        for _ in range(200):
            next(batches)
    assert "\n" not in str(err.value) and str(err.value).startswith(f"{victim}: bad shard, sha256 ")


def test_a_bad_first_shard_is_found_before_the_first_batch(corpus, text_tokenizer):
    victim = corpus / "shards" / "coco_text-00000.npz"
    truncate(victim)
    with pytest.raises(BadShard, match=rf"^{re.escape(str(victim))}: bad shard"):
        loader(corpus, text_tokenizer)


def test_skip_bad_shards_skips_counts_and_logs_them(corpus, text_tokenizer, pretokenized_sample, caplog):
    bad = ["coco_llava-00002.npz", "coco_text-00003.npz"]
    shifted(corpus / "shards" / bad[0])
    flip_byte(corpus / "shards" / bad[1])
    packed = loader(corpus, text_tokenizer, skip_bad_shards=True)
    drawn = {o for _ in range(200) for o in packed.next_batch()["origins"]}
    assert sorted(p.name for p in packed.bad_shards) == bad
    assert packed.stats["skipped_bad_shard"] > 0
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped (data.skip_bad_shards")]
    assert len(logged) == 2 and all(any(name in m for m in logged) for name in bad), logged
    in_bad = {e["origin"] for name in bad for e in load_shard(pretokenized_sample / "shards" / name)[1]}
    clean = loader(pretokenized_sample, text_tokenizer)
    assert in_bad & {o for _ in range(200) for o in clean.next_batch()["origins"]}  # the clean corpus draws from them
    assert drawn and not in_bad & drawn


@pytest.mark.parametrize("mixture, task, source", [
    ([MixtureComponent("coco_captions", "generation"), MixtureComponent("coco_text", "understanding")], "understanding", "coco_text"),
    ([MixtureComponent("coco_text", "generation")], "generation", "coco_text"),
])
def test_a_component_that_makes_no_document_is_an_error_before_the_first_step(corpus, text_tokenizer, mixture, task, source):
    with pytest.raises(DataError, match=rf"^data.mixture\[{len(mixture) - 1}\]: source {source!r} makes no {task} document "
                                        rf"\(71 samples; e.g. coco_text-00000.npz row 0: .*\); drop the component") as err:
        loader(corpus, text_tokenizer, mixture=mixture)
    assert "\n" not in str(err.value)


def test_a_source_whose_every_shard_is_bad_is_an_error_even_when_skipping(corpus, text_tokenizer):
    for shard in (corpus / "shards").glob("coco_text-*.npz"):
        flip_byte(shard)
    with pytest.raises(DataError, match=r"^data.mixture\[3\]: source 'coco_text' makes no text document \(71 samples; its "
                                        r"shards are bad \(data.skip_bad_shards: 5 skipped\)\)"):
        loader(corpus, text_tokenizer, skip_bad_shards=True)


def test_a_clean_corpus_is_hashed_once_per_shard(corpus, text_tokenizer, monkeypatch):
    import hashlib

    hashed = []
    real = hashlib.sha256
    monkeypatch.setattr(hashlib, "sha256", lambda data=b"": hashed.append(len(data)) or real(data))
    drain(corpus, text_tokenizer, batches=40, shard_cache=1)  # every shard leaves the cache and is read again, often
    shards = len(list((corpus / "shards").glob("*.npz")))
    assert len(hashed) == shards


@pytest.mark.parametrize("change", [
    lambda s: [s],  # a list, not an object
    lambda s: {k: v for k, v in s.items() if k != "cursors"},  # KeyError before
    lambda s: {**s, "cursors": ["x"] * len(s["cursors"])},
    lambda s: {**s, "next_draw": -3},
    lambda s: {**s, "pending": [[0, 99, 0]]},  # a mixture component that is not there: IndexError before
    lambda s: {**s, "pending": [[0, 0]]},
    lambda s: {**s, "stats": {"tokens": "many"}},
])
def test_a_forged_loader_state_is_one_line_naming_its_file(corpus, text_tokenizer, change):
    """A checkpoint's loader_rank<r>.json (JSON, never unpickled) of another shape is refused with one line naming
    the file, before any of it is used; a clean state loads."""
    packed = drain(corpus, text_tokenizer, batches=3)
    state = json.loads(json.dumps(packed.state_dict()))  # as the checkpoint holds it
    with pytest.raises(ValueError) as err:
        loader(corpus, text_tokenizer).load_state_dict(change(state), "ckpt/loader_rank0.json")
    assert "\n" not in str(err.value) and str(err.value).startswith("ckpt/loader_rank0.json: not a loader state"), err.value
    again = loader(corpus, text_tokenizer)
    again.load_state_dict(state, "ckpt/loader_rank0.json")
    assert again.next_batch()["input_ids"].equal(packed.next_batch()["input_ids"])


@pytest.mark.parametrize("change, says", [
    (lambda m: m["shards"][0].update(samples=-5), "unit coco_captions-00000: negative samples or images"),  # dropped unseen before
    (lambda m: m.update(grid=[-8, -8]), "must be positive"),
    (lambda m: m.update(grid=[8, 8, 1]), "must be positive"),
    (lambda m: m.update(code_vocab_sizes=[]), "must be positive"),
    (lambda m: m.update(visual_vocab_size="many"), "invalid literal"),
])
def test_a_manifest_with_impossible_counts_or_sizes_is_one_line_naming_it(corpus, text_tokenizer, change, says):
    manifest = json.loads((corpus / "manifest.json").read_text())
    change(manifest)
    (corpus / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError) as err:
        loader(corpus, text_tokenizer)
    assert "\n" not in str(err.value) and str(err.value).startswith(f"{corpus / 'manifest.json'}: unreadable (ValueError: ")
    assert says in str(err.value), err.value


@pytest.mark.parametrize("field", ["kind", "code_vocab_sizes", "shards.source"])
def test_a_manifest_without_the_ids_description_is_refused_with_one_line(corpus, text_tokenizer, field):
    """No defaults for a manifest written before tokenizer kinds: it is pre-tokenized again, not guessed SemHiTok's."""
    manifest = json.loads((corpus / "manifest.json").read_text())
    if field == "shards.source":
        del manifest["shards"][0]["source"]
    else:
        del manifest[field]
    (corpus / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError) as err:
        loader(corpus, text_tokenizer)
    key = field.split(".")[-1]
    assert str(err.value) == (f"{corpus / 'manifest.json'}: unreadable (KeyError: '{key}'); "
                              "run `semhitok pretokenize` again"), err.value
