"""The built wheel in a fresh virtual environment, run from an empty directory elsewhere: presets, DeepSpeed
JSONs and the shipped sample come from the package; a `tiny/` folder in the cwd does not hide the preset;
every run directory records its config; the README's tested block runs as written (short schedules)."""

import json
import os
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

SHORT = ["tokenizer_train.max_steps=2", "tokenizer_train.disc_start=1", "tokenizer_train.holdout_images=2",
         "tokenizer_train.batch_size=4", "mllm_train.max_steps=2", "mllm_train.ckpt_every=1000", "mllm_train.warmup_steps=1",
         "eval.geneval_limit=1", "eval.geneval_samples=1", "eval.batch_size=4"]


def readme_commands(venv: Path) -> list[list[str]]:
    """The README's tested block (after `<!-- readme-test: ... -->`), one command per line, run with the
    venv's `semhitok`; training jobs get the short schedules appended."""
    text = (REPO / "README.md").read_text()
    block = text[text.index("<!-- readme-test:"):].split("```bash\n", 1)[1].split("```", 1)[0]
    commands = []
    for line in block.splitlines():
        argv = shlex.split(line, comments=True)
        if not argv:
            continue
        assert argv[0] == "semhitok", line
        argv[0] = str(venv / "bin" / "semhitok")
        if argv[1] in ("pipeline", "train", "pretokenize") or argv[1:3] == ["tokenizer", "train"]:
            argv += SHORT
        commands.append(argv)
    return commands


def run(cmd, cwd, env, timeout=600) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} -> {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> Path:
    """semhitok's wheel, built from the checkout's files, installed (--no-deps) into a new venv whose other
    packages come from this interpreter's environment (a .pth line, as tests' venvs do)."""
    root = tmp_path_factory.mktemp("wheel")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()
    src = root / "src"
    for name in files:  # build from a copy: the build writes build/ and *.egg-info beside its sources
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes((REPO / name).read_bytes())
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(root / "dist"), str(src)], root, env)
    (wheel,) = (root / "dist").glob("semhitok-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"semhitok/configs/tiny.yaml", "semhitok/configs/deepspeed/zero3.json", "semhitok/data/sample/train.jsonl"} <= set(names)
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    shipped = {str(p.relative_to(REPO / "configs")) for p in (REPO / "configs").rglob("*") if p.suffix in (".yaml", ".json")}
    assert {f"semhitok/configs/{p}" for p in shipped} <= set(names)  # every preset, subfolders included
    data = {f"semhitok/{n}" for n in files if n.startswith("data/") and "/" in n[5:]}  # data/*/...: the shipped data
    assert data - set(names) == set()  # its licences (data/eval/LICENSE_POPE, ...) and attributions included
    venv = root / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], root, env)
    site = next((venv / "lib").glob("python3*/site-packages"))
    import torch

    deps = Path(torch.__file__).resolve().parents[1]  # the site-packages holding torch, transformers, deepspeed
    (site / "_deps.pth").write_text(f"{deps}\n")
    run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q", "--no-deps", str(wheel)], root, env)
    return venv


def venv_env(venv: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return dict(env, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="2",
                PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")


@pytest.mark.slow
def test_wheel_runs_the_tiny_pipeline_from_an_empty_directory(wheel_venv, tmp_path):
    cwd = tmp_path / "elsewhere"
    (cwd / "tiny").mkdir(parents=True)  # must not hide the preset
    env = venv_env(wheel_venv)
    python = str(wheel_venv / "bin" / "python")
    where = run([python, "-c", "import semhitok; print(semhitok.__file__); print(semhitok.CONFIG_DIR)"], cwd, env).split()
    assert where[0].startswith(str(wheel_venv)) and where[1].startswith(str(wheel_venv))  # the wheel, not the checkout

    outputs = [run(cmd, cwd, env, timeout=900) for cmd in readme_commands(wheel_venv)]
    assert outputs[0].startswith("semhitok ")
    resolved = yaml.safe_load(outputs[1].split("\n", 1)[1])
    assert resolved["mllm_train"]["max_steps"] == 3
    assert Path(resolved["mllm_train"]["deepspeed_config"]).is_file()
    assert all(Path(p).is_file() and str(p).startswith(str(wheel_venv)) for p in resolved["tokenizer_train"]["train_data"])
    out = outputs[2]
    runs = cwd / "runs" / "tiny"
    assert (runs / "mllm" / "final" / "semhitok_mllm.json").is_file() and (runs / "samples" / "grid.png").is_file()
    assert (runs / "mllm" / "eval" / "summary.json").is_file() and "chat with the model: semhitok chat --model runs/tiny/mllm/final" in out
    for job in ("", "tokenizer", "pretokenized", "mllm", "samples"):  # by the pipeline (its eval: mllm/eval, rewritten below)
        info = json.loads((runs / job / "run.json").read_text())
        assert info["overrides"] == SHORT and info["preset"] == "tiny" and info["revision"].startswith("semhitok ")
        assert yaml.safe_load((runs / job / "config.yaml").read_text())["mllm_train"]["max_steps"] == 2
    assert len(list((cwd / "samples" / "images").glob("*.png"))) == 2 and (cwd / "samples" / "run.json").is_file()
    recorded = json.loads((runs / "mllm" / "eval" / "run.json").read_text())
    assert recorded["preset"] == str((runs / "mllm" / "config.yaml").resolve())  # eval used the run's config
