#!/usr/bin/env bash
# The split path on one NVIDIA GPU, one command, at most 5 minutes: KV bytes/s per transport with GPU caches
# (nixl VRAM->VRAM, tcp/shm via pinned staging), token identity of 1P1D (two processes, one GPU, --device cuda)
# against colocated CUDA for tcp and nixl, exposed transfer, decode tok/s at batch 1/16 against transformers.
# Run from the repository root: bash benchmarks/gpu_check.sh   (needs `make venv` or an equivalent venv)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import torch; assert torch.cuda.is_available(), 'this torch has no CUDA: install a CUDA build of torch==2.13.0'"
PYTHONPATH="$PWD" timeout 300 "$PY" -m benchmarks.gpu_check
