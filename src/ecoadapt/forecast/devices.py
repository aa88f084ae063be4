"""`ecoadapt plan CONFIG --device NAME`: what a recipe would need on a GPU you do not have.

A **projection**, not a measurement, and labelled so:

- memory: the recipe's weights, gradients and optimizer state counted from its shapes (as it
  is stored: LoRA, frozen blocks, 16-bit weights and fp32 masters), plus activations per block
  row measured on this machine's trial steps at a small scale and multiplied by the rows of a
  micro-batch (the model's attention runs through SDPA here as on the GPU: no (sequence x
  sequence) matrix is kept either way), plus a fixed allowance for the CUDA context and the
  kernels' workspaces;
- time: the recipe's model FLOPs per token over the device's dense peak in the recipe's compute
  dtype, at an MFU the user sets (default :data:`DEFAULT_MFU`; a small model at few tokens per
  step reaches far less: 3-4% on an H200 at 16 x 256 tokens a step, BENCHMARKS.md);
- energy: that time at the board's rated power, an upper bound.

Peaks are NVIDIA's datasheet figures for dense math (without structured sparsity).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ecoadapt.config.precision_modes import MODES
from ecoadapt.core.errors import UserError

GIB = 2**30
DEFAULT_MFU = 0.3
# The CUDA context, cuBLAS/cuDNN workspaces and the caching allocator's slack: what a process
# holds on a GPU beyond its tensors (about 0.5 GiB on recent GPUs with lazy module loading).
CUDA_OVERHEAD_BYTES = GIB // 2
# The compute dtype of each precision mode (bf16-pure computes in bf16 too), from the one table.
COMPUTE = {name: mode.compute for name, mode in MODES.items()}


@dataclass(frozen=True)
class Device:
    """A GPU's figures: name, memory (GB as sold, 10^9 bytes), dense peak FLOP/s per compute
    dtype, and rated board power (W)."""

    name: str
    memory_gb: float
    peaks: dict[str, float]
    watts: float


_HOPPER = {"fp32": 67e12, "tf32": 494.5e12, "bf16": 989.5e12, "fp16": 989.5e12}
_AMPERE_DC = {"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12, "fp16": 312e12}
DEVICES = {
    "T4": Device("NVIDIA T4", 16, {"fp32": 8.1e12, "fp16": 65e12}, 70),
    "A10": Device("NVIDIA A10", 24, {"fp32": 31.2e12, "tf32": 62.5e12, "bf16": 125e12, "fp16": 125e12}, 150),
    "L4": Device("NVIDIA L4", 24, {"fp32": 30.3e12, "tf32": 60e12, "bf16": 121e12, "fp16": 121e12}, 72),
    "A100-40GB": Device("NVIDIA A100 40GB SXM", 40, _AMPERE_DC, 400),
    "A100-80GB": Device("NVIDIA A100 80GB SXM", 80, _AMPERE_DC, 400),
    "H100": Device("NVIDIA H100 SXM 80GB", 80, _HOPPER, 700),
    "H200": Device("NVIDIA H200 SXM 141GB", 141, _HOPPER, 700),
}


def device(name: str) -> Device:
    """The device called ``name`` (case-insensitive).

    Raises:
        UserError: an unknown name, with the known ones.
    """
    found = {key.lower(): value for key, value in DEVICES.items()}.get(name.lower())
    if found is None:
        raise UserError(f"plan --device {name}: unknown device; known: {', '.join(DEVICES)}")
    return found


def activation_bytes_per_row(probe: dict[str, Any]) -> float:
    """Activations one block row keeps: the probe's own estimate (a plan from the shapes), or from
    the trial steps' peaks at two micro-batch sizes."""
    if "activation_bytes_per_row" in probe:
        return float(probe["activation_bytes_per_row"])
    sizes = probe["sizes"]
    if len(sizes) < 2 or sizes[-1]["micro_batch"] == sizes[0]["micro_batch"]:
        return float(sizes[-1]["peak_bytes"]) / max(1, int(sizes[-1]["micro_batch"]))  # all of it: errs high
    rise = float(sizes[-1]["peak_bytes"]) - float(sizes[0]["peak_bytes"])
    return max(0.0, rise / (int(sizes[-1]["micro_batch"]) - int(sizes[0]["micro_batch"])))


def project(
    probe: dict[str, Any], gpu: Device, mode: str, micro_batch: int, tokens_per_step: int, steps: int, mfu: float
) -> dict[str, Any]:
    """One recipe on ``gpu``: peak memory and whether it fits, seconds per step, tokens/s, time,
    joules (at rated power) and mJ per token, from this machine's trial steps (``probe``)."""
    static = sum(int(v) for v in probe["static_bytes"].values())
    per_row = activation_bytes_per_row(probe)
    peak = static + per_row * micro_batch + CUDA_OVERHEAD_BYTES
    dtype = COMPUTE[mode]
    notes = []
    if dtype not in gpu.peaks:  # no such tensor-core path: it runs, emulated or in fp32, slowly
        notes.append(f"{gpu.name} has no native {dtype}: projected at its fp32 peak")
        dtype = "fp32"
    step_s = tokens_per_step * float(probe["flops_per_token"]) / (gpu.peaks[dtype] * mfu)
    time_s = steps * step_s
    joules = time_s * gpu.watts
    return {
        "peak_bytes": int(peak),
        "parts_bytes": {**{k: int(v) for k, v in probe["static_bytes"].items()},
                        "activations": int(per_row * micro_batch), "cuda_context": CUDA_OVERHEAD_BYTES},
        "fits": peak <= gpu.memory_gb * 1e9,
        "step_s": step_s,
        "tokens_per_s": tokens_per_step / step_s,
        "steps": steps,
        "time_s": time_s,
        "joules": joules,
        "mj_per_token": 1000 * joules / (steps * tokens_per_step),
        "compute_dtype": dtype,
        "notes": notes,
    }  # fmt: skip


def table(rows: list[dict[str, Any]], gpu: Device, mfu: float) -> str:
    """The projection as a text table, labelled as one."""
    head = (
        f"{'recipe':<24} {'peak GiB':>9} {'fits':>5} {'s/step':>8} {'tok/s':>10} {'time s':>9} {'energy J':>10} "
        f"{'mJ/tok':>7}"
    )
    lines = [
        f"projection for {gpu.name} ({gpu.memory_gb:g} GB, {gpu.watts:g} W) at MFU {mfu:g}: not a measurement "
        "(memory from the shapes and this machine's activations per block; time from the datasheet's dense "
        "peak; energy at the rated power, an upper bound)",
        head,
    ]
    for r in rows:
        lines.append(
            f"{r['recipe']:<24} {r['peak_bytes'] / GIB:>9.2f} {'yes' if r['fits'] else 'no':>5} {r['step_s']:>8.3f} "
            f"{r['tokens_per_s']:>10,.0f} {r['time_s']:>9.1f} {r['joules']:>10,.0f} {r['mj_per_token']:>7.3f}"
            + "".join(f"  ({n})" for n in r["notes"])
        )
    sources = sorted({r["source"] for r in rows if r.get("source")})
    lines += [f"from {source}" for source in sources]
    fitting = [r for r in rows if r["fits"]]
    if fitting:
        best = min(fitting, key=lambda r: (r["joules"], r["peak_bytes"]))
        lines.append(
            f"recommended on {gpu.name}: {best['recipe']} (fits in {best['peak_bytes'] / GIB:.1f} GiB, the fewest "
            "joules of those that fit, then the least memory; a projection says nothing of accuracy)"
        )
    else:
        lines.append(f"no recipe fits {gpu.name}: try lora.quantize: nf4, gradient checkpointing, a shorter sequence")
    return "\n".join(lines)
