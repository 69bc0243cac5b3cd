#!/usr/bin/env bash
# Evaluate a SemHiTok model with lmms-eval.
#
#   bash eval/run_lmms.sh MODEL_DIR TASKS [OUTPUT_DIR]
#
# OUTPUT_DIR defaults to lmms_eval/ in the model's one eval folder (semhitok.common.model_card.eval_dir:
# <run>/mllm/final -> <run>/mllm/eval), where the pipeline and `semhitok eval --model MODEL_DIR` write and
# read the scores back into summary.md and the model card.
#   bash eval/run_lmms.sh runs/256/mllm/final pope,mme,gqa,seedbench,mmbench_en_dev,mmvet
#   LMMS_DATA=shipped bash eval/run_lmms.sh runs/tiny/mllm/final pope   # lmms-eval's pope data, offline
#   bash eval/run_lmms.sh runs/tiny/mllm/final semhitok_pope_local      # POPE questions on local images
#
# `pope` runs as semhitok_pope: lmms-eval's pope dataset and prompt, scored by semhitok's POPE parser
# (semhitok.eval.pope, the one `semhitok eval` uses) instead of lmms-eval's exact string match, so both
# report the same numbers for the same answers (eval/lmms_tasks.py).
#
# Needs `pip install -e ".[eval]"`. LMMS_DATA picks the datasets: hub (the real ones: lmms-eval downloads
# them from the Hugging Face Hub or reads the datasets cache) or shipped (the repository's copies, in the
# Hub datasets' schema, built into <OUTPUT_DIR>/hf_datasets and read offline; today: pope). Default: shipped
# when HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is 1, else hub. MM-Vet also needs an OpenAI key for its judge.
# semhitok_pope_local reads POPE_QUESTIONS and POPE_IMAGE_ROOT (default: the shipped data/eval/pope.jsonl).
# Extra lmms-eval flags: LMMS_ARGS; extra model arguments: MODEL_ARGS (e.g. MODEL_ARGS=compile=true on a
# GPU: CUDA-graph decoding).
set -euo pipefail

if [ $# -lt 2 ]; then
    echo "usage: bash eval/run_lmms.sh MODEL_DIR TASKS [OUTPUT_DIR]" >&2
    exit 2
fi
model_dir=${1%/}
tasks=$2
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python}

if [ ! -f "$model_dir/semhitok_mllm.json" ]; then
    echo "run_lmms.sh: $model_dir is not a SemHiTok model directory (no semhitok_mllm.json)" >&2
    exit 2
fi
if [ "$(basename "$model_dir")" = final ]; then  # semhitok.common.model_card.eval_dir (tests/test_cli.py holds them equal)
    default_out=$(dirname "$model_dir")/eval/lmms_eval
else
    default_out=$model_dir-eval/lmms_eval
fi
out=${3:-$default_out}
if [[ ",$tasks," == *",pope,"* ]]; then
    echo "run_lmms.sh: pope runs as semhitok_pope (lmms-eval's pope data and prompt, scored by semhitok's POPE parser as in semhitok eval)" >&2
fi
tasks=$(IFS=,; for t in $tasks; do [ "$t" = pope ] && t=semhitok_pope; echo -n "$t,"; done)
tasks=${tasks%,}
mkdir -p "$out"
include=()
if [[ ",$tasks," == *",semhitok_pope"* ]]; then
    local_task=()
    if [[ ",$tasks," == *",semhitok_pope_local,"* ]]; then
        local_task=(--questions "${POPE_QUESTIONS:-$repo/data/eval/pope.jsonl}" --image-root "${POPE_IMAGE_ROOT:-$repo/data/sample}")
    fi
    "$python" -m semhitok.eval.lmms_tasks --out "$out/tasks" "${local_task[@]}" >/dev/null
    include=(--include_path "$out/tasks")
fi
offline=0
if [ "${HF_HUB_OFFLINE:-0}" = 1 ] || [ "${HF_DATASETS_OFFLINE:-0}" = 1 ]; then offline=1; fi
data=${LMMS_DATA:-$([ $offline = 1 ] && echo shipped || echo hub)}
if [ "$data" = shipped ]; then
    # semhitok_pope reads lmms-eval's pope dataset; semhitok_pope_local reads local files
    shipped_tasks=$(IFS=,; for t in $tasks; do [ "$t" = semhitok_pope ] && t=pope; [[ $t == semhitok_* ]] || echo -n "$t,"; done)
    if [ -n "$shipped_tasks" ]; then
        "$python" -m semhitok.eval.lmms_datasets --cache "$out/hf_datasets" --tasks "${shipped_tasks%,}" >/dev/null
        export HF_DATASETS_CACHE=$out/hf_datasets LMMS_EVAL_DATASETS_CACHE=$out/hf_datasets HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
        echo "run_lmms.sh: ${shipped_tasks%,} on the repository's shipped data (LMMS_DATA=hub for the real datasets)" >&2
    fi
elif [ "$data" != hub ]; then
    echo "run_lmms.sh: LMMS_DATA must be shipped or hub, not $data" >&2
    exit 2
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
