#!/usr/bin/env bash
# Trains on a multi-host Cloud TPU VM slice (e.g. v4-64, v5p-128): copies this repository
# to every host, installs it, and starts `python -m vmoe.main` on all hosts at once.
#
#   TPU_NAME=my-v4-64 ZONE=us-central2-b WORKDIR=gs://my-bucket/vmoe_15b \
#     CONFIG=configs/vmoe_15b.py \
#     FLAGS='--config.dataset.train.data_dir=gs://my-bucket/tfds --config.dataset.val.data_dir=gs://my-bucket/tfds' \
#     bash scripts/tpu_pod.sh
#
# Every host runs the same command. --distributed=on makes each call
# jax.distributed.initialize() without arguments: JAX reads the slice's hosts and this
# host's index from the TPU VM metadata, so no address or process id is passed. Each host
# reads its own shard of the data and feeds its local TPU chips; checkpoints are written
# by all hosts together, so WORKDIR must be shared storage (a gs:// bucket), and running
# the script again resumes from the latest checkpoint. config.mesh (e.g.
# --config.mesh.expert=32) spans all chips of all hosts; plan it first with
#   python -m vmoe.plan --config=$CONFIG --mesh=data:16,expert:32
#
# Environment:
#   TPU_NAME, ZONE   the TPU VM (required).
#   WORKDIR          checkpoints, TensorBoard events, final metrics (required; gs://...).
#   CONFIG           config file[:arg] (default: configs/vmoe_15b.py).
#   FLAGS            extra flags for vmoe.main, e.g. config overrides (default: none).
#   PROJECT          GCP project (default: gcloud's configured one).
#   REMOTE_DIR       where the repository goes on the hosts (default: vmoe).
#   SETUP            1: copy and install the repository first (default); 0: only run.
#   JAX_SPEC         pip requirement of JAX for TPUs (default: jax[tpu]).
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU VM zone}"
: "${WORKDIR:?set WORKDIR to a gs:// directory shared by all hosts}"
CONFIG=${CONFIG:-configs/vmoe_15b.py}
FLAGS=${FLAGS:-}
REMOTE_DIR=${REMOTE_DIR:-vmoe}
SETUP=${SETUP:-1}
JAX_SPEC=${JAX_SPEC:-jax[tpu]}
PROJECT_FLAG=()
if [[ -n "${PROJECT:-}" ]]; then PROJECT_FLAG=(--project="$PROJECT"); fi

REPO=$(cd "$(dirname "$0")/.." && pwd)
tpu_ssh() {  # Runs $1 on every host of the slice, at the same time.
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" "${PROJECT_FLAG[@]}" \
    --worker=all --command="$1"
}

if [[ "$SETUP" == 1 ]]; then
  # A tarball of the tracked files (no virtualenvs, no local runs), unpacked on each host.
  archive=$(mktemp --suffix=.tar.gz)
  trap 'rm -f "$archive"' EXIT
  git -C "$REPO" ls-files -z | tar -C "$REPO" --null -T - -czf "$archive"
  gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME":vmoe.tar.gz --zone="$ZONE" \
    "${PROJECT_FLAG[@]}" --worker=all
  tpu_ssh "mkdir -p $(printf %q "$REMOTE_DIR") && tar -xzf vmoe.tar.gz -C $(printf %q "$REMOTE_DIR") \
    && pip install -q -e $(printf %q "$REMOTE_DIR") $(printf %q "$JAX_SPEC")"
fi

# printf %q: the config argument and workdir reach the remote shell as one word each.
# FLAGS is split into words on purpose (several flags).
tpu_ssh "cd $(printf %q "$REMOTE_DIR") && python3 -m vmoe.main --distributed=on \
  --config=$(printf %q "$CONFIG") --workdir=$(printf %q "$WORKDIR") $FLAGS"
