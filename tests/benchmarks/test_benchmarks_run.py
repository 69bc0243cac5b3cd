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
