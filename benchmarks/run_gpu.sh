#!/usr/bin/env bash
# Every benchmark at the issues' GPU settings, one JSON line each, into ${1:-benchmarks_gpu.jsonl}.
#   bash benchmarks/run_gpu.sh [OUT.jsonl]
# Install first: pip install -e ".[gpu,megatron]" (plus flash-attn if wanted). Random weights: nothing to download.
set -euo pipefail
out=${1:-benchmarks_gpu.jsonl}
python=${PYTHON:-python}
cd "$(dirname "${BASH_SOURCE[0]}")/.."
: > "$out"
"$python" benchmarks/tokenizer_encode.py --preset 256 --batch 64 | tail -n 1 | tee -a "$out"
"$python" benchmarks/data_pipeline.py --preset 256 --batch 64 --workers 8 --repeat 8 | tail -n 1 | tee -a "$out"
# arms: hf_loss, chunked, chunked_fused, zero3_engine (one GPU), same batch and attention kernel
"$python" benchmarks/mllm_train.py --shape 1.5b | tail -n 1 | tee -a "$out"
# host memory while building: the old arm in one process at cut depths, the new one on 1 GPU (nproc = GPUs)
"$python" benchmarks/mllm_memory.py --shape 1.5b --nproc 1 --old-layers 1 3 | tail -n 1 | tee -a "$out"
# the Megatron-Core backend (needs the megatron extra) at the same shape and batch: one GPU, then TP 2 (Qwen2.5-1.5B's
# 2 key/value heads allow at most 2) x DP over every GPU of the machine
"$python" benchmarks/megatron_train.py --shape 1.5b --tp 1 | tail -n 1 | tee -a "$out"
gpus=$("$python" -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -ge 2 ]; then
    "$python" -m torch.distributed.run --nproc_per_node "$gpus" benchmarks/megatron_train.py --shape 1.5b --tp 2 | tail -n 1 | tee -a "$out"
fi
"$python" benchmarks/sample.py --shape 1.5b --batches 1 64 | tail -n 1 | tee -a "$out"
echo "results: $out"
