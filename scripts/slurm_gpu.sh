#!/usr/bin/env bash
# Trains on GPU nodes under SLURM: one process per GPU, on every node of the allocation.
#
#   WORKDIR=$SCRATCH/runs/vmoe_b16 CONFIG=configs/vmoe_b16_every2_imagenet21k.py \
#     FLAGS="--config.mesh.expert=8 --config.dataset.train.data_dir=$SCRATCH/tfds" \
#     sbatch --nodes=4 scripts/slurm_gpu.sh
#
# srun starts one task per GPU (--ntasks-per-node = GPUs per node). In each task
# `python -m vmoe.main` finds SLURM_NTASKS > 1 and SLURM_STEP_NODELIST in its environment
# (vmoe.cli.cluster_env) and calls jax.distributed.initialize(), which takes the
# coordinator (the first node of the step, a port derived from the job id), the number of
# processes (SLURM_NTASKS), this process's id (SLURM_PROCID) and its GPU (SLURM_LOCALID)
# from SLURM. All GPUs of a node stay visible to each of its tasks (--gpus-per-node, not
# --gpus-per-task): JAX picks GPU SLURM_LOCALID itself. Each process reads its own shard
# of the data; checkpoints are written by all processes together, so WORKDIR must be on a
# file system every node sees. Submitting the script again resumes from the latest
# checkpoint. A process that dies (node lost, OOM-killed) makes the others exit after
# --heartbeat_timeout seconds instead of hanging until the job's time limit.
#
# Change the node count on the sbatch command line (--nodes=N); if the nodes do not have
# 8 GPUs, change both --ntasks-per-node and --gpus-per-node to their GPU count.
#
# Environment (exported to the job by sbatch):
#   WORKDIR   checkpoints, TensorBoard events, final metrics (required; shared storage).
#   CONFIG    config file[:arg] (default: configs/vmoe_b16_every2_imagenet21k.py).
#   FLAGS     extra flags for vmoe.main, e.g. --config.mesh.expert=8 (default: none).
#   PYTHON    the Python with vmoe and jax[cuda12] installed (default: python3).
#   HEARTBEAT seconds of silence after which a process counts as dead (default: 60).
#
#SBATCH --job-name=vmoe
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=48:00:00
#SBATCH --output=vmoe-%j.out
set -euo pipefail

: "${WORKDIR:?set WORKDIR to a directory on storage shared by all nodes}"
CONFIG=${CONFIG:-configs/vmoe_b16_every2_imagenet21k.py}
FLAGS=${FLAGS:-}
PYTHON=${PYTHON:-python3}
HEARTBEAT=${HEARTBEAT:-60}

# sbatch runs a copy of this script from its spool directory: use the submission directory.
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
# --kill-on-bad-exit: if one task fails, SLURM ends the others too.
# FLAGS is split into words on purpose (several flags).
# shellcheck disable=SC2086
srun --kill-on-bad-exit=1 "$PYTHON" -m vmoe.main --config="$CONFIG" --workdir="$WORKDIR" \
  --heartbeat_timeout="$HEARTBEAT" $FLAGS
