#!/usr/bin/env bash
# Queue a launch script after checking it here, on the login node: the script's own dry run resolves the config
# (preset + overrides, through `semhitok config`) at the resources asked for, so a typo or an unknown preset stops
# with one line before anything is queued.
#   launch_scripts/submit.sh SCRIPT ARGS...            (SCRIPT: tokenizer_train, pretokenize, mllm_train, eval)
#   launch_scripts/submit.sh mllm_train 256 /scratch/semhitok/256 mllm_train.lr=1e-5
#   SEMHITOK_NODES=8 SEMHITOK_TIME=24:00:00 launch_scripts/submit.sh mllm_train 256 /scratch/semhitok/256
#   DRY_RUN=1 launch_scripts/submit.sh ...             check and print the sbatch line, queue nothing
#
# Resources, each from the environment, else the script's #SBATCH line (launch_scripts/site.sh may set them):
#   SEMHITOK_NODES  SEMHITOK_GPUS_PER_NODE  SEMHITOK_CPUS_PER_TASK  SEMHITOK_TIME
#   SEMHITOK_PARTITION  SEMHITOK_ACCOUNT  (none by default: the cluster's defaults)
#   SEMHITOK_ARRAY        array indices (pretokenize: 0-15 by default), e.g. 0-63
#   SEMHITOK_SBATCH_ARGS  any other sbatch options, e.g. "--qos=high --constraint=h100 --exclusive"

set -euo pipefail

die() {
    echo "submit.sh: $*" >&2
    exit 2
}

export SEMHITOK_REPO=${SEMHITOK_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
site=${SEMHITOK_SITE:-$SEMHITOK_REPO/launch_scripts/site.sh}
if [ -f "$site" ]; then
    # shellcheck source=launch_scripts/site.example.sh
    source "$site"
fi

# the launch scripts' names: "eval mllm_train ..."
scripts() {
    local file names=()
    for file in "$SEMHITOK_REPO"/launch_scripts/*.sbatch; do
        file=${file##*/}
        names+=("${file%.sbatch}")
    done
    echo "${names[*]}"
}

[ $# -ge 1 ] || die "usage: launch_scripts/submit.sh SCRIPT ARGS... (SCRIPT: one of $(scripts))"
name=$(basename "$1" .sbatch)
script=$SEMHITOK_REPO/launch_scripts/$name.sbatch
shift
[ -f "$script" ] || die "no launch script '$name' (one of $(scripts))"

# header OPTION: the value of the script's `#SBATCH --OPTION=value` line (empty if it has none)
header() {
    sed -n "s/^#SBATCH --$1=//p" "$script" | head -n 1
}
count() {
    [[ $2 =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive whole number, not '$2'"
}

nodes=${SEMHITOK_NODES:-$(header nodes)}
gpus=${SEMHITOK_GPUS_PER_NODE:-$(header gpus-per-node)}
cpus=${SEMHITOK_CPUS_PER_TASK:-$(header cpus-per-task)}
time=${SEMHITOK_TIME:-$(header time)}
array=${SEMHITOK_ARRAY:-$(header array)}
count SEMHITOK_NODES "$nodes"
count SEMHITOK_GPUS_PER_NODE "$gpus"
count SEMHITOK_CPUS_PER_TASK "$cpus"
# SLURM's forms: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S
[[ $time =~ ^([0-9]+(:[0-9]{1,2}){0,2}|[0-9]+-[0-9]{1,2}(:[0-9]{1,2}){0,2})$ ]] ||
    die "SEMHITOK_TIME must be a SLURM time limit (minutes, HH:MM:SS or D-HH:MM:SS), not '$time'"
[ -z "$array" ] || [[ $array =~ ^[0-9][0-9,:%-]*$ ]] || die "SEMHITOK_ARRAY must be array indices such as 0-63, not '$array'"

flags=(--nodes="$nodes" --gpus-per-node="$gpus" --cpus-per-task="$cpus" --time="$time")
[ -z "$array" ] || flags+=(--array="$array")
[ -z "${SEMHITOK_PARTITION:-}" ] || flags+=(--partition="$SEMHITOK_PARTITION")
[ -z "${SEMHITOK_ACCOUNT:-}" ] || flags+=(--account="$SEMHITOK_ACCOUNT")
read -ra extra <<<"${SEMHITOK_SBATCH_ARGS:-}"
flags+=("${extra[@]}")

if [ -z "${DRY_RUN:-}" ] && ! command -v sbatch >/dev/null 2>&1; then
    die "no sbatch on PATH: submit from a SLURM login node (DRY_RUN=1 checks without queueing)"
fi

# The job's own dry run at these resources: usage, config and overrides, the commands each node will run.
SLURM_JOB_NUM_NODES=$nodes SLURM_GPUS_ON_NODE=$gpus SLURM_CPUS_PER_TASK=$cpus DRY_RUN=1 bash "$script" "$@"

cmd=(sbatch "${flags[@]}" "$script" "$@")
line=$(printf '%q ' "${cmd[@]}")
echo "+ ${line% }"
if [ -z "${DRY_RUN:-}" ]; then
    exec "${cmd[@]}"
fi
