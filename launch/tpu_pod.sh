#!/usr/bin/env bash
# TPU pod slice (e.g. v5e-32, v4-64): runs the same command on ALL workers over ssh. Each
# worker is one JAX process; jax.distributed finds the others through the TPU metadata
# (distributed.mode=on; nothing else to set). run_dir must be shared (a GCS-fuse or NFS
# mount) or a gs:// path Orbax can write to. On preemption or maintenance each worker gets
# SIGTERM, saves at the next step boundary and exits 0; rerun this script to resume.
# Usage: TPU_NAME=my-pod ZONE=us-central2-b [SETUP=1] [REPO_DIR=~/hbo_jax] \
#        launch/tpu_pod.sh --config configs/demo.yaml run_dir=/mnt/shared/runs/x [key=value ...]
#   SETUP=1 first copies this checkout to every worker and installs it in a venv.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
REPO_DIR="${REPO_DIR:-~/hbo_jax}"
HERE="$(cd "$(dirname "$0")/.." && pwd)"
ssh_all() { gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$1"; }
if [ "${SETUP:-0}" = 1 ]; then
  gcloud compute tpus tpu-vm scp --zone "$ZONE" --worker=all --recurse "$HERE" "$TPU_NAME:$REPO_DIR"
  ssh_all "cd $REPO_DIR && python3 -m venv .venv && .venv/bin/pip install -q -U pip && \
           .venv/bin/pip install -q -e . 'jax[tpu]'"
fi
args=$(printf '%q ' "$@")
ssh_all "cd $REPO_DIR && .venv/bin/python -m hbo_jax.train distributed.mode=on $args"
