import logging
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
# Before torch loads OpenMP: idle compute threads sleep instead of spinning. Beside a second xdist worker the
# two-thread learning test (tests/test_learning.py) spun both cores: 562 s instead of about 200, user time +45%.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"

# `make test` runs two pytest-xdist workers on the 2-core box: one compute thread each; a lone pytest takes both.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


# The test files measured to take a minute or more (`make test`'s --durations, 2026-12-04), run first so that
# neither xdist worker is left with one of them at the end (longest first; Makefile: --no-loadscope-reorder).
SLOWEST_FIRST = ["test_learning.py", "eval/test_eval_harnesses.py", "mllm/test_megatron_train.py", "eval/test_compare.py",
                 "benchmarks/test_benchmarks_run.py", "mllm/test_train_hardening.py", "mllm/test_train.py",
                 "tokenizer/test_train.py", "mllm/test_sample.py", "test_wheel.py", "eval/test_lmms_pope_offline.py"]


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.relative_to(REPO / "tests").as_posix(), len(rank)))  # stable


def session_root(tmp_path_factory) -> Path:
    """This test session's temporary folder, the same for every xdist worker (each has its own popen-gw<i> in it)."""
    root = tmp_path_factory.getbasetemp()
    return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


def once(tmp_path_factory, name: str, action: Callable[[], None]) -> None:
    """action() once per test session, however many pytest-xdist workers ask (pytest-xdist's recipe for session
    fixtures): the first under a file lock in the workers' common temporary folder, the others wait for it. An
    action that raised is tried again by the next to ask."""
    from filelock import FileLock

    root = session_root(tmp_path_factory)
    with FileLock(str(root / f"{name}.lock")):
        if not (root / f"{name}.done").is_file():
            action()
            (root / f"{name}.done").touch()


def shared_dir(tmp_path_factory, name: str, build: Callable[[Path], object]) -> Path:
    """A folder that build(folder) fills once per test session, shared by the xdist workers: for session fixtures
    whose folder the tests only read (each builds in a minute or less, on one core)."""
    out = session_root(tmp_path_factory) / name

    def fresh() -> None:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        build(out)

    once(tmp_path_factory, name, fresh)
    return out


def tiny_config(run_dir: Path, *overrides: str):
    """The tiny preset writing under run_dir, quiet and quick; more overrides as key=value."""
    from semhitok.config import load_project_config

    base = [
        f"run_dir={run_dir}",
        f"tokenizer_train.train_data=[{SAMPLE / 'train.jsonl'}]",
        f"tokenizer_train.holdout_data=[{SAMPLE / 'holdout.jsonl'}]",
        "tokenizer_train.log_every=1",
        "tokenizer_train.eval_every=1000",
        "tokenizer_train.image_every=1000",
        "tokenizer_train.ckpt_every=1000",
        "tokenizer_train.holdout_images=4",
    ]
    return load_project_config("tiny", base + list(overrides))


@pytest.fixture(scope="session")
def trained_tokenizer(tmp_path_factory) -> Path:
    """A tiny tokenizer trained briefly through both stages on the shipped photos; its final directory."""
    from semhitok.tokenizer.semhitok.train import train_tokenizer

    def build(run_dir: Path) -> None:
        cfg = tiny_config(run_dir, "tokenizer_train.max_steps=15", "tokenizer_train.disc_start=10")
        for stage in (1, 2):
            cfg.tokenizer_train.stage = stage
            train_tokenizer(cfg.tokenizer, cfg.tokenizer_train, cfg.tokenizer_stage_dir(stage), cfg.tokenizer_stage_dir(1) / "final")

    return tiny_config(shared_dir(tmp_path_factory, "tok", build)).tokenizer_dir


@pytest.fixture(autouse=True)
def _quiet_semhitok_logs(caplog):
    caplog.set_level(logging.INFO, logger="semhitok")


@pytest.fixture(scope="session")
def pretokenized_sample(trained_tokenizer, tmp_path_factory) -> Path:
    """The shipped sample's caption, LLaVA and text sources pre-tokenized with the tiny tokenizer."""
    from semhitok.data_pipelines.config import PretokenizeConfig, SourceConfig
    from semhitok.data_pipelines.pretokenize import run_pretokenize

    cfg = PretokenizeConfig(sources=[SourceConfig("coco_captions", "caption_jsonl", str(SAMPLE / "train.jsonl")),
                                     SourceConfig("coco_llava", "llava_json", str(SAMPLE / "llava.json")),
                                     SourceConfig("coco_text", "text_jsonl", str(SAMPLE / "text.jsonl"))],
                            records_per_shard=16, batch_size=16, num_workers=0)
    return shared_dir(tmp_path_factory, "pretok", lambda out: run_pretokenize(cfg, trained_tokenizer, out))


@pytest.fixture(scope="session")
def text_tokenizer(tmp_path_factory):
    """The tiny byte-level BPE (Qwen2.5 specials and chat template) trained on the shipped sample's text."""
    from semhitok.data_pipelines.text_tokenizer import resolve_text_tokenizer

    return resolve_text_tokenizer("tiny", tmp_path_factory.mktemp("text_tok") / "tok", SAMPLE)


TINY_QWEN = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tiny_mllm(trained_tokenizer, text_tokenizer):
    """A randomly initialised tiny Qwen2 extended with the tiny tokenizer's visual vocabulary."""
    from semhitok.mllm.config import MLLMConfig
    from semhitok.mllm.model import SemHiTokLM
    from semhitok.tokenizer import SemHiTok

    torch.manual_seed(0)
    return SemHiTokLM.build(MLLMConfig(base_model="random", base_config=TINY_QWEN), SemHiTok.from_pretrained(trained_tokenizer),
                            text_tokenizer).eval()


@pytest.fixture(scope="session")
def tiny_mllm_dir(tiny_mllm, text_tokenizer, trained_tokenizer, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mllm") / "model"
    tiny_mllm.save_pretrained(out, text_tokenizer, trained_tokenizer)
    return out


class Payload:
    """Unpickled, it runs `touch <marker>` (what a planted checkpoint file would do with os.system): the resume-safety
    tests plant it and check the marker never appears."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def stub_python_env(tmp_path: Path) -> dict:
    """SEMHITOK_VENV for a launch script's dry run whose config check is not the point: a stand-in environment the
    scripts activate (launch_scripts/common.sh), whose python is a stub. tests/test_launch_and_docker.py runs the real
    check (`semhitok config`, a process of about 0.2 CPU-s)."""
    stub = tmp_path / "stub_env" / "bin"
    stub.mkdir(parents=True)
    (stub / "python").write_text("#!/bin/sh\nexit 0\n")
    (stub / "python").chmod(0o755)
    (stub / "activate").write_text(f'PATH="{stub}:$PATH"\nexport PATH\n')
    return {"SEMHITOK_VENV": str(stub.parent)}


_ZYGOTES: dict = {}


def child_env() -> dict:
    """The environment of the tests' `semhitok` runs: this one, offline, DeepSpeed on CPU, one compute thread, no
    torchrun variables (a run sets its own)"""
    env = dict(os.environ, **CHILD_ENV)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def run_semhitok(*argv: str, nproc: int = 1, timeout: float = 900) -> subprocess.CompletedProcess:
    """`semhitok ARGV` in a new process (forked from this worker's zygote) with child_env(), from the repository root;
    nproc > 1: on that many ranks, as `torchrun --nproc_per_node nproc -m semhitok.cli ARGV` starts them"""
    from semhitok.common.dist import free_port

    env = child_env()
    ranks = {"MASTER_PORT": str(free_port())} if nproc > 1 else {}
    return zygote(env).run(list(argv), {**env, **ranks}, REPO, timeout, nproc)


def zygote(env: dict):
    """This worker's fork server for runs with `env` (one per environment, PYTEST_CURRENT_TEST aside: what modules
    read at import time must be what a fresh process would read), started on first use, closed at exit."""
    import atexit

    from tests.zygote import Zygote

    env = {k: v for k, v in env.items() if k != "PYTEST_CURRENT_TEST"}
    key = tuple(sorted(env.items()))
    if key not in _ZYGOTES:
        _ZYGOTES[key] = server = Zygote(env, str(REPO))
        atexit.register(server.close)
    return _ZYGOTES[key]


def run_train(run_dir: Path, trained_tokenizer: Path, pretokenized_sample: Path, *overrides: str, nproc: int = 1,
              check: bool = True):
    """`semhitok train` on the tiny preset in new processes (DeepSpeed on CPU, gloo), like a user runs it (torchrun for
    nproc > 1): forked from this worker's zygote, the same command without the interpreter's start and imports."""
    args = ["--config", "tiny", f"run_dir={run_dir}", f"mllm_train.tokenizer={trained_tokenizer}",
            f"data.pretokenized={pretokenized_sample}", "mllm_train.log_every=1", *overrides]
    proc = run_semhitok("train", *args, nproc=nproc)  # new processes forked from a server that did the imports once
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


# trained_mllm_run's overrides, which its resumes repeat. Without activation checkpointing (a sixth less time): the
# ZeRO-3 runs of the tiny preset's default (every layer) are the two-process, DeepSpeed-JSON and LLaMA tests'.
MLLM_RUN = ("mllm_train.max_steps=40", "mllm_train.ckpt_every=20", "mllm_train.activation_checkpointing=0")


@pytest.fixture(scope="session")
def trained_mllm_run(trained_tokenizer, pretokenized_sample, tmp_path_factory) -> Path:
    """The tiny MLLM trained 40 steps on the shipped sequences (MLLM_RUN: checkpoints at 20 and 40); its run_dir."""
    return shared_dir(tmp_path_factory, "mllm_run", lambda run_dir: run_train(run_dir, trained_tokenizer, pretokenized_sample,
                                                                              *MLLM_RUN))


PLAIN_RUN = ("mllm_train.deepspeed_config=none", "mllm_train.max_steps=4", "mllm_train.ckpt_every=2", "mllm_train.eval_every=0")


@pytest.fixture(scope="session")
def plain_mllm_run(trained_tokenizer, pretokenized_sample, tmp_path_factory) -> Path:
    """`semhitok train` on plain PyTorch (PLAIN_RUN: 4 steps, checkpoints at 2 and 4), the tests only reading it: the
    plain engine's resume (tests/mllm/test_train_hardening.py) and the Megatron backend's reference losses
    (tests/mllm/test_megatron_train.py). Its run_dir."""
    return shared_dir(tmp_path_factory, "plain_mllm_run", lambda run_dir: run_train(
        run_dir, trained_tokenizer, pretokenized_sample, *PLAIN_RUN))


# `semhitok compare`'s budget on the tiny preset (tests/eval/test_compare.py), which the suite's one end-to-end
# pipeline run (tests/test_pipeline.py) shares: one tiny pipeline trained for both.
COMPARE_BUDGET = ["tokenizer_train.max_steps=3", "tokenizer_train.eval_every=1000", "tokenizer_train.image_every=1000",
                  "tokenizer_train.ckpt_every=1000", "mllm_train.max_steps=2", "mllm_train.eval_every=0", "eval.geneval_metadata=",
                  f"tokenizer_train.train_data=[{SAMPLE / 'train.jsonl'}]", f"tokenizer_train.holdout_data=[{SAMPLE / 'holdout.jsonl'}]"]
CHILD_ENV = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}


def compare(out: Path, *extra: str) -> int:
    """`semhitok compare --kinds semhitok` at COMPARE_BUDGET, in-process (each kind's pipeline is its child process)."""
    from semhitok.cli import main

    with pytest.MonkeyPatch.context() as mp:
        for key, value in CHILD_ENV.items():
            mp.setenv(key, value)
        return main(["compare", "--config", "tiny", "--out", str(out), "--kinds", "semhitok", "--figure-images", "4",
                     "--no-fid", f"run_dir={out}", *COMPARE_BUDGET, *extra])


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> Path:
    """The suite's end-to-end `semhitok pipeline` on the tiny preset, in a child process as a user runs it: at
    COMPARE_BUDGET in <out>/semhitok, with the command line compare gives it (eval/compare.py run_pipeline, its
    output appended to <out>/semhitok/pipeline.log), so `compared` finds it trained. Returns <out>."""
    from semhitok.eval.compare import KindFailed, kind_overrides, run_pipeline

    def build(out: Path) -> None:
        log = out / "semhitok" / "pipeline.log"
        with pytest.MonkeyPatch.context() as mp:
            for key, value in CHILD_ENV.items():
                mp.setenv(key, value)
            try:
                run_pipeline("tiny", kind_overrides("tiny", [f"run_dir={out}", *COMPARE_BUDGET], "semhitok", out), log)
            except KindFailed as err:
                pytest.fail(f"{err}\n{log.read_text()[-5000:]}")

    return shared_dir(tmp_path_factory, "compare", build)


@pytest.fixture(scope="session")
def compared(tiny_pipeline, tmp_path_factory) -> Path:
    """`semhitok compare --kinds semhitok` over tiny_pipeline's run: its pipeline, run again, skips the trained stages."""
    def run() -> None:
        assert compare(tiny_pipeline) == 0

    once(tmp_path_factory, "compared", run)
    return tiny_pipeline
