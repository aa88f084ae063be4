#!/usr/bin/env bash
# Filling a GPU (issue 24): SmolLM2-135M's architecture at sequence 1024, 16k / 64k / 256k tokens
# per step, bf16 and bf16-pure, eager and compiled blocks, the micro-batch chosen by
# train.micro_batch_size: auto, and the Hugging Face Trainer beside it with its best flags; one
# line per point (tokens/s, MFU, mJ/token from NVML, peak memory). At most 8 minutes.
#
#   bash bench/gpu-fill.sh                  # on a GPU machine, from the repository root
#   GPU_SMOKE_CPU=1 bash bench/gpu-fill.sh  # the plumbing on CPU: a 2-block model, 3 steps
#
# Results: runs/gpu-fill/gpu_fill.json, and $OUT/gpu_fill.json when the device tool sets $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
if ! $PY -c "import ecoadapt" 2>/dev/null; then
  $PY -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null || export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
fi
for pkg in pyyaml psutil tqdm safetensors; do $PY -c "import ${pkg/pyyaml/yaml}" 2>/dev/null || $PY -m pip install -q "$pkg" || true; done
if [ -z "${GPU_SMOKE_CPU:-}" ]; then
  $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible: run with GPU_SMOKE_CPU=1 for a CPU check')"
  $PY -c "import zeus" 2>/dev/null || $PY -m pip install -q zeus || true
  nvidia-smi --query-gpu=name,memory.total,power.limit,driver_version --format=csv 2>/dev/null || true
fi
DEADLINE_S=${DEADLINE_S:-420} timeout 480 $PY bench/gpu_fill.py
