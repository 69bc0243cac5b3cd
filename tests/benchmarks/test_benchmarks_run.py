import json
import subprocess
import sys

from tests.conftest import REPO


def test_tokenizer_encode_benchmark_prints_one_json_line():
    proc = subprocess.run([sys.executable, "benchmarks/tokenizer_encode.py", "--preset", "tiny", "--batch", "4",
                           "--iters", "2", "--warmup", "1"], cwd=REPO, capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["bench"] == "tokenizer_encode" and result["ids_per_image"] == 64
    assert result["tokenizer_encode_img_per_s"] > 0 and result["ratio"] > 0


def test_data_pipeline_benchmark_prints_one_json_line():
    proc = subprocess.run([sys.executable, "benchmarks/data_pipeline.py", "--preset", "tiny", "--workers", "0",
                           "--repeat", "1", "--rows", "5", "--max-length", "1024"],
                          cwd=REPO, capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["bench"] == "data_pipeline" and result["pretokenize_images"] == 142  # 71 captions + 71 llava
    assert result["loader_samples_per_s"] > 0 and result["packing_efficiency"] >= 0.95


def test_mllm_train_benchmark_prints_one_json_line():
    proc = subprocess.run([sys.executable, "benchmarks/mllm_train.py", "--shape", "tiny", "--steps", "1", "--warmup", "1",
                           "--seq", "256", "--base-seq", "128", "--base-batch", "2", "--doc-len", "64"],
                          cwd=REPO, capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["bench"] == "mllm_train" and result["ours"]["tokens_per_s"] > 0 and result["baseline"]["tokens_per_s"] > 0


def test_sample_benchmark_prints_one_json_line():
    proc = subprocess.run([sys.executable, "benchmarks/sample.py", "--shape", "tiny", "--batches", "1"],
                          cwd=REPO, capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["bench"] == "sample" and result["ids_per_image"] == 256
    row = result["results"][0]
    assert row["ours_img_per_s"] > 0 and row["baseline_img_per_s"] > 0 and row["compiled_img_per_s"] > 0
