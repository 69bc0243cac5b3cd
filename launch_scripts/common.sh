#!/usr/bin/env bash
# Shared by the sbatch scripts: site hook, environment, per-job log, requeue on time-out, one torchrun per node.
#
# DRY_RUN=1 prints the commands (with the SLURM_* variables of the environment, real or simulated)
# instead of running them, after resolving the config as the job will (check_config): a typo or an unknown
# preset stops it with one line. `DRY_RUN=1 SLURM_JOB_NUM_NODES=2 SLURM_GPUS_ON_NODE=8 bash launch_scripts/mllm_train.sbatch ...`
# launch_scripts/submit.sh runs that dry run on the login node before it queues anything.

set -euo pipefail

die() {
    echo "$*" >&2
    exit 2
}

REPO=${SEMHITOK_REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}
cd "$REPO"

# The cluster's own settings (module loads, environment, NCCL, partition/account): launch_scripts/site.sh when
# present, or the file SEMHITOK_SITE names; launch_scripts/site.example.sh is the template.
SITE=${SEMHITOK_SITE:-$REPO/launch_scripts/site.sh}
if [ -n "${SEMHITOK_SITE:-}" ] && [ ! -f "$SITE" ]; then
    die "SEMHITOK_SITE=$SITE: no such file"
fi
if [ -f "$SITE" ]; then
    # shellcheck source=launch_scripts/site.example.sh
    source "$SITE"
else
    SITE=
fi

# The Python environment: the conda env SEMHITOK_CONDA_ENV (a name or a path), else the venv SEMHITOK_VENV,
# else <repo>/.venv when there is one (site.sh may have activated one already: then set neither).
if [ -n "${SEMHITOK_CONDA_ENV:-}" ]; then
    command -v conda >/dev/null 2>&1 || die "SEMHITOK_CONDA_ENV=$SEMHITOK_CONDA_ENV but no conda on PATH (module load it in $REPO/launch_scripts/site.sh)"
    set +u  # conda's activation scripts read unset variables
    eval "$(conda shell.bash hook)"
    conda activate "$SEMHITOK_CONDA_ENV"
    set -u
elif [ -n "${SEMHITOK_VENV:-}" ]; then
    [ -f "$SEMHITOK_VENV/bin/activate" ] || die "SEMHITOK_VENV=$SEMHITOK_VENV: no bin/activate there"
    # shellcheck disable=SC1091
    source "$SEMHITOK_VENV/bin/activate"
elif [ -f .venv/bin/activate ]; then
    # shellcheck disable=SC1091
    source .venv/bin/activate
fi
export HF_HUB_ENABLE_HF_TRANSFER=${HF_HUB_ENABLE_HF_TRANSFER:-0}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export WANDB_MODE=${WANDB_MODE:-offline}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export PYTHONFAULTHANDLER=${PYTHONFAULTHANDLER:-1}  # a hung or crashed rank prints every thread's stack

JOB_ID=${SLURM_JOB_ID:-local}
NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}

# first_host "gpu[01-04,07],cpu3" -> gpu01 (what `scontrol show hostnames` would list first)
first_host() {
    local list=$1 first
    if command -v scontrol >/dev/null 2>&1 && [ -z "${DRY_RUN:-}" ]; then
        scontrol show hostnames "$list" | head -n 1
        return
    fi
    first=${list%%,*}
    if [[ $list =~ ^([^,\[]+)\[([0-9]+) ]]; then
        first="${BASH_REMATCH[1]}${BASH_REMATCH[2]}"
    fi
    echo "$first"
}

MASTER_ADDR=${MASTER_ADDR:-$(first_host "${SLURM_JOB_NODELIST:-localhost}")}
MASTER_PORT=${MASTER_PORT:-$((20000 + $(cksum <<<"$JOB_ID" | cut -d' ' -f1) % 20000))}
export MASTER_ADDR MASTER_PORT

# Everything the job prints also goes to <run_dir>/logs/<job name>-<job id>.log.
start_log() {
    local run_dir=$1 name=${SLURM_JOB_NAME:-$2}
    if [ -z "${DRY_RUN:-}" ]; then
        mkdir -p "$run_dir/logs"
        exec > >(tee -a "$run_dir/logs/$name-$JOB_ID.log") 2>&1
    fi
    echo "[$(date -Is)] job $JOB_ID ($name) on ${SLURM_JOB_NODELIST:-$(hostname)}: $NNODES node(s) x $GPUS_PER_NODE GPU(s)"
    echo "python: $(command -v python || echo none on PATH)${SITE:+; site hook: $SITE}"
}

# check_config CONFIG [key=value ...]: under DRY_RUN, resolve the preset and overrides through `semhitok config`,
# the loader every job command uses, and stop on the first error with its one line (exit 2).
check_config() {
    [ -n "${DRY_RUN:-}" ] || return 0  # a real job's own command checks it first thing
    local err
    if ! err=$(python -m semhitok.cli config --config "$@" 2>&1 >/dev/null); then
        die "${err##*$'\n'}"
    fi
    echo "config: $*"
}

# Near the time limit SLURM sends USR1 (#SBATCH --signal=B:USR1@300); the job requeues itself and,
# restarted, every stage resumes from its newest checkpoint.
on_timeout() {
    echo "[$(date -Is)] time limit near: requeueing job $JOB_ID"
    scontrol requeue "$JOB_ID"
}
trap on_timeout USR1

# run CMD...: run it (in the background, so the USR1 trap fires) or print it under DRY_RUN.
run() {
    if [ -n "${DRY_RUN:-}" ]; then
        echo "+ $*"
        return
    fi
    "$@" &
    wait $!
}

# launch_distributed ARGS...: `python -m semhitok.cli ARGS` on every GPU of every node: one torchrun per
# node (srun), static rendezvous on the first node, node rank from SLURM_NODEID.
launch_distributed() {
    local torchrun=(torchrun --nnodes "$NNODES" --nproc_per_node "$GPUS_PER_NODE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
    echo "world_size=$((NNODES * GPUS_PER_NODE)) nodes=$NNODES gpus_per_node=$GPUS_PER_NODE master=$MASTER_ADDR:$MASTER_PORT"
    if [ -n "${DRY_RUN:-}" ]; then
        local node
        for ((node = 0; node < NNODES; node++)); do
            echo "+ node $node (ranks $((node * GPUS_PER_NODE))-$(((node + 1) * GPUS_PER_NODE - 1))): ${torchrun[*]} --node_rank $node -m semhitok.cli $*"
        done
        return
    fi
    local per_node
    per_node="$(printf '%q ' "${torchrun[@]}") --node_rank \$SLURM_NODEID -m semhitok.cli $(printf '%q ' "$@")"
    run srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c "$per_node"
}
