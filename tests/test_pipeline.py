"""`semhitok pipeline` (what `make demo` runs) end to end on the shipped sample, with short schedules: the suite's one
run (fixture `tiny_pipeline`, a child process as a user runs it), then the same command again through `semhitok
compare` (fixture `compared`), which must skip what is finished. tests/eval/test_compare.py measures the same run."""

import json
import re

import pytest


@pytest.mark.slow
def test_pipeline_runs_every_stage_and_skips_finished_ones_when_rerun(compared):
    run = compared / "semhitok"
    for produced in ("tokenizer_eval.json", "reconstructions/grid.png", "pretokenized/manifest.json",
                     "mllm/final/semhitok_mllm.json", "samples/grid.png", "mllm/eval/summary.md"):
        assert (run / produced).is_file(), produced
    assert json.loads((run / "mllm" / "eval" / "summary.json").read_text())["tokenizer"]["images"] == 12
    first, again = re.split(r"^\$ ", (run / "pipeline.log").read_text(), flags=re.MULTILINE)[1:]  # one "$ cmd" per run
    assert first.split("\n", 1)[0] == again.split("\n", 1)[0]  # the same command line
    assert "already finished" not in first and "mllm training ->" in first
    assert "stage 1 already finished" in again and "mllm already trained" in again
    assert json.loads((compared / "compare.json").read_text())["kinds"]["semhitok"]["errors"] == []  # the rerun exited 0
