"""Resume never runs code from a checkpoint: a pickled payload planted in a real checkpoint's state (DeepSpeed's
model or optimizer states, the RNG state, the plain engine's; the tokenizer trainer's: tests/tokenizer), with a completion marker rewritten to
match, is refused with one line naming the file, and the payload does not run. A clean checkpoint still resumes
exactly (the DeepSpeed one: tests/mllm/test_train_hardening.py; the plain engine's: here)."""

import json
import shutil

import pytest
import torch
import torch.nn as nn

from semhitok.common.io import MANIFEST, write_manifest
from semhitok.common.safe_load import UnsafeCheckpoint, load_state
from semhitok.mllm.plain_engine import PlainEngine
from tests.conftest import MLLM_RUN, Payload, run_train


def plant(path, marker):
    """Add a Payload to the torch state at `path`, then re-mark its directory complete (a forger can too)."""
    state = torch.load(path, weights_only=False)  # (our own file, written by the run above)
    state["note"] = Payload(marker)
    torch.save(state, path)
    meta = json.loads((path.parent / MANIFEST).read_text())
    meta.pop("files")
    write_manifest(path.parent, meta)




def from_step_20(trained_mllm_run, run_dir):
    """run_dir holding only trained_mllm_run's step-20 checkpoint (and its text tokenizer), as if killed after it"""
    src = trained_mllm_run / "mllm"
    shutil.copytree(src / "checkpoints" / "step00000020", run_dir / "mllm" / "checkpoints" / "step00000020")
    shutil.copytree(src / "text_tokenizer", run_dir / "mllm" / "text_tokenizer")
    return run_dir / "mllm" / "checkpoints" / "step00000020"


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                    "rng_rank0.pt"])
def test_a_planted_payload_in_a_deepspeed_checkpoint_is_refused_without_running(trained_mllm_run, trained_tokenizer,
                                                                                 pretokenized_sample, tmp_path, victim):
    marker = tmp_path / "payload_ran"
    ckpt = from_step_20(trained_mllm_run, tmp_path)
    plant(ckpt / victim, marker)
    proc = run_train(tmp_path, trained_tokenizer, pretokenized_sample, *MLLM_RUN, check=False)
    assert not marker.exists(), "the payload ran"
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith(f"semhitok: error: {ckpt / victim}: refused to load: it needs posix.system, "
                                                     "and a training state may hold only tensors, containers and "), errors
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "mllm" / "final").exists()


# A clean DeepSpeed checkpoint still resumes exactly (step 21 bit for bit): tests/mllm/test_train_hardening.py's
# resume past a damaged newest checkpoint, which restarts from trained_mllm_run's step-20 checkpoint.


def tiny_plain_engine():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    return PlainEngine(model, optimizer, scheduler, 1, 1.0, False, torch.device("cpu"))


def test_the_plain_engine_refuses_a_planted_payload_and_reloads_a_clean_state(tmp_path):
    engine = tiny_plain_engine()
    engine.module(torch.randn(2, 4)).sum().backward()
    engine.step()
    engine.save_checkpoint(str(tmp_path), "step1", {"step": 1})
    again = tiny_plain_engine()
    assert again.load_checkpoint(str(tmp_path), "step1") == (str(tmp_path / "step1"), {"step": 1})
    assert again.optimizer.state_dict()["state"][0]["exp_avg"].equal(engine.optimizer.state_dict()["state"][0]["exp_avg"])
    assert again.scheduler.get_last_lr() == engine.scheduler.get_last_lr()

    marker = tmp_path / "payload_ran"
    state = tmp_path / "step1" / "plain_state.pt"
    saved = torch.load(state, weights_only=True)
    torch.save({**saved, "note": Payload(marker)}, state)
    with pytest.raises(UnsafeCheckpoint, match=rf"^{state}: refused to load: it needs posix.system, .*tensors, containers and nothing else"):
        tiny_plain_engine().load_checkpoint(str(tmp_path), "step1")
    assert not marker.exists()


def test_load_state_names_the_file_for_garbage_and_refuses_every_kind_of_code(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x80\x04not a torch file")
    with pytest.raises(ValueError, match=rf"^{garbage}: not a readable training state") as err:
        load_state(garbage)
    assert not isinstance(err.value, UnsafeCheckpoint)  # damage, not a hostile file: trainers may fall back
    marker = tmp_path / "ran"
    for payload in (Payload(marker), {"nested": [Payload(marker)]}, nn.Linear(1, 1)):
        torch.save({"x": torch.zeros(1), "p": payload}, tmp_path / "p.pt")
        with pytest.raises(UnsafeCheckpoint, match=r"refused to load: it needs (posix.system|torch.nn.modules.linear.Linear)"):
            load_state(tmp_path / "p.pt")
    assert not marker.exists()
