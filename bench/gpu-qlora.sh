#!/usr/bin/env bash
# QLoRA and 8-bit AdamW on a GPU (issue 28): a randomly initialised Llama of TinyLlama-1.1B's
# shape (22 blocks of 2048), sequence 1024, 4 blocks a micro-batch, 20 steps: bf16 LoRA, QLoRA
# nf4 and int8, full bf16 with AdamW and with 8-bit AdamW; one line each (tokens/s, joules from
# NVML, training peak memory, the frozen base's bytes). Random weights: losses mean nothing.
# Needs bitsandbytes on the GPU machine (pip install 'ecoadapt[qlora]'). At most 8 minutes.
#
#   bash bench/gpu-qlora.sh                  # on a GPU machine, from the repository root
#   GPU_SMOKE_CPU=1 bash bench/gpu-qlora.sh  # the plumbing on CPU: a 2-block model, 4 steps
#
# Results: runs/gpu-qlora/qlora.json, and $OUT/qlora.json when the device tool sets $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_prelude.sh
mkdir -p runs/gpu-qlora
if [ -n "${GPU_SMOKE_CPU:-}" ]; then
  MODEL=runs/gpu-qlora/llama-smoke
  $PY bench/random_llama.py $MODEL --layers 2 --hidden 128 --intermediate 256 --heads 4 --kv-heads 2 --vocab 2048
  ARGS=(--steps 4 --seq 64)
else
  $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible: run with GPU_SMOKE_CPU=1 for a CPU check')"
  nvidia-smi --query-gpu=name,memory.total,power.limit,driver_version --format=csv 2>/dev/null || true
  MODEL=runs/gpu-qlora/llama-1b
  $PY bench/random_llama.py $MODEL --layers 22 --hidden 2048 --intermediate 5632 --heads 32 --kv-heads 4 --vocab 32000
  ARGS=(--steps 20 --seq 1024)
fi
timeout 480 $PY bench/qlora.py --model "$PWD/$MODEL" "${ARGS[@]}" --json runs/gpu-qlora/qlora.json
[ -n "${OUT:-}" ] && cp runs/gpu-qlora/qlora.json "$OUT/" || true
