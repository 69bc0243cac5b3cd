#!/usr/bin/env bash
# Evaluate a SemHiTok model with lmms-eval.
#
#   bash eval/run_lmms.sh MODEL_DIR TASKS [OUTPUT_DIR]
#
# OUTPUT_DIR defaults to the model's own eval folder, where `semhitok eval --model MODEL_DIR` reads the
# scores back: <run>/mllm/final -> <run>/mllm/eval/lmms_eval; any other DIR -> DIR-eval/lmms_eval.
#   bash eval/run_lmms.sh runs/256/mllm/final pope,mme,gqa,seedbench,mmbench_en_dev,mmvet
#   bash eval/run_lmms.sh runs/tiny/mllm/final semhitok_pope_local      # offline: POPE on local COCO images
#
# Needs `pip install -e ".[eval]"`. Standard tasks download their data from the Hugging Face Hub at run
# time; MM-Vet also needs an OpenAI key for its judge. semhitok_pope_local reads POPE_QUESTIONS and
# POPE_IMAGE_ROOT (default: ../shared/data beside the repository). Extra lmms-eval flags: LMMS_ARGS; extra
# model arguments: MODEL_ARGS (e.g. MODEL_ARGS=compile=true on a GPU: CUDA-graph decoding).
set -euo pipefail

if [ $# -lt 2 ]; then
    echo "usage: bash eval/run_lmms.sh MODEL_DIR TASKS [OUTPUT_DIR]" >&2
    exit 2
fi
model_dir=${1%/}
tasks=$2
if [ "$(basename "$model_dir")" = final ]; then
    default_out=$(dirname "$model_dir")/eval/lmms_eval
else
    default_out=$model_dir-eval/lmms_eval
fi
out=${3:-$default_out}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python}

if [ ! -f "$model_dir/semhitok_mllm.json" ]; then
    echo "run_lmms.sh: $model_dir is not a SemHiTok model directory (no semhitok_mllm.json)" >&2
    exit 2
fi
mkdir -p "$out"
include=()
if [[ ",$tasks," == *",semhitok_pope_local,"* ]]; then
    "$python" -m semhitok.eval.lmms_tasks --out "$out/tasks" \
        --questions "${POPE_QUESTIONS:-$repo/../shared/data/llava_instruct/pope_on_shipped_images.jsonl}" \
        --image-root "${POPE_IMAGE_ROOT:-$repo/../shared/data/images_captions}" >/dev/null
    include=(--include_path "$out/tasks")
fi

stamp=$(mktemp)
# shellcheck disable=SC2086  # LMMS_ARGS is a list of flags
"$python" -m lmms_eval eval --model semhitok --model_args "pretrained=$model_dir${MODEL_ARGS:+,$MODEL_ARGS}" --tasks "$tasks" \
    "${include[@]}" --batch_size 1 --output_path "$out" --log_samples ${LMMS_ARGS:-}

# lmms-eval exits 0 even when a task fails: a fresh results file is the proof of success.
results=$(find "$out" -name '*results*.json' -newer "$stamp" | head -n 1)
rm -f "$stamp"
if [ -z "$results" ]; then
    echo "run_lmms.sh: no results JSON written under $out: the evaluation failed (see the log above)" >&2
    exit 1
fi
echo "results: $results"
