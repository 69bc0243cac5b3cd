"""lmms-eval's own `pope` task (its installed YAML and utils) scored offline on the shipped POPE questions."""

import json
import os
import subprocess
import sys

import pytest

from semhitok.eval.lmms_datasets import POPE_FEATURES, build_pope, task_dataset_path
from semhitok.eval.pope import load_pope, run_pope
from semhitok.mllm.sample import load_sampler
from tests.conftest import REPO

SHIPPED_POPE, SHIPPED_IMAGES = REPO / "data" / "eval" / "pope.jsonl", REPO / "data" / "sample"


def offline_env(tmp_path) -> dict:
    """No Hub, and an empty HF home: nothing cached from elsewhere can help."""
    env = dict(os.environ, PYTHON=sys.executable, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled",
               HF_HOME=str(tmp_path / "hf_home"))
    for key in ("HF_DATASETS_CACHE", "LMMS_EVAL_DATASETS_CACHE", "LMMS_DATA"):
        env.pop(key, None)
    return env


def test_the_shipped_pope_dataset_loads_by_its_hub_name_offline(tmp_path):
    entry = build_pope(tmp_path / "cache")
    assert entry.parts[-4] == "lmms-lab-encoder___pope" and task_dataset_path("pope") == "lmms-lab-encoder/POPE"
    code = ("import datasets, json; ds = datasets.load_dataset('lmms-lab-encoder/POPE', token=True, cache_dir=%r)['test'];"
            "print(json.dumps({'n': len(ds), 'features': sorted(ds.features), 'row': {k: v for k, v in ds[0].items() if k != 'image'},"
            "'size': ds[0]['image'].size}))" % str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-c", code], env=offline_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    first = load_pope(SHIPPED_POPE, SHIPPED_IMAGES)[0]
    assert got["n"] == 18 and got["features"] == sorted(POPE_FEATURES)
    assert got["row"] == {"question_id": first["question_id"], "question": first["question"], "answer": first["label"],
                          "image_source": "coco_000000542145", "category": "random"}
    assert min(got["size"]) == 384  # the shipped photo itself


@pytest.mark.slow
def test_run_lmms_sh_scores_lmms_evals_own_pope_task_offline(tiny_mllm_dir, tmp_path):
    out = tmp_path / "lmms"
    proc = subprocess.run(["bash", "eval/run_lmms.sh", str(tiny_mllm_dir), "pope", str(out)], cwd=REPO, env=offline_env(tmp_path),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "pope on the repository's shipped data" in proc.stderr
    results = json.loads(open(proc.stdout.strip().splitlines()[-1].removeprefix("results: ")).read())
    assert "pope" in results["results"] and results["configs"]["pope"]["dataset_path"] == "lmms-lab-encoder/POPE"
    samples = [json.loads(line) for f in out.rglob("*_pope.jsonl") for line in open(f)]
    assert len(samples) == 18
    # the task's own scoring (lower-cased exact match) over the replies our decoding loop gives to the same questions
    rows = load_pope(SHIPPED_POPE, SHIPPED_IMAGES)
    ours = [a["answer"] for a in run_pope(*load_sampler(tiny_mllm_dir, "cpu"), rows)["answers"]]
    for s in samples:  # the dataset keeps the shipped file's order
        reply = s["filtered_resps"] if isinstance(s["filtered_resps"], str) else s["filtered_resps"][0]
        assert reply == ours[s["doc_id"]] and s["target"] == rows[s["doc_id"]]["label"]
    accuracy = sum(a.lower().strip() == r["label"] for a, r in zip(ours, rows)) / len(rows)
    assert results["results"]["pope"]["pope_accuracy,none"] == pytest.approx(accuracy)


def test_run_lmms_sh_refuses_an_unknown_data_choice(tiny_mllm_dir, tmp_path):
    env = dict(offline_env(tmp_path), LMMS_DATA="elsewhere")
    proc = subprocess.run(["bash", "eval/run_lmms.sh", str(tiny_mllm_dir), "pope", str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "LMMS_DATA must be shipped or hub" in proc.stderr
