#!/usr/bin/env bash
# The GPU paths, checked on one (or two) NVIDIA GPUs in under 5 minutes: every precision mode, a
# layer map, the automatic layer search, a forced out-of-memory with auto micro-batch, NVML
# energy, the gpu/multigpu tests, and DDP + FSDP when two GPUs are visible. One line per run:
# status, energy method, training peak memory, MFU. CI never runs it (no GPU there).
#
#   bash bench/gpu-check.sh                  # from the repository root, on the GPU machine
#   GPU_SMOKE_CPU=1 bash bench/gpu-check.sh  # the script's plumbing on CPU (2 steps; no CUDA-only modes)
#
# The forecast (`ecoadapt plan`'s probe, two child processes per run) runs for bf16, LoRA and
# compiled blocks, where its ratios to the measured figures are printed; the other runs skip it
# to stay inside the time. With $OUT set (the device tool), the logs and summaries are packed
# into $OUT/gpu-check.tgz.
#
# Uses the torch / transformers / peft already installed; ecoadapt goes on top (--no-deps).
# The model is a small random-weight Llama (SmolLM2's shape, 6 blocks): fast, offline, and the
# CUDA paths are the same as for the real model.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
$PY -c "import ecoadapt" 2>/dev/null || $PY -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null \
  || export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
$PY -c "import zeus" 2>/dev/null || $PY -m pip install -q zeus 2>/dev/null || true
started=$(date +%s)
work=runs/gpu-check
rm -rf "$work"; mkdir -p "$work"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
gpus=$($PY -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
smoke=${GPU_SMOKE_CPU:-}
[ "$gpus" -ge 1 ] || [ -n "$smoke" ] || { echo "no CUDA GPU visible (GPU_SMOKE_CPU=1 checks the plumbing on CPU)"; exit 1; }
$PY -m ecoadapt meters || true

$PY bench/random_llama.py "$work/model" --layers 6

if [ -n "$smoke" ]; then
  device=cpu seq=32 micro=2 steps=2 energy=estimate
else
  device=cuda seq=256 micro=16 steps=20 energy=auto
fi
cat > "$work/base.yaml" <<YAML
model: {name_or_path: $work/model}
data: {train: [builtin:python-docstrings], max_seq_len: $seq, eval_max_blocks: 16}
train: {micro_batch_size: $micro, max_steps: $steps, lr: 1.0e-3, log_every: 10, device: $device}
measure: {energy: $energy, forecast: false}
output: {save_model: false}
YAML

line() {  # name, run dir, exit status: one line from the run's summary
  $PY - "$1" "$2" "$3" <<'PY'
import json, sys
name, folder, code = sys.argv[1:]
try:
    s = json.load(open(f"{folder}/summary.json"))
except OSError:
    print(f"{name:<22} exit {code}: no summary"); sys.exit()
m, e = s.get("memory") or {}, s.get("energy") or {}
peak = m.get("train_peak_bytes")
print(f"{name:<22} {s['status']:<18} energy {e.get('method', 'off')}/{e.get('meter', '-'):<18} "
      f"train peak {peak / 2**20 if peak else float('nan'):>8,.0f} MiB  eval peak "
      f"{(m.get('eval_peak_bytes') or 0) / 2**20:>8,.0f} MiB  MFU {s.get('mfu') or float('nan'):.1%}  "
      f"{s.get('tokens_per_s') or 0:,.0f} tok/s" + (f"  [{s.get('error')}]" if s.get("error") else ""))
c, f = s.get("compile") or {}, s.get("forecast") or {}
if c.get("compiled", "off") != "off" or c.get("fallback"):
    print(f"{'':<22} compiled {c.get('compiled')}: {c.get('compile_s') or 0:.1f} s, "
          f"{c.get('training_compile_s') or 0:.1f} s inside training; fallback: {c.get('fallback')}")
if "versus_measured" in f:
    v = f["versus_measured"]
    print(f"{'':<22} forecast/measured: " + ", ".join(
        f"{k} {v[k]['ratio']:.2f}" if v[k]["ratio"] else f"{k} n/a" for k in ("peak_bytes", "step_s", "train_joules")))
elif f:
    print(f"{'':<22} forecast: {json.dumps(f)[:300]}")
PY
}
run() {  # name, nproc, --set overrides...
  local name=$1 nproc=$2; shift 2
  local sets=(); for s in "$@"; do sets+=(--set "$s"); done
  timeout 120 $PY -m ecoadapt adapt "$work/base.yaml" --set "output.dir=$work/$name" --set "parallel.nproc=$nproc" \
    "${sets[@]}" > "$work/$name.log" 2>&1
  line "$name" "$work/$name" $?
}

if [ -n "$smoke" ]; then modes="fp32 bf16 bf16-pure"; else modes="fp32 tf32 fp16 bf16 bf16-pure"; fi
for mode in $modes; do
  if [ "$mode" = bf16 ]; then run "$mode" 1 "precision.mode=$mode" measure.forecast=true; else run "$mode" 1 "precision.mode=$mode"; fi
done
run layer-map 1 'precision.layers={"*.layers.*": bf16, "*norm*": fp32}'
run layer-auto 1 precision.layers=auto
run lora-bf16 1 precision.mode=bf16 lora.enabled=true measure.forecast=true
run ckpt-bf16 1 precision.mode=bf16 train.gradient_checkpointing=true
run compile-blocks 1 precision.mode=bf16-pure train.compile=blocks measure.forecast=true
if [ -z "$smoke" ]; then
  run forced-oom 1 precision.mode=bf16 train.micro_batch_size=64 train.max_memory_gb=3 train.auto_micro_batch=true
  grep -h "micro-batch .* -> " "$work/forced-oom.log" | head -3
fi
if [ "$gpus" -ge 2 ]; then
  run ddp-2gpu 2 precision.mode=bf16 parallel.strategy=ddp
  run fsdp-2gpu 2 precision.mode=bf16-pure parallel.strategy=fsdp
else
  echo "fewer than two GPUs: DDP and FSDP not run (they need two)"
fi
if [ -z "$smoke" ]; then
  timeout 180 $PY -m pytest -q -p no:cacheprovider -m "gpu or multigpu" tests/test_gpu.py > "$work/pytest-gpu.log" 2>&1
  tail -15 "$work/pytest-gpu.log"
fi
if [ -n "${OUT:-}" ]; then
  (cd "$work" && tar czf "$OUT/gpu-check.tgz" --exclude=model --exclude='*.safetensors' --exclude='*.pt' --exclude=checkpoints \
    ./*.log ./*.yaml ./*/summary.json ./*/events.jsonl 2>/dev/null)
fi
echo "done in $(( $(date +%s) - started ))s; logs and summaries in $work/"
