"""launch_scripts/ (shellcheck, SLURM wiring in dry runs, one real local run) and docker/ (lint, in step with pyproject)."""

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from semhitok.data_pipelines.pretokenize import job_split
from tests.conftest import REPO, SAMPLE, stub_python_env

SCRIPTS = sorted((REPO / "launch_scripts").glob("*.sbatch")) + [REPO / "launch_scripts" / name for name in
                                                                  ("common.sh", "submit.sh", "site.example.sh")] + [
    REPO / "eval" / "run_lmms.sh", REPO / "benchmarks" / "run_gpu.sh"]


def sbatch(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    full_env.update(SEMHITOK_REPO=str(REPO), **env)
    return subprocess.run(["bash", f"launch_scripts/{script}", *args], cwd=REPO, env=full_env, capture_output=True, text=True, timeout=600)


def test_shell_scripts_are_shellcheck_clean():
    proc = subprocess.run(["shellcheck", "-x", *map(str, SCRIPTS)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_multi_node_training_wires_ranks_from_slurm(tmp_path):
    proc = sbatch("mllm_train.sbatch", "256", "/tmp/run", "mllm_train.lr=1e-5", DRY_RUN="1", SLURM_JOB_ID="4242",
                  SLURM_JOB_NUM_NODES="3", SLURM_GPUS_ON_NODE="8", SLURM_JOB_NODELIST="gpu[07-09]", **stub_python_env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "world_size=24 nodes=3 gpus_per_node=8 master=gpu07:" in proc.stdout
    nodes = re.findall(r"\+ node (\d) \(ranks (\d+)-(\d+)\): (.*)", proc.stdout)
    assert [(int(n), int(a), int(b)) for n, a, b, _ in nodes] == [(0, 0, 7), (1, 8, 15), (2, 16, 23)]
    port = re.search(r"master=gpu07:(\d+)", proc.stdout).group(1)
    for node, _, _, cmd in nodes:
        assert cmd == (f"torchrun --nnodes 3 --nproc_per_node 8 --master_addr gpu07 --master_port {port} --node_rank {node} "
                       "-m semhitok.cli train --config 256 run_dir=/tmp/run mllm_train.lr=1e-5")


def test_pretokenize_array_tasks_split_the_work(monkeypatch, tmp_path):
    proc = sbatch("pretokenize.sbatch", "256", "/tmp/run", DRY_RUN="1", SLURM_ARRAY_TASK_ID="5", SLURM_ARRAY_TASK_MIN="2",
                  SLURM_ARRAY_TASK_COUNT="8", SLURM_CPUS_PER_TASK="12", **stub_python_env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "+ python -m semhitok.cli pretokenize --config 256 run_dir=/tmp/run pretokenize.num_workers=12" in proc.stdout
    for var, value in dict(SLURM_ARRAY_TASK_ID="5", SLURM_ARRAY_TASK_MIN="2", SLURM_ARRAY_TASK_COUNT="8").items():
        monkeypatch.setenv(var, value)
    assert job_split() == (8, 3)  # what the launched command computes from that environment


@pytest.mark.parametrize("args, error", [
    (("265", "/tmp/run"), "semhitok: error: unknown config preset '265'"),
    (("256", "/tmp/run", "mllm_train.lrr=1e-5"), "semhitok: error: 256.mllm_train: unknown field(s) ['lrr']"),
])
def test_dry_run_stops_on_a_config_error_with_one_line(args, error):
    proc = sbatch("mllm_train.sbatch", *args, DRY_RUN="1")
    assert proc.returncode == 2 and proc.stderr.startswith(error) and proc.stderr.count("\n") == 1, proc.stderr
    assert "torchrun" not in proc.stdout


def submit(*args: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """launch_scripts/submit.sh with a stand-in sbatch on PATH that records its arguments in tmp_path/queued."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "queued"}\necho "Submitted batch job 4242"\n')
    (bin_dir / "sbatch").chmod(0o755)
    return sbatch("submit.sh", *args, PATH=f"{bin_dir}:{os.environ['PATH']}", **env)


def test_submit_checks_the_job_then_queues_it_with_resources_from_env_and_site_hook(tmp_path):
    site = tmp_path / "site.sh"
    site.write_text(': "${SEMHITOK_PARTITION:=from-site}"\n: "${SEMHITOK_ACCOUNT:=proj}"\nexport NCCL_SOCKET_IFNAME=ib0\n')
    proc = submit("mllm_train", "256", "/tmp/run", "mllm_train.lr=1e-5", tmp_path=tmp_path, SEMHITOK_SITE=str(site),
                  SEMHITOK_NODES="2", SEMHITOK_TIME="1-00:00:00", SEMHITOK_ACCOUNT="from-env", SEMHITOK_SBATCH_ARGS="--qos=high --exclusive")
    assert proc.returncode == 0, proc.stderr
    assert "config: 256 run_dir=/tmp/run mllm_train.lr=1e-5" in proc.stdout and f"site hook: {site}" in proc.stdout
    assert "world_size=16 nodes=2 gpus_per_node=8" in proc.stdout  # the dry run at the resources asked for
    script = REPO / "launch_scripts" / "mllm_train.sbatch"
    # nodes and time from the environment, GPUs and CPUs from the script's #SBATCH lines, partition from the site hook
    assert (tmp_path / "queued").read_text().split() == [
        "--nodes=2", "--gpus-per-node=8", "--cpus-per-task=64", "--time=1-00:00:00", "--partition=from-site", "--account=from-env",
        "--qos=high", "--exclusive", str(script), "256", "/tmp/run", "mllm_train.lr=1e-5"]
    assert proc.stdout.rstrip().endswith("Submitted batch job 4242")


@pytest.mark.parametrize("args, env, error", [
    (("mllm_train", "265", "/tmp/run"), {}, "semhitok: error: unknown config preset '265'"),
    (("tokenizer_train", "3", "256", "/tmp/run"), {}, "tokenizer_train.sbatch: STAGE is 1 or 2, not '3'"),
    (("mllm_train", "256"), {}, "usage: sbatch launch_scripts/mllm_train.sbatch"),
    (("mlm_train", "256", "/tmp/run"), {}, "submit.sh: no launch script 'mlm_train' (one of eval mllm_train pretokenize tokenizer_train)"),
    (("mllm_train", "256", "/tmp/run"), {"SEMHITOK_NODES": "two"}, "submit.sh: SEMHITOK_NODES must be a positive whole number, not 'two'"),
    (("mllm_train", "256", "/tmp/run"), {"SEMHITOK_TIME": "2h"}, "submit.sh: SEMHITOK_TIME must be a SLURM time limit"),
    (("mllm_train", "256", "/tmp/run"), {"SEMHITOK_VENV": "/nonexistent"}, "SEMHITOK_VENV=/nonexistent: no bin/activate there"),
])
def test_submit_queues_nothing_on_bad_input(tmp_path, args, env, error):
    proc = submit(*args, tmp_path=tmp_path, **env)
    assert proc.returncode == 2 and proc.stderr.startswith(error) and proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "queued").exists()


def test_missing_arguments_print_usage():
    proc = sbatch("tokenizer_train.sbatch", "1")
    assert proc.returncode == 2 and proc.stderr.startswith("usage: sbatch launch_scripts/tokenizer_train.sbatch")


@pytest.mark.slow
def test_tokenizer_script_really_runs_through_srun_and_torchrun(tmp_path):
    """Not a dry run: a stand-in srun (runs its command once as node 0) and the real torchrun, on CPU."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/sh\nwhile [ "${1#--}" != "$1" ]; do shift; done\nSLURM_NODEID=0 exec "$@"\n')
    (bin_dir / "srun").chmod(0o755)
    run_dir = tmp_path / "run"
    env = dict(PATH=f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}", SLURM_JOB_ID="77", SLURM_JOB_NAME="tok",
               GPUS_PER_NODE="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = sbatch("tokenizer_train.sbatch", "1", "tiny", str(run_dir), "tokenizer_train.max_steps=3",
                  f"tokenizer_train.train_data=[{SAMPLE / 'train.jsonl'}]", f"tokenizer_train.holdout_data=[{SAMPLE / 'holdout.jsonl'}]",
                  **env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (run_dir / "tokenizer" / "stage1" / "final" / "config.json").is_file()
    log = (run_dir / "logs" / "tok-77.log").read_text()
    assert "job 77 (tok)" in log and "world_size=1" in log


def test_dockerfile_is_lint_clean_and_installs_the_lock_before_the_source():
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    hadolint = Path(sys.executable).parent / "hadolint"
    proc = subprocess.run([str(hadolint), str(REPO / "docker" / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert re.search(r'ENTRYPOINT \["(\w+)"\]', dockerfile).group(1) in project["scripts"]
    steps = [dockerfile.index(step) for step in ("COPY constraints-gpu.txt ./", "pip install -r constraints-gpu.txt", "COPY . .",
                                                   "pip install --no-deps -e .")]
    assert steps == sorted(steps)  # dependencies, then the source: an edit to the source reuses the dependency layer
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", "runs", "wheelhouse"} <= set(ignored)


def lock_pins(path: Path) -> dict[str, str]:
    return {canonicalize_name(name): version for name, version in re.findall(r"^([A-Za-z0-9._-]+)==(\S+)", path.read_text(), re.M)}


def pinned_in_step(lock: Path, extras: list[str], py: str) -> dict[str, str]:
    """lock's pins, after checking that each requirement of pyproject (base + extras) for Python py has one that
    satisfies it"""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert set(extras) <= set(project["optional-dependencies"])
    pins = lock_pins(lock)
    requirements = project["dependencies"] + [r for extra in extras for r in project["optional-dependencies"][extra]]
    for line in map(Requirement, requirements):
        if line.marker is None or line.marker.evaluate({"python_version": py, "python_full_version": f"{py}.0"}):
            name = canonicalize_name(line.name)
            assert name in pins and line.specifier.contains(pins[name], prereleases=True), \
                f"{line} -> {pins.get(name)}: pyproject changed, run `make {lock.stem.replace('constraints', 'lock')}`"
    return pins


def test_gpu_lock_is_in_step_with_pyproject_and_the_base_image():
    """constraints-gpu.txt pins a version of every requirement of pyproject (base + the extras it was made with) that
    satisfies it, and torch at the Dockerfile's base image's, so pip keeps the base's CUDA build."""
    lock = REPO / "constraints-gpu.txt"
    made_with = re.search(r"^#\s+make lock-gpu PY=([\d.]+) PLATFORM=(\S+) EXTRAS=(\S+)$", lock.read_text(), re.M)
    py, _, extras = made_with.groups()
    assert "gpu" in extras.split(",")
    pins = pinned_in_step(lock, extras.split(","), py)
    base = re.search(r"^FROM pytorch/pytorch:([\d.]+)-", (REPO / "docker" / "Dockerfile").read_text(), re.M).group(1)
    assert pins["torch"] == base


def test_cpu_lock_is_in_step_with_pyproject_and_the_makefile():
    """constraints-cpu.txt (make install's set, `make lock-cpu`) pins every requirement of pyproject's base, dev and
    eval for Python 3.11, torch at the Makefile's CPU_TORCH and megatron-core at 0.16.1 (the tests are written
    against it)."""
    lock = REPO / "constraints-cpu.txt"
    assert re.search(r"^#\s+make lock-cpu$", lock.read_text(), re.M)
    pins = pinned_in_step(lock, ["dev", "eval"], "3.11")
    cpu_torch = re.search(r"^CPU_TORCH \?= (\S+)$", (REPO / "Makefile").read_text(), re.M).group(1)
    assert pins["torch"] == cpu_torch and pins["megatron-core"] == "0.16.1"
    install = make_dry("--always-make", "VENV=/nonexistent", "install")
    assert any("uv pip install" in line and "-c constraints-cpu.txt" in line for line in install)


def make_dry(*args: str) -> list[str]:
    proc = subprocess.run(["make", "-n", "--no-print-directory", *args], cwd=REPO, capture_output=True, text=True, check=True)
    return proc.stdout.replace("\\\n", " ").splitlines()


def test_wheelhouse_target_gathers_binaries_for_the_target_and_builds_the_sdists():
    """The pip commands of `make wheelhouse` (dry: the real run is in docker/README.md's recipe, gigabytes for the
    GPU set): every binary for the target's Python and platform at the lock's versions, the sdist-only packages
    built here, and the install line with no index."""
    lines = make_dry("wheelhouse", "PY=3.12", "PLATFORM=manylinux_2_28_x86_64", "OUT=/tmp/wh")
    (download,) = [line for line in lines if " download " in line]
    argv = download.split()
    assert argv[argv.index("--python-version") + 1] == "3.12" and "--only-binary=:all:" in argv and "--implementation" in argv
    platforms = [argv[i + 1] for i, a in enumerate(argv) if a == "--platform"]
    assert platforms[0] == "manylinux_2_28_x86_64" and platforms[-2:] == ["manylinux_2_17_x86_64", "manylinux2014_x86_64"]
    assert len(platforms) == 28 - 17 + 2  # every older manylinux_2_N too: pip takes the tag literally
    assert argv[argv.index("-c") + 1] == "constraints-gpu.txt" and argv[argv.index("--find-links") + 1] == "/tmp/wh"
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert argv[-1] == f'"/tmp/wh/semhitok-{version}-py3-none-any.whl[gpu,eval]"'
    wheels = [line.split() for line in lines if " wheel " in line]
    assert ["--no-deps", "-w", "/tmp/wh", "."] == wheels[0][-4:]  # semhitok's own wheel
    sdists = wheels[1][wheels[1].index("constraints-gpu.txt") + 1:]
    assert "deepspeed" in sdists and "--no-deps" in wheels[1]
    pins = lock_pins(REPO / "constraints-gpu.txt")
    assert all(canonicalize_name(name) in pins for name in sdists)  # no stale names
    assert lines[-1].endswith('pip install --no-index --find-links /tmp/wh \\"semhitok[gpu,eval]\\""')
    assert make_dry("wheelhouse", "PLATFORM=manylinux2014_x86_64")[-2].count("--platform manylinux2014_x86_64 ") == 1


def test_lock_target_resolves_for_the_image():
    (compile_line,) = [line for line in make_dry("lock-gpu", "PY=3.12", "PLATFORM=manylinux_2_28_aarch64") if "pip compile" in line]
    base = re.search(r"^FROM pytorch/pytorch:([\d.]+)-", (REPO / "docker" / "Dockerfile").read_text(), re.M).group(1)
    assert compile_line.startswith(f'echo "torch=={base}" | uv pip compile')
    assert "--extra gpu --extra eval" in compile_line and "--python-version 3.12 --python-platform aarch64-manylinux_2_28" in compile_line


def test_uv_gets_pips_configuration():
    """tools/uv_env.py (make install): pip's find-links, indexes, constraints and certificate as uv's variables, the
    environment's value over the files', lists in uv's separators; other settings left out."""
    listing = ("global.find-links='/opt/wheels /more'\n:env:.find-links='/env/wheels'\nglobal.constraint='/etc/c.txt'\n"
               "global.extra-index-url='file:///a/simple file:///b/simple'\n:env:.default-timeout='180'\n")
    import importlib.util

    spec = importlib.util.spec_from_file_location("uv_env", REPO / "tools" / "uv_env.py")
    uv_env = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(uv_env)
    assert uv_env.pip_settings(listing) == {"find-links": "/env/wheels", "constraint": "/etc/c.txt",
                                 "extra-index-url": "file:///a/simple file:///b/simple"}
    env = dict(os.environ, PIP_FIND_LINKS="/w1 /w2", PIP_CONFIG_FILE=os.devnull)
    lines = subprocess.run([sys.executable, "tools/uv_env.py"], cwd=REPO, env=env, capture_output=True, text=True,
                           check=True).stdout.splitlines()
    assert "export UV_INDEX_STRATEGY=unsafe-best-match" in lines and "export UV_FIND_LINKS=/w1,/w2" in lines
