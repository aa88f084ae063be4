"""`ecoadapt plan CONFIG --device NAME`: what a recipe would need on a GPU you do not have, or
on a CPU machine with a given memory (``cpu-16gb``, ``cpu-24gb``, ``cpu-32gb``: any
``cpu-<N>gb``).

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

A CPU machine (:func:`cpu_machine`) is the same projection with this machine's own figures where
a GPU has a datasheet's: its RAM in GiB (as RAM is sold), of which the system keeps
:data:`SYSTEM_SHARE` (at least 1 GiB); in place of the CUDA context, the resident set of the
planning process itself (the interpreter, torch and transformers, measured); the matmul rate
this machine's probe measures in each dtype (:func:`ecoadapt.measure.flops.peak_flops`), so the
time is "at this machine's speed"; and the energy estimated as a CPU run's is (cores x
``measure.cpu_watts_per_core`` + resident GiB x ``measure.memory_watts_per_gib``). Where the
model loads here, a CPU machine takes the trial steps' own peak, seconds and joules per step
instead (:func:`from_trial_steps`): no MFU, and a quantized base's dequantizing counted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ecoadapt.config.measure import CPU_WATTS_PER_CORE, MEMORY_WATTS_PER_GIB
from ecoadapt.config.precision_modes import MODES
from ecoadapt.core.errors import UserError

GIB = 2**30
DEFAULT_MFU = 0.3
# The CUDA context, cuBLAS/cuDNN workspaces and the caching allocator's slack: what a process
# holds on a GPU beyond its tensors (about 0.5 GiB on recent GPUs with lazy module loading).
CUDA_OVERHEAD_BYTES = GIB // 2
# The compute dtype of each precision mode (bf16-pure computes in bf16 too), from the one table.
COMPUTE = {name: mode.compute for name, mode in MODES.items()}
# What a CPU machine's system (kernel, services, page cache it cannot drop) keeps of its RAM.
SYSTEM_SHARE = 0.1
SYSTEM_MIN_BYTES = GIB
# The compute dtypes a CPU runs as themselves (the planner's CPU grid: fp32, bf16, bf16-pure),
# with torch's names for them.
_CPU_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
CPU_NAME = re.compile(r"cpu-(\d+(?:\.\d+)?)gb", re.IGNORECASE)


@dataclass(frozen=True)
class Device:
    """A device's figures: name, memory (GB as sold, 10^9 bytes), dense peak FLOP/s per compute
    dtype, and power (W: a GPU's rated board power; a CPU machine's cores, estimated).

    A CPU machine also carries what a GPU's datasheet does not give: ``usable_bytes`` (its RAM
    less the system's share), ``overhead_bytes`` (the process's own resident set, in place of
    the CUDA context), ``watts_per_gib`` (memory power per resident GiB) and ``basis`` (where
    its figures come from, for the table's first line)."""

    name: str
    memory_gb: float
    peaks: dict[str, float]
    watts: float
    kind: str = "cuda"
    overhead_bytes: int = CUDA_OVERHEAD_BYTES
    usable_bytes: int | None = None
    watts_per_gib: float = 0.0
    basis: str = (
        "memory from the shapes and this machine's activations per block; time from the datasheet's dense peak; "
        "energy at the rated power, an upper bound"
    )

    @property
    def capacity_bytes(self) -> int:
        """What a run may use of the device's memory (bytes)."""
        return self.usable_bytes if self.usable_bytes is not None else int(self.memory_gb * 1e9)

    @property
    def overhead_name(self) -> str:
        """What ``overhead_bytes`` is, as the projection's parts name it."""
        return "cuda_context" if self.kind == "cuda" else "process"

    def overhead_for(self, probe: dict[str, Any]) -> int:
        """``overhead_bytes`` for one recipe (bytes): on a CPU machine, the resident set the probe
        measured once it held what a run of the recipe holds besides its tensors (a plan from the
        shapes: the model's code, PEFT and the tokenizer; at 1.1B about 0.2 GiB above a bare
        interpreter with torch), else the device's own."""
        if self.kind == "cpu" and "process_bytes" in probe:
            return max(self.overhead_bytes, int(probe["process_bytes"]))
        return self.overhead_bytes

    @property
    def label(self) -> str:
        """The device as the table's first line names it."""
        if self.kind == "cuda":
            return f"{self.name} ({self.memory_gb:g} GB, {self.watts:g} W)"
        return f"{self.name} ({self.capacity_bytes / GIB:.1f} GiB usable)"


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


def device(
    name: str, cpu_watts_per_core: float = CPU_WATTS_PER_CORE, memory_watts_per_gib: float = MEMORY_WATTS_PER_GIB
) -> Device:
    """The device called ``name`` (case-insensitive): a GPU of :data:`DEVICES`, or ``cpu-<N>gb``
    (:func:`cpu_machine`, with the power figures given).

    Raises:
        UserError: an unknown name, with the known ones.
    """
    cpu = CPU_NAME.fullmatch(name.strip())
    if cpu is not None:
        return cpu_machine(float(cpu.group(1)), cpu_watts_per_core, memory_watts_per_gib)
    found = {key.lower(): value for key, value in DEVICES.items()}.get(name.lower())
    if found is None:
        known = ", ".join([*DEVICES, "cpu-16gb, cpu-24gb, cpu-32gb (any cpu-<N>gb: a CPU machine's RAM)"])
        raise UserError(f"plan --device {name}: unknown device; known: {known}")
    return found


def cpu_machine(
    memory_gib: float,
    cpu_watts_per_core: float = CPU_WATTS_PER_CORE,
    memory_watts_per_gib: float = MEMORY_WATTS_PER_GIB,
) -> Device:
    """A CPU machine with ``memory_gib`` GiB of RAM, at this machine's speed (see the module's
    docstring): its matmul peaks measured here (cached per CPU model and thread count), its
    overhead this process's resident set now, before any weights.

    Raises:
        UserError: a memory too small to hold the system's share.
    """
    import psutil
    import torch

    from ecoadapt.measure import flops
    from ecoadapt.measure.environment import cpu_name

    total = int(memory_gib * GIB)
    system = max(SYSTEM_MIN_BYTES, int(SYSTEM_SHARE * total))
    if total <= system:
        raise UserError(f"plan --device cpu-{memory_gib:g}gb: a machine needs more than {system / GIB:g} GiB of RAM")
    here = torch.device("cpu")
    peaks = {dtype: flops.peak_flops(here, getattr(torch, name))[0] for dtype, name in _CPU_DTYPES.items()}
    threads = torch.get_num_threads()
    rates = ", ".join(f"{dtype} {peak / 1e9:,.0f}" for dtype, peak in peaks.items())
    basis = (
        "memory from the shapes and this machine's activations per block, plus this process's own resident set "
        f"(with the model's code, PEFT and the tokenizer loaded, as a run holds them); "
        f"{system / GIB:.1f} GiB left to the system; time at this machine's measured matmul rate ({cpu_name()}, "
        f"{threads} threads: {rates} GFLOP/s); energy estimated: {threads} cores x {cpu_watts_per_core:g} W + "
        f"{memory_watts_per_gib:g} W per resident GiB"
    )
    return Device(
        name=f"a CPU machine with {memory_gib:g} GiB of RAM",
        memory_gb=total / 1e9,
        peaks=peaks,
        watts=threads * cpu_watts_per_core,
        kind="cpu",
        overhead_bytes=int(psutil.Process().memory_info().rss),
        usable_bytes=total - system,
        watts_per_gib=memory_watts_per_gib,
        basis=basis,
    )


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
    overhead = gpu.overhead_for(probe)
    peak = static + per_row * micro_batch + overhead
    dtype = COMPUTE[mode]
    notes = []
    if dtype not in gpu.peaks:  # no such tensor-core path: it runs, emulated or in fp32, slowly
        notes.append(f"{gpu.name} has no native {dtype}: projected at its fp32 peak")
        dtype = "fp32"
    step_s = tokens_per_step * float(probe["flops_per_token"]) / (gpu.peaks[dtype] * mfu)
    time_s = steps * step_s
    joules = time_s * (gpu.watts + gpu.watts_per_gib * peak / GIB)
    return {
        "peak_bytes": int(peak),
        "parts_bytes": {**{k: int(v) for k, v in probe["static_bytes"].items()},
                        "activations": int(per_row * micro_batch), gpu.overhead_name: overhead},
        "fits": peak <= gpu.capacity_bytes,
        "step_s": step_s,
        "tokens_per_s": tokens_per_step / step_s,
        "steps": steps,
        "time_s": time_s,
        "joules": joules,
        "mj_per_token": 1000 * joules / (steps * tokens_per_step),
        "compute_dtype": dtype,
        "notes": notes,
    }  # fmt: skip


def from_trial_steps(
    step: dict[str, Any], machine: Device, mode: str, tokens_per_step: int, steps: int
) -> dict[str, Any]:
    """One recipe on a CPU ``machine`` from this machine's own trial steps (``step``:
    :func:`ecoadapt.forecast.costs.per_step` at the run's micro-batch): their resident peak above
    the pre-load baseline plus the process's own resident set, and their seconds and estimated
    joules per step, measured here (no MFU: a CPU's time is what it measured, quantized kernels
    included)."""
    peak = int(step["peak_bytes"]) + machine.overhead_bytes
    time_s = steps * float(step["step_s"])
    joules = steps * float(step["joules_per_step"])
    return {
        "peak_bytes": peak,
        "parts_bytes": {**step["parts_bytes"], machine.overhead_name: machine.overhead_bytes},
        "fits": peak <= machine.capacity_bytes,
        "step_s": float(step["step_s"]),
        "tokens_per_s": tokens_per_step / float(step["step_s"]),
        "steps": steps,
        "time_s": time_s,
        "joules": joules,
        "mj_per_token": 1000 * joules / (steps * tokens_per_step),
        "compute_dtype": COMPUTE[mode],
        "notes": ["time and energy from the trial steps here, not at the MFU"],
    }


def table(rows: list[dict[str, Any]], gpu: Device, mfu: float) -> str:
    """The projection as a text table, labelled as one."""
    head = (
        f"{'recipe':<24} {'peak GiB':>9} {'fits':>5} {'s/step':>8} {'tok/s':>10} {'time s':>9} {'energy J':>10} "
        f"{'mJ/tok':>7}"
    )
    lines = [
        f"projection for {gpu.label} at MFU {mfu:g}: not a measurement ({gpu.basis})",
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
        # A row whose projected time leaves out known work (a quantized base's dequantizing on a
        # CPU) would win on joules it does not have: it is recommended only where nothing else fits.
        best = min(fitting, key=lambda r: (bool(r.get("time_understated")), r["joules"], r["peak_bytes"]))
        passed = any(r.get("time_understated") for r in fitting) and not best.get("time_understated")
        lines.append(
            f"recommended on {gpu.name}: {best['recipe']} (fits in {best['peak_bytes'] / GIB:.1f} GiB, the fewest "
            "joules of those that fit, then the least memory; a projection says nothing of accuracy"
            + (
                "; a quantized base only where nothing else fits, as its time here leaves out dequantizing"
                if passed
                else ""
            )
            + ")"
        )
    else:
        lines.append(f"no recipe fits {gpu.name}: try lora.quantize: nf4, gradient checkpointing, a shorter sequence")
    return "\n".join(lines)
