# shellcheck shell=bash
# Template for launch_scripts/site.sh, this cluster's settings: `cp launch_scripts/site.example.sh launch_scripts/site.sh`
# and edit (site.sh is git-ignored; SEMHITOK_SITE=/path/to/file names another one). It is sourced by every job
# (common.sh) before the Python environment is activated, and by submit.sh on the login node before it
# checks the config and queues the job. Keep it idempotent (sourced twice in a submission) and silent.
# Variables set with `: "${X:=value}"` give way to a value already in the environment.

# --- Software: modules, then the Python environment --------------------------------------------------------
# module purge
# module load cuda/12.6 nccl/2.26 gcc/12
# Either a conda env (a name or a path; common.sh activates it through `conda shell.bash hook`) ...
# module load miniforge3
# : "${SEMHITOK_CONDA_ENV:=semhitok}"
# ... or a venv anywhere (default: <repo>/.venv when there is one).
# : "${SEMHITOK_VENV:=/shared/envs/semhitok}"

# --- Where jobs go and how large they are (submit.sh; the defaults are each script's #SBATCH lines) --------
# : "${SEMHITOK_PARTITION:=gpu}"
# : "${SEMHITOK_ACCOUNT:=my-project}"
# : "${SEMHITOK_GPUS_PER_NODE:=4}"      # 4-GPU nodes; the scripts ask for 8
# : "${SEMHITOK_CPUS_PER_TASK:=32}"
# : "${SEMHITOK_TIME:=24:00:00}"        # the partition's limit, if below 48 h (jobs requeue near it and resume)
# : "${SEMHITOK_SBATCH_ARGS:=--qos=normal --constraint=h100}"

# --- Compute nodes without internet: read models and data sets from a shared cache filled on a login node
# (`HF_HOME=... hf download ...`, or a first run there); wandb logs offline (`wandb sync` later).
# export HF_HOME=/shared/cache/huggingface
# export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
# export WANDB_MODE=offline

# --- NCCL (multi-node): the interconnect's interface and adapters. NCCL_DEBUG=WARN and PYTHONFAULTHANDLER=1
# are common.sh's defaults; NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT,NET shows which transport NCCL picked.
# export NCCL_SOCKET_IFNAME=ib0            # or "eth0,en,bond": the interface the ranks' bootstrap uses
# export NCCL_IB_HCA=mlx5                  # InfiniBand adapters to use
# export NCCL_IB_DISABLE=1                 # Ethernet-only clusters
# AWS EFA:
# export FI_PROVIDER=efa FI_EFA_SET_CUDA_SYNC_MEMOPS=0
# export LD_LIBRARY_PATH=/opt/amazon/efa/lib:${LD_LIBRARY_PATH:-}
