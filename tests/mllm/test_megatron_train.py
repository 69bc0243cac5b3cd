"""The Megatron backend's training step on CPU (gloo, fp32): tensor or pipeline parallelism over two processes gives
the losses and gradient norms of one process, and a checkpoint (megatron.core.dist_checkpointing) resumes to the
uninterrupted losses, also at another TP."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, child_env

WORKER = REPO / "tests" / "mllm" / "megatron_worker.py"


def run_jobs(*jobs: tuple[Path, list[str], int]) -> list[dict]:
    """Runs of the worker side by side, each (OUT.json, its arguments, processes): one launcher process forks every
    rank after importing once (megatron_worker.py --jobs); -> each run's OUT.json."""
    spec = json.dumps([{"argv": [str(out), *args], "nproc": nproc} for out, args, nproc in jobs])
    proc = subprocess.run([sys.executable, str(WORKER), "--jobs", spec], cwd=REPO, env=child_env(), capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return [json.loads(out.read_text()) for out, _, _ in jobs]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """TP=1 (one process), TP=2, PP=2 and DP=2 (two processes each), side by side: 4 steps, a checkpoint after step 2,
    the export; -> {"tp1": (result, checkpoint dir), "tp2": ..., "pp2": ..., "dp2": ...}"""
    layouts = {"tp1": (1, 1, 1), "tp2": (2, 1, 1), "pp2": (1, 2, 1), "dp2": (1, 1, 2)}
    dirs = {name: tmp_path_factory.mktemp(name) for name in layouts}
    runs = [(dirs[name] / "run.json", ["--tp", str(tp), "--pp", str(pp), "--steps", "4", "--save-at", "2", "--ckpt",
                                       str(dirs[name] / "ckpt"), "--export", str(dirs[name] / "export.safetensors")], tp * pp * dp)
            for name, (tp, pp, dp) in layouts.items()]
    return {name: (result, dirs[name] / "ckpt") for name, result in zip(layouts, run_jobs(*runs), strict=True)}


@pytest.fixture(scope="module")
def continued(trained, tmp_path_factory):
    """From the checkpoints, side by side: TP=1 resumed from its own, TP=1 resumed from TP=2's (weights, AdamW's moments
    and steps, scheduler: resharded on load), and TP=1 from the weights alone that PP=2 wrote, with a fresh optimizer."""
    tmp = tmp_path_factory.mktemp("continued")
    resumed, loaded, loaded_pp = run_jobs(
        (tmp / "resumed.json", ["--steps", "4", "--resume", "--ckpt", str(trained["tp1"][1])], 1),
        (tmp / "loaded_tp2.json", ["--steps", "4", "--resume-from", str(trained["tp2"][1] / "step00000002")], 1),
        (tmp / "loaded_pp2.json", ["--steps", "3", "--weights-from", str(trained["pp2"][1] / "step00000002")], 1))
    return {"resumed": resumed, "loaded": loaded, "loaded_pp": loaded_pp}


def test_tensor_parallel_2_gives_the_losses_of_one_process(trained):
    ref, got = trained["tp1"][0], trained["tp2"][0]
    assert got["tp"] == 2 and len(got["losses"]) == 4
    assert ref["losses"][0] > ref["losses"][-1]  # it learns
    assert got["losses"] == pytest.approx(ref["losses"], abs=2e-5)
    assert got["grad_norms"] == pytest.approx(ref["grad_norms"], rel=1e-4)


def test_pipeline_parallel_2_gives_the_losses_of_one_process(trained):
    """Two stages (one layer each, the tied table's copies on both) train as one process does: the same losses and
    gradient norms, and the export gathered over the stages equals TP=1's."""
    ref, got = trained["tp1"][0], trained["pp2"][0]
    assert (got["pp"], got["tp"], len(got["losses"])) == (2, 1, 4)
    assert got["losses"] == pytest.approx(ref["losses"], abs=2e-5)
    assert got["grad_norms"] == pytest.approx(ref["grad_norms"], rel=1e-4)
    assert got["eval_loss"] == pytest.approx(ref["eval_loss"], abs=2e-5)


def test_data_parallel_2_gives_the_losses_of_one_process(trained):
    """Each step's two micro-batches on two replicas (one each, gradients averaged over DP) train as one process
    accumulating both: the same losses, gradient norms and export."""
    ref, got = trained["tp1"][0], trained["dp2"][0]
    assert (got["dp"], got["tp"], got["pp"]) == (2, 1, 1)
    assert got["losses"] == pytest.approx(ref["losses"], abs=2e-5)
    assert got["grad_norms"] == pytest.approx(ref["grad_norms"], rel=1e-4)
    assert got["eval_loss"] == pytest.approx(ref["eval_loss"], abs=2e-5)


def test_resume_reproduces_the_uninterrupted_losses(trained, continued):
    ref, resumed = trained["tp1"][0], continued["resumed"]
    assert resumed["start"] == 2
    assert resumed["losses"] == pytest.approx(ref["losses"][2:], abs=1e-6)
    assert resumed["grad_norms"] == pytest.approx(ref["grad_norms"][2:], rel=1e-5)


def test_a_tensor_parallel_2_checkpoint_loads_at_tp1(trained, continued):
    """The weights a TP=2 job wrote give one process (TP=1) the loss of step 3; its AdamW moments and steps and its
    scheduler, resharded too, the loss and gradient norm of step 4 (a fresh optimizer's step 4 is 0.018 off)."""
    ref, loaded = trained["tp1"][0], continued["loaded"]
    assert loaded["start"] == 2 and loaded["losses"][0] == pytest.approx(ref["losses"][2], abs=2e-5)
    assert loaded["losses"] == pytest.approx(ref["losses"][2:], abs=2e-5)
    assert loaded["grad_norms"] == pytest.approx(ref["grad_norms"][2:], rel=1e-4)
    assert loaded["eval_loss"] == pytest.approx(ref["eval_loss"], abs=2e-5)


def test_checkpoints_are_dist_checkpointing_folders_one_shard_file_per_writing_rank(trained):
    """A tag holds megatron.core.dist_checkpointing's torch_dist format: metadata.json, the common part, .metadata and
    one .distcp file per rank that holds a main replica (TP ranks and stages each write; a DP replica does not)."""
    for name, files in {"tp1": 1, "tp2": 2, "pp2": 2, "dp2": 1}.items():
        folder = trained[name][1] / "step00000002" / "dist_checkpoint"
        assert json.loads((folder / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
        assert (folder / "common.pt").is_file() and (folder / ".metadata").is_file()
        assert sorted(p.name for p in folder.glob("*.distcp")) == [f"__{r}_0.distcp" for r in range(files)], name


def test_a_pipeline_parallel_2_checkpoint_loads_at_pp1(trained, continued):
    """The weights two pipeline stages wrote (a shard file each) give one process the loss of step 3 (load_weights)."""
    ref, loaded = trained["tp1"][0], continued["loaded_pp"]
    assert loaded["start"] == 2 and loaded["losses"][0] == pytest.approx(ref["losses"][2], abs=2e-5)


def test_trained_weights_export_back_to_semhitok_at_any_tp(trained):
    """Gathered over TP (and PP) and converted back, the trained weights load into SemHiTokLM, whose loss on a
    held-out batch is the Megatron model's; TP=2's, PP=2's and DP=2's exports equal TP=1's."""
    import torch
    from safetensors.torch import load_file

    from tests.mllm.megatron_common import TINY_QWEN2, packed_batch, tiny_semhitok

    one, two, staged, replicas = (load_file(str(trained[name][1].parent / "export.safetensors")) for name in ("tp1", "tp2", "pp2", "dp2"))
    assert one.keys() == two.keys() == staged.keys() == replicas.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(staged[k], one[k], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(replicas[k], one[k], rtol=1e-4, atol=1e-5)
    model = tiny_semhitok(TINY_QWEN2)
    before = model.lm.model.norm.weight.clone()
    result = model.load_state_dict(one, strict=False)
    assert set(result.missing_keys) <= {"lm.lm_head.weight"} and not result.unexpected_keys  # tied: the table
    assert not torch.equal(model.lm.model.norm.weight, before)  # trained weights arrived
    with torch.no_grad():
        loss = model(**packed_batch(model.layout, seed=999))["loss"]
    assert float(loss) == pytest.approx(trained["tp1"][0]["eval_loss"], abs=1e-5)
    assert float(loss) == pytest.approx(trained["tp2"][0]["eval_loss"], abs=2e-5)


def test_semhitok_train_on_megatron_matches_the_plain_engine_resumes_and_exports(plain_mllm_run, trained_tokenizer,
                                                                                 pretokenized_sample, tmp_path, monkeypatch):
    """`semhitok train` with mllm_train.backend=megatron on the tiny preset: the plain engine's losses (same model,
    same packed batches, fp32), also on two pipeline stages; a resume from the step-2 checkpoint reproduces steps 3-4,
    also when the two stages' checkpoint resumes in one process (another PP, the same data-parallel replicas), while
    another number of replicas is refused; the exports load, the two-stage one draws through `semhitok sample` and
    loads by transformers' remote code with SemHiTokLM's logits."""
    import shutil

    from semhitok.mllm.model import SemHiTokLM
    from tests.conftest import PLAIN_RUN, run_semhitok, run_train

    args = list(PLAIN_RUN)  # the plain engine's run (4 steps, checkpoints at 2 and 4), shared with its own resume test
    run_train(tmp_path / "megatron", trained_tokenizer, pretokenized_sample, *args, "mllm_train.backend=megatron")

    def losses(run):
        return [json.loads(line)["loss"] for line in (run / "mllm" / "metrics.jsonl").read_text().splitlines()]

    assert len(losses(tmp_path / "megatron")) == 4
    tag = tmp_path / "megatron" / "mllm" / "checkpoints" / "step00000002"
    assert (tag / "dist_checkpoint" / "metadata.json").is_file()  # MegatronEngine's, beside the trainer's per-rank files
    marked = json.loads((tag / "COMPLETE.json").read_text())["files"]  # the completion marker covers every file
    assert {"dist_checkpoint/.metadata", "dist_checkpoint/__0_0.distcp", "loader_rank0.json"} <= marked.keys()
    assert losses(tmp_path / "megatron") == pytest.approx(losses(plain_mllm_run), abs=1e-4)
    from semhitok.config import load_project_config
    from semhitok.mllm.train import check_resume

    with pytest.raises(ValueError, match=r"engine 'plain' -> 'megatron'"):  # another engine's checkpoints: one line
        check_resume(load_project_config("tiny", [f"run_dir={plain_mllm_run}", *args, "mllm_train.backend=megatron"]))
    monkeypatch.setenv("WORLD_SIZE", "2")  # two ranks at PP 1: two data-parallel replicas, refused before anything runs
    with pytest.raises(ValueError, match=r"data_parallel 1 -> 2"):
        check_resume(load_project_config("tiny", [f"run_dir={tmp_path / 'megatron'}", *args, "mllm_train.backend=megatron"]))
    check_resume(load_project_config("tiny", [f"run_dir={tmp_path / 'megatron'}", *args, "mllm_train.backend=megatron",
                                              "mllm_train.pipeline_parallel=2"]))  # two stages of one replica: accepted
    monkeypatch.delenv("WORLD_SIZE")
    run_train(tmp_path / "staged", trained_tokenizer, pretokenized_sample, *args, "mllm_train.backend=megatron",
              "mllm_train.pipeline_parallel=2", nproc=2)  # the tiny base's 4 layers, 2 per stage
    assert losses(tmp_path / "staged") == pytest.approx(losses(plain_mllm_run), abs=1e-4)
    staged = tmp_path / "staged" / "mllm" / "final"
    model = SemHiTokLM.from_pretrained(staged).eval()
    assert model.lm.config.num_hidden_layers == 4
    sampled = run_semhitok("sample", "--model", str(staged), "--prompt", "a red circle", "--out", str(tmp_path / "drawn"),
                           "--seed", "1", timeout=600)
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    assert len(list((tmp_path / "drawn" / "images").glob("*.png"))) == 1
    import torch
    from transformers import AutoModelForCausalLM

    remote = AutoModelForCausalLM.from_pretrained(staged, trust_remote_code=True).eval()  # the export's own code
    assert type(remote).__module__.startswith("transformers_modules")
    vocab = model.layout.vocab_size
    tokens = torch.cat([torch.arange(20), torch.arange(vocab - 20, vocab)])[None]  # text ids, then visual ones
    with torch.no_grad():
        torch.testing.assert_close(remote(input_ids=tokens).logits, model.logits(model.hidden_states(tokens).last_hidden_state),
                                   rtol=1e-5, atol=1e-5)
    shutil.copytree(tmp_path / "staged", tmp_path / "unstaged")  # the two stages' step 2, resumed in one process
    for gone in ("checkpoints/step00000004", "final"):
        shutil.rmtree(tmp_path / "unstaged" / "mllm" / gone)
    proc = run_train(tmp_path / "unstaged", trained_tokenizer, pretokenized_sample, *args, "mllm_train.backend=megatron")
    assert "resumed from" in proc.stderr + proc.stdout
    assert losses(tmp_path / "unstaged") == pytest.approx(losses(tmp_path / "staged"), abs=2e-5)
    shutil.copytree(tmp_path / "megatron", tmp_path / "resumed")
    for gone in ("checkpoints/step00000004", "final"):
        shutil.rmtree(tmp_path / "resumed" / "mllm" / gone)
    proc = run_train(tmp_path / "resumed", trained_tokenizer, pretokenized_sample, *args, "mllm_train.backend=megatron")
    assert "resumed from" in proc.stderr + proc.stdout
    assert losses(tmp_path / "resumed") == losses(tmp_path / "megatron")
    model = SemHiTokLM.from_pretrained(tmp_path / "megatron" / "mllm" / "final")
    assert model.layout.vocab_size == model.lm.lm_head.weight.shape[0]
