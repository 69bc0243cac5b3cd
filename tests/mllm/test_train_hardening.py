"""MLLM training: a damaged newest checkpoint (even with an empty DeepSpeed `latest`) falls back to the newest
intact one; the loader refuses a max_length that holds no document of a task."""

import json
import re
import shutil

import pytest

from semhitok.common.io import MANIFEST, write_manifest
from semhitok.data_pipelines.config import MixtureComponent, SequenceConfig
from semhitok.data_pipelines.loader import PackedLoader
from semhitok.data_pipelines.text_tokenizer import TokenLayout
from semhitok.mllm.model import SemHiTokLM
from semhitok.mllm.train import newest_intact_checkpoint
from tests.conftest import MLLM_RUN, PLAIN_RUN, run_train


def test_newest_intact_checkpoint_skips_unmarked_and_damaged_ones(tmp_path):
    for step in (10, 20, 30):
        d = tmp_path / f"step{step:08d}"
        d.mkdir()
        (d / "state.pt").write_bytes(b"s" * 100)
        if step != 30:  # step 30: killed before its marker
            write_manifest(d, {"step": step, "world_size": 1})
    (tmp_path / "step00000020" / "state.pt").write_bytes(b"s" * 10)  # truncated after the save
    (tmp_path / "latest").write_text("")  # what a kill during DeepSpeed's rewrite leaves
    chosen, skipped = newest_intact_checkpoint(tmp_path)
    assert chosen == tmp_path / "step00000010"
    assert [s.split(":")[0] for s in skipped] == ["step00000030", "step00000020"]
    assert newest_intact_checkpoint(tmp_path / "none") == (None, [])


@pytest.mark.slow
def test_resume_skips_a_damaged_newest_checkpoint_and_continues_exactly(trained_mllm_run, trained_tokenizer,
                                                                        pretokenized_sample, tmp_path):
    """Checkpoints at 20 and 40, the one at 40 truncated and `latest` empty: the job resumes at 20 and reproduces
    steps 21-40 (step 21, the first after the restart, bit for bit); metrics.jsonl ends with one row per step.
    Also the suite's test of a plain DeepSpeed resume (tests/mllm/test_resume_safety.py's clean checkpoint too):
    the same restart through the same safe loader, one 20-step run instead of three."""
    src, dst = trained_mllm_run / "mllm", tmp_path / "mllm"
    shutil.copytree(src / "checkpoints", dst / "checkpoints")
    shutil.copytree(src / "text_tokenizer", dst / "text_tokenizer")
    shutil.copy(src / "metrics.jsonl", dst / "metrics.jsonl")  # rows 1-40, as if killed after step 40's log
    (dst / "checkpoints" / "latest").write_text("")
    newest = dst / "checkpoints" / "step00000040"
    victim = max((p for p in newest.iterdir() if p.name != MANIFEST), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    proc = run_train(tmp_path, trained_tokenizer, pretokenized_sample, *MLLM_RUN)
    assert "skipped damaged checkpoint(s): step00000040" in proc.stderr
    assert "step00000020 (step 20)" in proc.stderr
    count = float(re.search(r"\(([\d.]+)M parameters", proc.stderr).group(1))
    assert count > 0.5  # under ZeRO-3 too (parameters are partitioned: numel() is 0 there)
    want = [json.loads(line) for line in open(src / "metrics.jsonl")]
    got = [json.loads(line) for line in open(dst / "metrics.jsonl")]
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, 41))
    assert got[20]["loss"] == want[20]["loss"]  # bit for bit
    for a, b in zip(want[20:], got[20:]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6), a["step"]


@pytest.mark.parametrize("mixture", [
    [MixtureComponent("coco_captions", "generation", 1.0)],  # hung before, printing a warning per document
    None,  # the default mixture: trained on text only before, silently
])
def test_a_max_length_no_image_document_fits_is_refused(text_tokenizer, pretokenized_sample, mixture):
    cfg = SequenceConfig(max_length=50, micro_batch_size=1, **({"mixture": mixture} if mixture else {}))
    with pytest.raises(ValueError, match=r"data.max_length=50 holds no (generation|understanding) document of .*set data.max_length >= \d+"):
        loader = PackedLoader(cfg, text_tokenizer, TokenLayout.from_tokenizer(text_tokenizer, 256 * 12), pretokenized_sample)
        for _ in range(2000):
            loader.next_batch()


@pytest.mark.slow
def test_plain_pytorch_training_without_deepspeed_resumes_exactly(plain_mllm_run, trained_tokenizer, pretokenized_sample,
                                                                   tmp_path):
    """mllm_train.deepspeed_config=none: the same loop on plain PyTorch; a restart from its step-2 checkpoint
    gives the uninterrupted run's losses at steps 3 and 4, and the export loads."""
    straight, resumed = plain_mllm_run / "mllm", tmp_path / "resumed" / "mllm"
    assert (straight / "checkpoints" / "step00000004" / "plain_state.pt").is_file()
    assert not list((straight / "checkpoints").rglob("*zero_pp*"))
    shutil.copytree(straight / "checkpoints" / "step00000002", resumed / "checkpoints" / "step00000002")
    shutil.copytree(straight / "text_tokenizer", resumed / "text_tokenizer")
    run_train(tmp_path / "resumed", trained_tokenizer, pretokenized_sample, *PLAIN_RUN)
    want = {r["step"]: r["loss"] for r in map(json.loads, open(straight / "metrics.jsonl"))}
    got = {r["step"]: r["loss"] for r in map(json.loads, open(resumed / "metrics.jsonl"))}
    assert sorted(want) == [1, 2, 3, 4] and sorted(got) == [3, 4]
    for step in (3, 4):
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), step
    SemHiTokLM.from_pretrained(straight / "final")
