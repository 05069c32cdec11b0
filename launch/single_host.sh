#!/usr/bin/env bash
# Runs hbo_jax.train on every accelerator of one machine (GPUs, a TPU VM host, or the CPU).
# JAX sees all local devices in one process; the mesh (mesh.data/fsdp/tensor, -1 fills)
# lays them out. Usage: launch/single_host.sh [--config FILE] [key=value ...]
# Example: launch/single_host.sh --config configs/demo.yaml mesh.fsdp=8 train.batch_size=64
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
# Let XLA grow GPU memory instead of preallocating 75% (plays well with other processes).
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
exec "$PY" -m hbo_jax.train "$@"
