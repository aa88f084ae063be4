#!/usr/bin/env bash
# Memory of an 8B-shaped decoder on one GPU: the lean load against the whole-fp32 load of the
# previous revision and against transformers + PEFT + a plain loop (bench/lean_load.py), for
# QLoRA NF4 and bf16 LoRA, 2 steps of one 128-token block with checkpointing. Random weights
# (bench/random_llama.py --shape llama3.1-8b, bf16 shards): losses mean nothing. Needs
# bitsandbytes (pip install 'ecoadapt[qlora]') and about 17 GB of disk. Budget: building the
# model 2-3 min, each run 1-2 min.
#
#   bash bench/gpu-lean.sh                  # on a GPU machine, from the repository root
#   GPU_SMOKE_CPU=1 bash bench/gpu-lean.sh  # the plumbing on CPU: a 2-block model
#
# Results: runs/gpu-lean/lean_load.json, and $OUT/lean_load.json when the device tool sets $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_prelude.sh
mkdir -p runs/gpu-lean
if [ -n "${GPU_SMOKE_CPU:-}" ]; then
  MODEL=runs/gpu-lean/llama-smoke
  $PY bench/random_llama.py $MODEL --layers 2 --hidden 128 --intermediate 256 --heads 4 --kv-heads 2 --vocab 2048 --dtype bf16
  RECIPES=("qlora nf4 fp32")
else
  $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible: run with GPU_SMOKE_CPU=1 for a CPU check')"
  nvidia-smi --query-gpu=name,memory.total,power.limit,driver_version --format=csv 2>/dev/null || true
  MODEL=runs/gpu-lean/llama-8b
  $PY bench/random_llama.py $MODEL --shape llama3.1-8b --dtype bf16 --shard-size 4GB
  RECIPES=("qlora nf4" "bf16 lora")
fi
BEFORE=()
git rev-parse -q --verify HEAD~1 >/dev/null && BEFORE=(--before HEAD~1)
timeout 600 $PY bench/lean_load.py --model "$PWD/$MODEL" --recipes "${RECIPES[@]}" "${BEFORE[@]}" --peer \
  --json runs/gpu-lean/lean_load.json
[ -n "${OUT:-}" ] && cp runs/gpu-lean/lean_load.json "$OUT/" || true
