#!/usr/bin/env bash
# One multi-GPU node. Default: ONE process over all local GPUs (what JAX prefers on a single
# node; the same as single_host.sh). With NPROC=N (N > 1): N processes, one per GPU, joined
# by jax.distributed over a localhost coordinator with explicit flags -- the layout of a
# multi-node job, useful to rehearse one on a single machine (also works on the CPU with
# XLA_FLAGS=--xla_force_host_platform_device_count=K for K fake devices per process).
# SIGTERM/SIGINT are forwarded to every process; each saves at the next step boundary.
# Usage: [NPROC=8] [PORT=12355] launch/multi_gpu.sh [--config FILE] [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
NPROC="${NPROC:-1}"
if [ "$NPROC" -le 1 ]; then
  exec "$PY" -m hbo_jax.train "$@"
fi
PORT="${PORT:-12355}"
pids=()
forward() { for p in "${pids[@]}"; do kill -s "$1" "$p" 2>/dev/null || true; done; }
trap 'forward TERM' TERM
trap 'forward INT' INT
for ((i = 0; i < NPROC; i++)); do
  # JAX_LOCAL_DEVICE_IDS: process i drives GPU i (ignored on the CPU).
  JAX_LOCAL_DEVICE_IDS="$i" "$PY" -m hbo_jax.train "$@" \
    distributed.coordinator_address="127.0.0.1:$PORT" distributed.num_processes="$NPROC" \
    distributed.process_id="$i" &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do
  # `wait` returns early when a trapped signal arrives; wait again until the process is gone.
  while kill -0 "$p" 2>/dev/null; do wait "$p" || true; done
  wait "$p" || status=$?
done
exit "$status"
