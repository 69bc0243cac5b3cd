import os
import subprocess
import sys
from pathlib import Path

import pytest

from semhitok.common.dist import free_port


@pytest.mark.slow
def test_two_process_ddp_training_keeps_replicas_identical(tmp_path):
    """torchrun with 2 CPU processes (gloo): k-means init gathered across ranks and two steps, EMA statistics all-reduced,
    gradients averaged; every parameter and buffer must agree across ranks after each stage."""
    worker = Path(__file__).with_name("ddp_worker.py")
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
         str(worker), str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rank 0 ok" in proc.stdout and "rank 1 ok" in proc.stdout
    assert (tmp_path / "tokenizer" / "stage2" / "final" / "model.safetensors").is_file()
