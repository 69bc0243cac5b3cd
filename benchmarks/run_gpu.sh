#!/usr/bin/env bash
# Every benchmark at the issues' GPU settings, one JSON line each, into ${1:-benchmarks_gpu.jsonl}.
#   bash benchmarks/run_gpu.sh [OUT.jsonl]
# Install first: pip install -e ".[gpu,megatron]" (plus flash-attn if wanted). Random weights: nothing to download.
# A benchmark that fails or outlasts BENCH_TIMEOUT seconds (default 1800) leaves {"bench": ..., "error": ...} in
# its place and the rest still run; the script then exits 1.
set -uo pipefail
out=${1:-benchmarks_gpu.jsonl}
python=${PYTHON:-python}
limit=${BENCH_TIMEOUT:-1800}
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit
: > "$out"
failed=0

bench() {  # bench NAME CMD...: the command's last stdout line (its JSON) into $out, or an error line
    local name=$1 line rc
    shift
    line=$(timeout -k 60 "$limit" "$@" | tail -n 1)  # -k: a rank stuck in a collective may ignore SIGTERM
    rc=${PIPESTATUS[0]}
    if [ "$rc" -ne 0 ] || [ -z "$line" ]; then
        line="{\"bench\": \"$name\", \"error\": \"exit $rc$([ "$rc" -eq 124 ] && echo " (timeout ${limit} s)")\"}"
        failed=1
    fi
    echo "$line" | tee -a "$out"
}

bench tokenizer_encode "$python" benchmarks/tokenizer_encode.py --preset 256 --batch 64
bench data_pipeline "$python" benchmarks/data_pipeline.py --preset 256 --batch 64 --workers 8 --repeat 8
# arms: hf_loss, chunked, chunked_fused, zero3_engine (one GPU), same batch and attention kernel
bench mllm_train "$python" benchmarks/mllm_train.py --shape 1.5b
# host memory while building: the old arm in one process at cut depths, the new one on 1 GPU (nproc = GPUs)
bench mllm_memory "$python" benchmarks/mllm_memory.py --shape 1.5b --nproc 1 --old-layers 1 3
# the Megatron-Core backend (needs the megatron extra) at the same shape and batch: one GPU, then TP 2 (Qwen2.5-1.5B's
# 2 key/value heads allow at most 2) x DP over every GPU of the machine
bench megatron_train "$python" benchmarks/megatron_train.py --shape 1.5b --tp 1
gpus=$("$python" -c "import torch; print(torch.cuda.device_count())" || echo 0)
if [ "$gpus" -ge 2 ]; then
    bench megatron_train "$python" -m torch.distributed.run --nproc_per_node "$gpus" benchmarks/megatron_train.py --shape 1.5b --tp 2
fi
bench sample "$python" benchmarks/sample.py --shape 1.5b --batches 1 64
echo "results: $out"
exit $failed
