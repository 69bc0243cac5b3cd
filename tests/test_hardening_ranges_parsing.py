"""Issue 26, classes 3 and 4: every knob has a range (NaN and infinities refused), and config / JSON / file
parsing fails with one line naming the field or the file, before anything is written. All in-process: configs,
argparse and the readers, no model loaded."""

import json
import os
import signal
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from semhitok.cli import main
from semhitok.common.config_io import ConfigError, load_config
from semhitok.config import ProjectConfig, load_project_config
from semhitok.data_pipelines.config import MixtureComponent, SequenceConfig, check_max_length

DEEP_JSON = "[" * 100_000 + "]" * 100_000


def one_line(text: str) -> str:
    text = str(text).strip()
    assert text and "\n" not in text, text[:500]
    return text


def cli_error(argv: list[str], capsys) -> str:
    """main(argv) fails with exit 2 and prints one line (the last on stderr, 'semhitok: error: ...')."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("semhitok: error: "), err
    return one_line(err[-1])


# -- class 3: knobs without ranges --------------------------------------------------------------------------
@pytest.mark.parametrize("override, field", [
    ("pretokenize.max_aspect_ratio=.nan", "pretokenize.max_aspect_ratio"),  # NaN disabled the aspect check
    ("pretokenize.max_aspect_ratio=.inf", "pretokenize.max_aspect_ratio"),
    ("pretokenize.max_aspect_ratio=0.5", "pretokenize.max_aspect_ratio"),  # below 1 rejects every image
    ("pretokenize.max_image_pixels=-1", "pretokenize.max_image_pixels"),  # rejected every image, exit 0
    ("pretokenize.max_image_pixels=0", "pretokenize.max_image_pixels"),
    ("pretokenize.batch_size=1000000", "pretokenize.batch_size"),
    ("data.max_length=100000000", "data.max_length"),  # 5.4 GB and a worker abort
    ("data.max_length=1e8", "data.max_length"),
    ("data.micro_batch_size=100000", "data.micro_batch_size"),  # no step in 4 min
    ("data.max_length=1048576 data.micro_batch_size=8", "data.micro_batch_size"),  # each in range, 8M tokens a step
    ("data.pack_lookahead=10000000000", "data.pack_lookahead"),
    ("eval.sampling.cfg_scale=1e308", "eval.sampling.cfg_scale"),  # overflowed logits, a degenerate image
    ("eval.sampling.cfg_scale=-1e308", "eval.sampling.cfg_scale"),
    ("eval.sampling.cfg_scale=101", "eval.sampling.cfg_scale"),
    ("eval.sampling.cfg_scale=-0.5", "eval.sampling.cfg_scale"),
    ("eval.geneval_samples=1000000000", "eval.geneval_samples"),  # GenEval drew 2 x 10^9 samples, no end in 5 min
    ("eval.batch_size=100000", "eval.batch_size"),
    ("tokenizer_train.semantic_weight=.nan", "tokenizer_train.semantic_weight"),  # NaN, inf and -1 were accepted
    ("tokenizer_train.semantic_weight=-1", "tokenizer_train.semantic_weight"),
])
def test_out_of_range_knobs_are_one_line_naming_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_project_config("tiny", override.split())
    assert one_line(err.value).startswith(f"tiny.{field}"), str(err.value)


def test_the_edges_of_the_ranges_load():
    cfg = load_project_config("tiny", ["pretokenize.max_aspect_ratio=1", "data.max_length=1048576", "data.micro_batch_size=1",
                                       "eval.sampling.cfg_scale=0", "pretokenize.max_image_pixels=1"])
    assert cfg.data.max_length == 1_048_576 and cfg.eval.sampling.cfg_scale == 0


@pytest.mark.parametrize("max_length", [32, 66])  # an 8x8 grid: one image span is 64 ids + 2 markers
@pytest.mark.parametrize("task", ["generation", "understanding"])
def test_max_length_must_hold_an_image_span_of_every_visual_task(max_length, task):
    cfg = SequenceConfig(max_length=max_length, mixture=[MixtureComponent("text", "text"), MixtureComponent("caps", task)])
    with pytest.raises(ConfigError) as err:
        check_max_length(cfg, [8, 8])
    assert one_line(err.value).startswith(f"data.max_length={max_length} holds no {task} document of data.mixture[1]")
    check_max_length(SequenceConfig(max_length=67, mixture=cfg.mixture), [8, 8])
    check_max_length(SequenceConfig(max_length=32, mixture=[MixtureComponent("text", "text"),  # weight 0: not drawn
                                                            MixtureComponent("caps", task, 0.0)]), [8, 8])


@pytest.mark.parametrize("argv, flag", [
    (["tokenizer", "encode", "--model", "M", "IMG", "--out", "OUT/ids.npz", "--batch-size", "-1"], "--batch-size"),
    (["tokenizer", "encode", "--model", "M", "IMG", "--out", "OUT/ids.npz", "--batch-size", "0"], "--batch-size"),
    (["tokenizer", "decode", "--model", "M", "--ids", "IMG", "--out", "OUT", "--batch-size", "100000"], "--batch-size"),
    (["tokenizer", "reconstruct", "--model", "M", "IMG", "--out", "OUT", "--batch-size", "-1"], "--batch-size"),
    (["tokenizer", "eval", "--model", "M", "IMG", "--json", "OUT/r.json", "--batch-size", "-3"], "--batch-size"),
    (["sample", "--model", "M", "--prompt", "p", "--out", "OUT", "--cfg-scale", "1e308"], "cfg_scale"),
    (["sample", "--model", "M", "--prompt", "p", "--out", "OUT", "--cfg-scale=-1e308"], "cfg_scale"),
    (["sample", "--model", "M", "--prompt", "p", "--out", "OUT", "--cfg-scale", "nan"], "cfg_scale"),
    (["sample", "--model", "M", "--prompt", "p", "--out", "OUT", "--samples-per-prompt", "1000000000"], "--samples-per-prompt"),
    (["sample", "--model", "M", "--prompt", "p", "--out", "OUT", "--samples-per-prompt", "0"], "--samples-per-prompt"),
    (["sample", "--model", "M", "--prompt", "p", "--out", "OUT", "--batch-size", "-1"], "--batch-size"),
])
def test_out_of_range_flags_fail_before_anything_is_loaded_or_written(argv, flag, tmp_path, capsys):
    (tmp_path / "img.png").write_bytes(b"")
    argv = [str(tmp_path / "img.png") if a == "IMG" else str(tmp_path / "missing-model") if a == "M"
            else a.replace("OUT", str(tmp_path / "out")) for a in argv]
    assert flag in cli_error(argv, capsys)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out*"))


def test_sample_images_draws_its_jobs_a_batch_at_a_time(tmp_path):
    """10,000 samples of 1,000 prompts: the first batch is asked for before a job list of 10M pairs exists."""
    from semhitok.mllm.config import MAX_SAMPLES_PER_PROMPT, SamplingConfig
    from semhitok.mllm.sample import sample_images

    class FirstBatch(Exception):
        pass

    class Decoder:
        def image_ids(self, prompts, sampling, samples):
            assert len(prompts) == len(samples) == 4
            raise FirstBatch

    tracemalloc.start()
    with pytest.raises(FirstBatch):
        sample_images(Decoder(), None, [f"p{i}" for i in range(1000)], tmp_path, SamplingConfig(), 4, MAX_SAMPLES_PER_PROMPT)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 20 * 2**20, peak  # a list of 10M tuples is ~1 GB
    with pytest.raises(ValueError, match="samples per prompt"):
        sample_images(Decoder(), None, ["p"], tmp_path, SamplingConfig(), 4, 10**9)


# -- class 4: config and file parsing -----------------------------------------------------------------------
LAUGHS = ("{a: &a [x,x,x,x,x,x,x,x,x], b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a], c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b], "
          "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c], e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d], f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e], "
          "g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f], h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g], i: [*h,*h,*h,*h,*h,*h,*h,*h,*h]}")


@pytest.mark.parametrize("override, says", [
    (f"mllm.base_config={LAUGHS}", "aliases expanded"),  # 9^9 leaves (a dict field takes any mapping): 4.2 GB before
    (f"tokenizer.siglip_config={LAUGHS}", "aliases expanded"),
    (f"data.mixture={LAUGHS}", "aliases expanded"),
    ("data.mixture=" + "[" * 20_000 + "]" * 20_000, "nested deeper"),  # RecursionError before
    ("data.mixture=" + "{a: " * 5_000 + "1" + "}" * 5_000, "nested deeper"),
])
def test_hostile_yaml_overrides_fail_fast_with_one_line(override, says):
    start = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        load_project_config("tiny", [override])
    assert time.perf_counter() - start < 5
    text = one_line(err.value)
    assert text.startswith("override ") and says in text and len(text) < 400


def test_a_yaml_config_file_too_deep_or_too_large_is_one_line(tmp_path):
    for name, text in (("deep.yaml", "run_dir: " + "[" * 20_000 + "]" * 20_000 + "\n"), ("laughs.yaml", f"mllm: {{base_config: {LAUGHS}}}\n")):
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError) as err:
            load_config(ProjectConfig, tmp_path / name)
        assert one_line(err.value).startswith(str(tmp_path / name))


def deep_model_dir(tmp_path: Path, name: str) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / name).write_text(DEEP_JSON)
    return folder


@pytest.mark.parametrize("reader, file", [
    ("prompts", "prompts.jsonl"),  # semhitok sample --prompts
    ("tokenizer", "config.json"),  # a tokenizer directory's config.json
    ("mllm", "semhitok_mllm.json"),  # an MLLM export's own config
    ("pope", "pope.jsonl"),  # eval.pope_questions
    ("geneval", "geneval.jsonl"),  # eval.geneval_metadata: RecursionError before
    ("gfid", "captions.jsonl"),  # eval.gfid_captions: RecursionError before
    ("gaps", "pairs.jsonl"),  # eval.gaps_data: RecursionError before
])
def test_a_100k_deep_json_is_one_line_naming_the_file(reader, file, tmp_path):
    if reader == "prompts":
        from semhitok.mllm.sample import read_prompts
        (tmp_path / file).write_text('{"prompt": "a"}\n' + DEEP_JSON + "\n")
        call = lambda: read_prompts(tmp_path / file)  # noqa: E731
    elif reader == "tokenizer":
        from semhitok.tokenizer.saved import read_meta
        call = lambda: read_meta(deep_model_dir(tmp_path, file))  # noqa: E731
    elif reader == "mllm":
        from semhitok.mllm.model import SemHiTokLM
        call = lambda: SemHiTokLM.from_pretrained(deep_model_dir(tmp_path, file))  # noqa: E731
    elif reader == "pope":
        from semhitok.eval.pope import load_pope
        (tmp_path / file).write_text(DEEP_JSON + "\n")
        call = lambda: load_pope(tmp_path / file, tmp_path)  # noqa: E731
    else:
        from semhitok.eval.generation import read_captions, read_metadata
        from semhitok.mllm.gaps import load_pairs
        (tmp_path / file).write_text('{"prompt": "a", "image": "a.png", "caption": "a"}\n' + DEEP_JSON + "\n")
        read = {"geneval": read_metadata, "gfid": read_captions, "gaps": lambda path: load_pairs(path, None)}[reader]
        call = lambda: read(tmp_path / file)  # noqa: E731
    with pytest.raises(ValueError) as err:
        call()
    text = one_line(err.value)
    assert file in text and "nested deeper than" in text


@pytest.mark.parametrize("row", ['["prompt", "caption", "image"]', '{"prompt": 3, "caption": 3, "image": 3}', '"a"'])
def test_eval_rows_of_the_wrong_shape_are_one_line_naming_the_row(row, tmp_path):
    """GenEval metadata, gFID captions and gap pairs: a row that is not an object with its strings is one line
    naming file:line (gFID's and the gaps' readers ended in TypeError / KeyError tracebacks before)"""
    from semhitok.eval.generation import read_captions, read_metadata
    from semhitok.mllm.gaps import load_pairs

    (tmp_path / "rows.jsonl").write_text('{"prompt": "a", "image": "a.png", "caption": "a"}\n\n' + row + "\n")
    for read in (read_metadata, read_captions, lambda path: load_pairs(path, None)):
        with pytest.raises(ValueError) as err:
            read(tmp_path / "rows.jsonl")
        assert one_line(err.value).startswith(f"{tmp_path / 'rows.jsonl'}:3: expected "), err.value
    (tmp_path / "good.jsonl").write_text('{"prompt": "a", "image": "a.png", "caption": "b"}\n\n')
    assert read_captions(tmp_path / "good.jsonl") == ["b"] and read_metadata(tmp_path / "good.jsonl")[0]["prompt"] == "a"


def test_json_just_deeper_than_the_limit_is_refused_and_at_it_read():
    from semhitok.common.io import MAX_JSON_DEPTH, loads_json

    assert loads_json("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH, "x") is not None
    with pytest.raises(ValueError, match="x: JSON nested deeper"):
        loads_json("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1), "x")


@pytest.mark.parametrize("case", ["pretokenize_output_dir", "pretokenize_under_a_file", "run_dir_file", "encode_out_dir",
                                  "json_dir", "encode_fifo_input", "decode_out_file", "reconstruct_out_file",
                                  "decode_fifo_ids"])
def test_output_and_input_paths_of_the_wrong_kind_are_one_line_before_any_work(case, tmp_path, capsys, alarm):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    folder = tmp_path / "folder"
    folder.mkdir()
    img = tmp_path / "img.png"
    img.write_bytes(b"")
    model = str(tmp_path / "missing-model")  # never reached
    if case == "pretokenize_output_dir":
        line = cli_error(["pretokenize", "--config", "tiny", f"pretokenize.output_dir={a_file}"], capsys)
        assert "pretokenize.output_dir" in line and str(a_file) in line
    elif case == "pretokenize_under_a_file":
        line = cli_error(["pretokenize", "--config", "tiny", f"pretokenize.output_dir={a_file}/pretok"], capsys)
        assert str(a_file) in line and "is a file" in line
    elif case == "run_dir_file":
        from semhitok.common.run_dir import record_run
        with pytest.raises(ValueError) as err:
            record_run(a_file, {"x": 1}, "sample")
        assert str(a_file) in one_line(err.value)
    elif case == "encode_out_dir":  # wrote <dir>.npz and reported <dir> before
        line = cli_error(["tokenizer", "encode", "--model", model, str(img), "--out", str(folder)], capsys)
        assert "--out" in line and str(folder) in line
        assert not Path(f"{folder}.npz").exists() and not list(folder.iterdir())
    elif case == "json_dir":  # failed after the whole evaluation before
        line = cli_error(["tokenizer", "eval", "--model", model, str(img), "--json", str(folder)], capsys)
        assert "--json" in line and str(folder) in line
    elif case in ("decode_out_file", "reconstruct_out_file"):  # FileExistsError / NotADirectoryError tracebacks before
        ids = tmp_path / "ids.npz"
        np.savez(ids, ids=np.zeros((1, 8, 8), np.int32))
        for out in (a_file, a_file / "sub"):
            argv = (["tokenizer", "decode", "--model", model, "--ids", str(ids)] if case == "decode_out_file"
                    else ["tokenizer", "reconstruct", "--model", model, str(img)])
            line = cli_error([*argv, "--out", str(out)], capsys)
            assert line.startswith(f"semhitok: error: --out {out}: ") and "is a file, not a folder" in line
    elif case == "decode_fifo_ids":  # blocked forever in np.load before
        fifo = tmp_path / "ids.npz"
        os.mkfifo(fifo)
        line = cli_error(["tokenizer", "decode", "--model", model, "--ids", str(fifo), "--out", str(folder)], capsys)
        assert str(fifo) in line and "not a regular file" in line
    else:
        fifo = tmp_path / "pipe.png"
        os.mkfifo(fifo)
        line = cli_error(["tokenizer", "encode", "--model", model, str(fifo), "--out", str(tmp_path / "o.npz")], capsys)
        assert str(fifo) in line and "regular file" in line
    assert a_file.read_text() == "keep me" and not (tmp_path / "o.npz").exists()


@pytest.fixture
def alarm():
    """A test that would block forever (a FIFO opened for reading) fails after 20 s instead."""
    def hung(*_):
        raise TimeoutError("blocked on a FIFO")
    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def test_a_jsonl_row_naming_a_fifo_is_skipped_not_read(tmp_path, alarm, caplog):
    from semhitok.tokenizer import list_images, load_rgb

    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "rows.jsonl").write_text(json.dumps({"image": "pipe.png"}) + "\n" + json.dumps({"image": "gone.png"}) + "\n")
    assert [p.name for p in list_images([tmp_path / "rows.jsonl"])] == ["gone.png"]  # (a missing one is named when read)
    assert f"{tmp_path / 'rows.jsonl'}:1" in caplog.text and "not a regular file" in caplog.text
    assert load_rgb(tmp_path / "pipe.png") is None  # and read directly, refused without opening it


def test_an_empty_gfid_captions_turns_gfid_off():
    from semhitok.eval.summary import runnable

    cfg = load_project_config("tiny", ["eval.gfid_captions="])
    summary: dict = {}
    assert "gfid" not in runnable(cfg.eval, summary) and "gfid" not in summary


def pope_row(**change) -> str:
    row = {"question_id": 1, "image": "img.png", "text": "Is there a cat?", "label": "yes", "category": "adversarial"}
    row.update(change)
    return json.dumps(row)


@pytest.mark.parametrize("line, says", [
    (pope_row(label="maybe"), "label"),  # scored as 'no' silently before
    (pope_row(label=""), "label"),
    (pope_row(label=1), "label"),  # AttributeError before
    (pope_row(label=None), "label"),
    (pope_row(text=7), "text"),
    (json.dumps([pope_row()]), "not a POPE row"),  # a row that is a list: AttributeError before
    ('"yes"', "not a POPE row"),
    (pope_row(image=3), "not a POPE row"),
    ('{"question_id": 1', "not valid JSON"),
])
def test_pope_rows_that_are_not_yes_no_questions_are_one_line_naming_the_row(line, says, tmp_path):
    from semhitok.eval.pope import load_pope

    (tmp_path / "img.png").write_bytes(b"")
    (tmp_path / "pope.jsonl").write_text(pope_row(label="No ") + "\n" + line + "\n")
    with pytest.raises(ValueError) as err:
        load_pope(tmp_path / "pope.jsonl", tmp_path)
    text = one_line(err.value)
    assert text.startswith(f"{tmp_path / 'pope.jsonl'}:2") and says in text, text


def test_pope_labels_are_normalised_and_checked_at_scoring_too():
    from semhitok.eval.pope import load_pope, pope_metrics

    with pytest.raises(ValueError, match=r"label 1: must be \"yes\" or \"no\", got 'maybe'"):
        pope_metrics(["yes", "no"], ["yes", "maybe"])
    assert pope_metrics(["Yes.", "no"], [" YES", "No"])["accuracy"] == 1.0
    assert load_pope  # (load_pope stores "yes"/"no": tested above through its errors)
