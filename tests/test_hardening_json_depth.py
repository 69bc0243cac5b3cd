"""Issue 26, classes 4 and 5's leftovers: every reader of untrusted JSON goes through the depth-limited loads_json
(a deeply nested file is one line naming it, never a RecursionError), and a model directory's base LLM config with
a size out of range is one line naming the file and field (not transformers' multi-line validator error)."""

import json
from collections import Counter

import pytest

from semhitok.common.hub import export_base_config
from semhitok.common.io import MANIFEST, read_jsonl, verify_manifest

DEEP = b"[" * 100_000 + b"]" * 100_000  # json.loads: RecursionError


def deep_object(depth: int) -> dict:
    """{"extra": [[...]]} nested `depth` levels: parses with json.loads, over loads_json's 100."""
    return {"extra": json.loads("[" * depth + "]" * depth)}


def test_a_deep_checkpoint_marker_is_damage_not_a_recursion_error(tmp_path):
    (tmp_path / "w.bin").write_bytes(b"w")
    (tmp_path / MANIFEST).write_bytes(DEEP)
    manifest, problem = verify_manifest(tmp_path)
    assert manifest is None and "nested deeper than 100" in problem


@pytest.mark.parametrize("text, message", [
    (DEEP, "w.jsonl:2: JSON nested deeper than 100"),
    (json.dumps(deep_object(150)).encode(), "w.jsonl:2: JSON nested deeper than 100"),
    (b"[1, 2]", "w.jsonl:2: a row must be a JSON object, got list"),
    (b"{", "w.jsonl:2: not valid JSON"),
])
def test_jsonl_rows_are_read_with_the_depth_limit(tmp_path, text, message):
    path = tmp_path / "w.jsonl"
    path.write_bytes(b'{"a": 1}\n' + text + b"\n")
    with pytest.raises(ValueError, match=message) as err:
        read_jsonl(path)
    assert "\n" not in str(err.value)


def test_world_files_are_read_with_the_depth_limit(tmp_path):
    from semhitok.data_pipelines.world import WorldConfig, read_scenes, write_world

    world = tmp_path / "world"
    world.mkdir()
    (world / "WORLD.json").write_bytes(DEEP)
    with pytest.raises(ValueError, match="WORLD.json: JSON nested deeper than 100"):
        write_world(WorldConfig(train_scenes=1, holdout_scenes=1, text_rows=0), world)
    (world / "scenes.jsonl").write_bytes(DEEP + b"\n")
    with pytest.raises(ValueError, match="scenes.jsonl:1: JSON nested deeper"):
        read_scenes(world)
    (world / "scenes.jsonl").write_text(json.dumps({"image": "a.png", "split": "train", "heldout_combo": False}) + "\n")
    with pytest.raises(ValueError, match="scenes.jsonl: row 1: not a scene"):  # no objects: one line, not a KeyError
        read_scenes(world)


def test_pretokenization_rows_deeper_than_the_limit_are_counted_skips(tmp_path):
    from semhitok.data_pipelines.config import SourceConfig
    from semhitok.data_pipelines.readers import DataError, WorkUnit, read_unit

    (tmp_path / "a.jpg").write_bytes(b"")
    rows = tmp_path / "cap.jsonl"
    ok = {"image": "a.jpg", "caption": "a red circle"}
    rows.write_text("\n".join(json.dumps(r) for r in (ok, {**ok, **deep_object(150)}, ok)) + "\n")
    errors: Counter = Counter()
    got = list(read_unit(WorkUnit(SourceConfig("cap", "caption_jsonl", str(rows)), 0, str(rows), 0, 3), errors))
    assert len(got) == 2 and errors["bad_json"] == 1  # (json.loads took the deep row)
    llava = tmp_path / "llava.json"
    llava.write_bytes(DEEP)
    with pytest.raises(DataError, match=r"llava.json: not a JSON file \(JSON nested deeper than 100"):
        list(read_unit(WorkUnit(SourceConfig("chat", "llava_json", str(llava)), 0, str(llava), 0, 1), Counter()))


TINY_QWEN = {"model_type": "qwen2", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 128}


@pytest.mark.parametrize("text_config, message", [
    ({**TINY_QWEN, "num_hidden_layers": -1}, "text_config: num_hidden_layers must be an integer >= 1, got -1"),
    ({**TINY_QWEN, "num_hidden_layers": 0}, "text_config: num_hidden_layers must be an integer >= 1, got 0"),  # built 0 layers
    ({**TINY_QWEN, "hidden_size": "wide"}, "text_config: hidden_size must be an integer >= 1"),
    ({**TINY_QWEN, "num_hidden_layers": 2, "layer_types": ["full_attention"]}, "text_config: not a usable config"),
    ("qwen2", "text_config: must be an object with a model_type"),
    ({"hidden_size": 32}, "text_config: must be an object with a model_type"),
])
def test_a_model_directorys_base_config_is_checked_in_one_line(tmp_path, text_config, message):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "semhitok_mllm", "text_config": text_config}))
    with pytest.raises(ValueError, match=message) as err:
        export_base_config(tmp_path)
    assert str(tmp_path / "config.json") in str(err.value) and "\n" not in str(err.value)


def test_a_usable_base_config_and_other_directories_load_as_before(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "semhitok_mllm", "text_config": TINY_QWEN}))
    assert export_base_config(tmp_path).num_hidden_layers == 2
    (tmp_path / "config.json").write_text(json.dumps(TINY_QWEN))  # a plain LLM's config: not an export's
    assert export_base_config(tmp_path) is None
    (tmp_path / "config.json").write_bytes(DEEP)  # unreadable here: from_pretrained's read_json names it
    assert export_base_config(tmp_path) is None


def test_the_world_evaluation_reads_its_files_with_the_depth_limit(tmp_path):
    from semhitok.eval.world_eval import read_jsonl as read_world_rows
    from semhitok.eval.world_eval import world_config

    (tmp_path / "questions.jsonl").write_bytes(b'{"a": 1}\n' + DEEP + b"\n")
    with pytest.raises(ValueError, match="questions.jsonl:2: JSON nested deeper than 100"):
        read_world_rows(tmp_path / "questions.jsonl")
    (tmp_path / "WORLD.json").write_bytes(DEEP)
    with pytest.raises(ValueError, match="WORLD.json: JSON nested deeper than 100"):
        world_config(tmp_path)
    (tmp_path / "WORLD.json").write_text('["not", "an object"]')
    with pytest.raises(ValueError, match=r'WORLD.json: must hold an object with a "world" object'):
        world_config(tmp_path)


def test_a_shard_and_a_done_record_nested_deep_are_one_line(tmp_path):
    import numpy as np

    from semhitok.data_pipelines.pretokenize import _read_done, load_shard
    from semhitok.data_pipelines.readers import DataError

    shard = tmp_path / "s-00000.npz"
    np.savez(shard, ids=np.zeros((1, 4), np.int32), meta_json=np.frombuffer(DEEP, np.uint8))
    with pytest.raises(ValueError, match="s-00000.npz: meta_json: JSON nested deeper than 100"):
        load_shard(shard)
    (tmp_path / "s-00000.done.json").write_bytes(DEEP)
    with pytest.raises(DataError, match=r"s-00000.done.json: unreadable \(ValueError\); delete it to redo that unit"):
        _read_done(tmp_path / "s-00000.done.json")


def test_teacher_and_toklip_training_rows_nested_deep_are_skipped_like_other_bad_rows(tmp_path, caplog):
    """The teacher's image-caption pairs and TokLIP's caption list read rows with the depth limit: a deep row is a
    skipped bad row (logged with file:line), as an invalid one is, not a RecursionError"""
    from semhitok.tokenizer.teacher import read_pairs
    from semhitok.tokenizer.toklip.train import list_captions

    (tmp_path / "a.png").write_bytes(b"")
    rows = tmp_path / "rows.jsonl"
    rows.write_bytes(b'{"image": "a.png", "caption": "a cat"}\n' + DEEP + b"\n{\n")
    assert read_pairs([rows]) == [(tmp_path / "a.png", "a cat")]
    assert f"{rows}:2: skipped" in caplog.text and "nested deeper than 100" in caplog.text
    assert list_captions([str(rows)]) == ["a cat"]
