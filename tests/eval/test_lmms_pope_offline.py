"""lmms-eval's `pope` data (its installed YAML and utils) offline on the shipped POPE questions, scored by
semhitok's POPE parser (task semhitok_pope) exactly as `semhitok eval` scores the same answers."""

import json
import os
import subprocess
import sys

import pytest

from semhitok.eval.lmms_datasets import POPE_FEATURES, build_pope, task_dataset_path
from semhitok.eval.lmms_tasks import write_task
from semhitok.eval.pope import POST_PROMPT, load_pope, pope_metrics, run_pope
from semhitok.eval.summary import collect_lmms_results
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


# Answers of every kind a model gives: plain, with punctuation or capitals, a no-sentence, captions that say
# neither (unparsed), a yes after the first sentence (only the first counts)
SCRIPTED = ["Yes", "No", "yes.", "NO", "No, there is not.", "There is not a dog.", "Yes, there is one.", "A red circle.",
            "a photo of a kitchen", "", "Yes. No dog though.", "It is blue. Yes.", "no", "Yes", "yes", "Not at all", "Sure",
            "no."]

# lmms-eval's evaluator itself (task loading, its pope prompt, process_results, aggregation), with a model that
# gives SCRIPTED[doc_id]; printed: the prompts the model saw and the task's scores
EVALUATE = r"""
import json, sys
from lmms_eval.api.model import lmms
from lmms_eval.evaluator import simple_evaluate
from lmms_eval.tasks import TaskManager

answers, prompts = json.loads(sys.argv[2]), {}

class Scripted(lmms):
    def generate_until(self, requests):
        out = []
        for r in requests:
            prompts[r.args[3]] = r.args[0]
            out.append(answers[r.args[3]])
        return out
    def loglikelihood(self, requests): raise NotImplementedError
    def generate_until_multi_round(self, requests): raise NotImplementedError

result = simple_evaluate(model=Scripted(), tasks=["semhitok_pope"], task_manager=TaskManager(include_path=sys.argv[1]),
                         log_samples=False, bootstrap_iters=0)
print(json.dumps({"scores": result["results"]["semhitok_pope"], "prompts": prompts}))
"""


def test_lmms_evals_pope_and_semhitok_eval_give_the_same_numbers_for_the_same_answers(tmp_path):
    build_pope(tmp_path / "cache")
    write_task(tmp_path / "tasks")
    env = dict(offline_env(tmp_path), HF_DATASETS_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-c", EVALUATE, str(tmp_path / "tasks"), json.dumps(SCRIPTED)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = load_pope(SHIPPED_POPE, SHIPPED_IMAGES)  # the dataset keeps the shipped file's order
    assert {int(k): v for k, v in got["prompts"].items()} == {i: f"{r['question']}{POST_PROMPT}" for i, r in enumerate(rows)}
    ours = pope_metrics(SCRIPTED, [r["label"] for r in rows])  # what semhitok eval reports for these answers
    assert ours["unparsed"] == 5 and ours["questions"] == 18  # "A red circle.", the caption, "", "It is blue.", "Sure"
    assert ours["yes_ratio"] == pytest.approx(6 / 13)  # over the 13 answers that say yes or no
    for metric in ("accuracy", "precision", "recall", "f1", "yes_ratio", "unparsed"):
        assert got["scores"][f"pope_{metric},none"] == pytest.approx(ours[metric]), metric


@pytest.mark.slow
def test_run_lmms_sh_pope_reports_what_semhitok_eval_reports_on_the_same_model(tiny_mllm_dir, tmp_path):
    out = tmp_path / "lmms"
    proc = subprocess.run(["bash", "eval/run_lmms.sh", str(tiny_mllm_dir), "pope", str(out)], cwd=REPO, env=offline_env(tmp_path),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "pope on the repository's shipped data" in proc.stderr and "pope runs as semhitok_pope" in proc.stderr
    results = json.loads(open(proc.stdout.strip().splitlines()[-1].removeprefix("results: ")).read())
    assert results["configs"]["semhitok_pope"]["dataset_path"] == "lmms-lab-encoder/POPE"
    samples = [json.loads(line) for f in out.rglob("*_semhitok_pope.jsonl") for line in open(f)]
    assert len(samples) == 18
    rows = load_pope(SHIPPED_POPE, SHIPPED_IMAGES)
    ours = run_pope(*load_sampler(tiny_mllm_dir, "cpu"), rows)  # semhitok eval's POPE
    for s in samples:  # the same replies to the same questions
        reply = s["filtered_resps"] if isinstance(s["filtered_resps"], str) else s["filtered_resps"][0]
        assert reply == ours["answers"][s["doc_id"]]["answer"] and s["target"] == rows[s["doc_id"]]["label"]
    collected = collect_lmms_results(out, tiny_mllm_dir)["semhitok_pope"]  # the lmms_eval rows of semhitok eval's table
    for metric in ("accuracy", "precision", "recall", "f1", "unparsed"):
        assert results["results"]["semhitok_pope"][f"pope_{metric},none"] == pytest.approx(ours[metric]), metric
        assert collected[f"pope_{metric}"] == pytest.approx(ours[metric]), metric


def test_run_lmms_sh_refuses_an_unknown_data_choice(tiny_mllm_dir, tmp_path):
    env = dict(offline_env(tmp_path), LMMS_DATA="elsewhere")
    proc = subprocess.run(["bash", "eval/run_lmms.sh", str(tiny_mllm_dir), "pope", str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "LMMS_DATA must be shipped or hub" in proc.stderr
