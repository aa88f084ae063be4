"""`ecoadapt plan`: a recipe's peak memory, time and energy on this device before any training,
and which recipes fit a memory limit and an energy budget.

Each recipe is probed in a child process (:mod:`ecoadapt.forecast.trial_steps`: a few steps at two small
micro-batches, so that a recipe too large for the device still gets a forecast) and the probe
becomes a forecast (:mod:`ecoadapt.forecast.costs`). Probes are cached per recipe, model files,
device and library versions in ``<cache>/plan/`` (``--fresh`` probes again); a run
(``measure.forecast``) reuses them and puts the forecast beside what it measured.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from ecoadapt.config import RunConfig, from_dict
from ecoadapt.config.precision_modes import MODES
from ecoadapt.config.run import PrecisionMode
from ecoadapt.core import heap, storage
from ecoadapt.core.errors import UserError
from ecoadapt.core.processes import run_child
from ecoadapt.core.progress import say
from ecoadapt.forecast import costs, devices, from_shapes
from ecoadapt.measure.environment import package_version
from ecoadapt.model import precision_choice
from ecoadapt.model.parallel import pick_device
from ecoadapt.task import base_cache
from ecoadapt.train import micro_batch

GIB = 2**30
# In the cache key: a changed probe is measured afresh (2: one process per size; 3: the run's
# held-out pass before the timed steps; 4: weights read in the recipe's storage dtype).
PROBE_VERSION = 4


TRIAL_TIMEOUT_S = 1800.0  # one size's trial steps (a few steps and a model load): hung past this


def _key(cfg: RunConfig, sizes: list[int], device: str) -> str:
    """What a probe's figures depend on: the model files, the recipe, the sizes, the device."""
    from ecoadapt.measure.environment import cpu_name
    from ecoadapt.model.compiling import AUTO_BLOCKS_FROM_STEPS

    train = dataclasses.asdict(cfg.train)
    long_run = (cfg.train.max_steps or 0) >= AUTO_BLOCKS_FROM_STEPS
    parts = {
        "model": base_cache.model_identity(cfg.model),
        "objective": cfg.model.objective,
        "seq": cfg.data.max_seq_len,
        "mlm_probability": cfg.data.mlm_probability,
        "precision": dataclasses.asdict(cfg.precision),
        "lora": dataclasses.asdict(cfg.lora),
        "train": {
            k: train[k]
            for k in ("gradient_checkpointing", "trainable_layers", "compile", "device", "max_memory_gb", "optimizer")
        },
        "measure": [cfg.measure.energy, cfg.measure.cpu_watts_per_core, cfg.measure.memory_watts_per_gib],
        "sizes": sizes,
        "auto_compile_long_run": long_run if cfg.train.compile == "auto" else None,
        "probe_version": PROBE_VERSION,
        "device": device if device != "cpu" else f"cpu|{cpu_name()}",
        "versions": [package_version(p) for p in ("ecoadapt", "torch", "transformers", "peft", "bitsandbytes")],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _device_name(cfg: RunConfig) -> str:
    import torch

    device = pick_device(cfg.train.device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def measured_trials(cfg: RunConfig, steps: int | None = None, fresh: bool = False) -> dict[str, Any]:
    """The recipe's probe (:func:`ecoadapt.forecast.trial_steps.measure_trial_steps`) for a run of ``steps`` steps
    (train.compile's auto depends on it; default train.max_steps), from the cache or measured
    now in a child process; ``cached`` says which. An ``out_of_memory`` key: it did not fit."""
    # The child builds the recipe for a run of this length (train.compile's auto depends on it).
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=steps or cfg.train.max_steps))
    key = _key(cfg, costs.trial_sizes(cfg.train.micro_batch_size), _device_name(cfg))
    path = storage.cache_root() / "plan" / f"{key}.json"
    cached = None if fresh else storage.read_cache(path, say)
    if isinstance(cached, dict):
        return {**cached, "cached": True}
    result = _run_trials(cfg, costs.trial_sizes(cfg.train.micro_batch_size))
    if "out_of_memory" in result and cfg.train.micro_batch_size > 1:
        # The run's own micro-batch does not fit: forecast it from smaller ones, and say so.
        smaller = _run_trials(cfg, costs.trial_sizes(cfg.train.micro_batch_size, fits=False))
        result = smaller if "out_of_memory" in smaller else {**smaller, "extrapolated": result["out_of_memory"]}
    storage.atomic_write_text(path, json.dumps(result, indent=1))
    return {**result, "cached": False}


def _run_trials(cfg: RunConfig, sizes: list[int]) -> dict[str, Any]:
    """:func:`ecoadapt.forecast.trial_steps.measure_trial_steps` at each size, each in a fresh child process (a CPU's
    resident peak depends on what the process held before); the results merged."""
    merged: dict[str, Any] = {}
    env = heap.with_huge_pages(os.environ) if cfg.lora.quantize else None  # as `adapt` runs it
    with tempfile.TemporaryDirectory() as tmp:
        config_path = Path(tmp) / "config.json"
        config_path.write_text(json.dumps(cfg.to_dict()))
        for size in sizes:
            out_path = Path(tmp) / f"probe-{size}.json"
            command = [
                sys.executable,
                "-m",
                "ecoadapt.forecast.trial_steps",
                str(config_path),
                str(size),
                str(out_path),
            ]
            done = run_child(command, env, timeout_s=TRIAL_TIMEOUT_S, capture_stderr=True, stdout=subprocess.DEVNULL)
            if done.exit_status != 0 or not out_path.exists():
                lines = [line for line in "".join(done.tail).strip().splitlines() if line.strip()]
                why = "timed out" if done.timed_out else (lines[-1] if lines else f"exit status {done.exit_status}")
                raise UserError(f"plan: the trial steps at micro-batch {size} failed ({why})")
            one: dict[str, Any] = json.loads(out_path.read_text())
            if "out_of_memory" in one:
                return {"out_of_memory": f"at micro-batch {size}: {one['out_of_memory']}", "probed_at": sizes}
            merged = {**one, "sizes": merged.get("sizes", []) + one["sizes"]}
    return merged


def tokens_per_step(cfg: RunConfig) -> int:
    """Input tokens of one optimizer step, all processes."""
    return cfg.train.micro_batch_size * cfg.train.grad_accum * cfg.data.max_seq_len * cfg.parallel.nproc


def recipe_forecast(cfg: RunConfig, steps: int, probed: dict[str, Any]) -> dict[str, Any]:
    """The forecast of ``cfg``'s recipe for a run of ``steps`` steps (budgets applied)."""
    if "out_of_memory" in probed:
        return {"out_of_memory": probed["out_of_memory"], "probed_at": probed.get("probed_at", [])}
    per = tokens_per_step(cfg)
    step = costs.per_step(probed, cfg.train.micro_batch_size, cfg.train.grad_accum, per)
    b = cfg.budget
    whole = costs.run_length(step, steps, per, b.energy_j, b.time_s, b.tokens)
    tokens = whole["steps"] * per
    return {
        "mj_per_token": 1000.0 * whole["joules"] / tokens if tokens else None,
        **step,
        **whole,
        "energy_method": probed["energy_method"],
        "meter": probed["meter"],
        "memory_figure": probed["memory_figure"],
        "cached_probe": probed.get("cached", False),
        "source": probed.get("source", "trial steps in child processes (`ecoadapt plan`)"),
        "extrapolated": probed.get("extrapolated"),
    }


def recipes(cfg: RunConfig, grid: bool, device: str) -> list[tuple[str, RunConfig]]:
    """The config's own recipe, and with ``grid`` its variants: precision modes this device runs
    (fp32, bf16, bf16-pure on a CPU; with tf32 and fp16 on a GPU) x LoRA x checkpointing."""
    own = [(_name(cfg), cfg)]
    if not grid:
        return own
    modes = [name for name, mode in MODES.items() if mode.on_cpu or device != "cpu"]
    raw = cfg.to_dict()
    out = []
    for mode in modes:
        for lora in (False, True):
            for ckpt in (False, True):
                variant = json.loads(json.dumps(raw))
                variant["precision"].update(mode=mode, layers=None)
                variant["lora"]["enabled"] = lora
                variant["lora"]["quantize"] = variant["lora"]["quantize"] if lora else None  # a frozen base needs LoRA
                variant["train"]["gradient_checkpointing"] = ckpt
                point = from_dict(variant, "plan grid")
                out.append((_name(point), point))
                if lora and ckpt and not variant["lora"]["quantize"]:
                    qlora = _qlora_point(variant)  # QLoRA: the lightest recipe there is
                    out += [(_name(qlora), qlora)] if qlora is not None else []
    names = {name for name, _ in out}
    return out if own[0][0] in names else own + out


def _qlora_point(variant: dict[str, Any]) -> RunConfig | None:
    """``variant`` with an NF4 base, where QLoRA can be a point of the grid: bitsandbytes is
    here, and nothing the config sets refuses a quantized base (merging, an explicit compile,
    FSDP, the 8-bit optimizer's limits: the config's own checks say so)."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        return None
    try:
        return from_dict({**variant, "lora": {**variant["lora"], "quantize": "nf4"}}, "plan grid")
    except UserError:
        return None


def _name(cfg: RunConfig) -> str:
    parts = [cfg.precision.mode + ("+layers" if cfg.precision.layers else "")]
    parts += [f"qlora-{cfg.lora.quantize}" if cfg.lora.quantize else "lora"] if cfg.lora.enabled else ["full"]
    parts += ["ckpt"] if cfg.train.gradient_checkpointing else []
    parts += [cfg.train.optimizer] if cfg.train.optimizer != "adamw" else []
    return " ".join(parts)


def run(
    cfg: RunConfig,
    steps: int,
    memory_gb: float | None = None,
    energy_j: float | None = None,
    grid: bool = False,
    fresh: bool = False,
    log: Any = None,
) -> list[dict[str, Any]]:
    """Forecast each recipe (see :func:`recipes`) for ``steps`` steps; mark what fits."""
    if from_shapes.weights_missing(cfg):
        raise UserError(
            f"plan: {cfg.model.name_or_path} holds a config.json and no weights, so no trial steps can run here; "
            "plan --device NAME (a10, t4, l4, ...) projects it from its shapes"
        )
    rows = []
    choice = precision_choice.resolve(cfg, pick_device(cfg.train.device))
    if choice is not None and log is not None:
        log(f"precision.mode auto: {choice['mode']} ({choice['why']})")
    candidates = recipes(cfg, grid, _device_name(cfg))
    for i, (name, point) in enumerate(candidates, 1):
        if log is not None:
            log(f"probing {name} ({i}/{len(candidates)}) ...")
        f = recipe_forecast(point, steps, measured_trials(point, steps, fresh))
        if "out_of_memory" in f:
            rows.append({"recipe": name, **f, "fits": {"memory": False, "energy": None}})
            continue
        rows.append({"recipe": name, **f, "fits": costs.fits(f["peak_bytes"], f["joules"], memory_gb, energy_j)})
    return rows


def table(rows: list[dict[str, Any]], memory_gb: float | None, energy_j: float | None) -> str:
    """The forecast as a text table, with what fits and the cheapest recipe that does."""
    head = (
        f"{'recipe':<24} {'peak GiB':>9} {'s/step':>8} {'tok/s':>8} {'steps':>6} {'time s':>8} {'energy J':>10} "
        f"{'mJ/tok':>7}  fits"
    )
    lines = [head]
    for r in rows:
        if "out_of_memory" in r:
            lines.append(f"{r['recipe']:<24} out of memory even at the smaller micro-batches {r['probed_at']}")
            continue
        fit = [k for k, v in r["fits"].items() if v is False]
        mark = "no: " + ", ".join(fit) if fit else ("yes" if any(v for v in r["fits"].values()) else "-")
        cut = f" ({r['stopped_by']})" if r["stopped_by"] else ""
        lines.append(
            f"{r['recipe']:<24} {r['peak_bytes'] / GIB:>9.2f} {r['step_s']:>8.3f} {r['tokens_per_s']:>8,.0f} "
            f"{r['steps']:>6}{cut} {r['time_s']:>8.1f} {r['joules']:>10,.0f} {r['mj_per_token']:>7.2f}  {mark}"
        )
    ok = [r for r in rows if "out_of_memory" not in r and all(v is not False for v in r["fits"].values())]
    method = rows[0].get("energy_method", "estimated") if rows else "estimated"
    figure = rows[0].get("memory_figure", "") if rows else ""
    lines.append(f"energy {method} by the trial steps' meter (mJ/tok: per training token); memory: {figure}")
    if memory_gb is not None or energy_j is not None:
        if ok:
            best = min(ok, key=lambda r: r["joules"])
            lines.append(
                f"cheapest that fits: {best['recipe']} ({best['joules']:,.0f} J, {best['peak_bytes'] / GIB:.2f} GiB); "
                "a forecast says nothing of accuracy: compare held-out losses with `ecoadapt sweep`"
            )
        else:
            lines.append("no recipe fits: raise the limits, shorten data.max_seq_len, or lower train.micro_batch_size")
    return "\n".join(lines)


def planned_steps(cfg: RunConfig, base: Path | None) -> tuple[int, str]:
    """The run's step count and where it came from: train.max_steps, or train.epochs over the
    corpus's training blocks (the corpus is tokenized into the token store the run will use)."""
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps, "train.max_steps"
    from ecoadapt.data import corpus
    from ecoadapt.model import pretrained
    from ecoadapt.train.loop import total_steps

    loaded = pretrained.load(cfg.model, cfg.data.max_seq_len, cfg.train.seed)
    blocks = corpus.build(cfg.data, loaded.tokenizer, loaded.objective, base)
    n = total_steps(cfg.train, len(blocks.train) // cfg.parallel.nproc)
    return n, f"train.epochs {cfg.train.epochs:g} over {len(blocks.train):,} blocks"


def beside_measured(cfg: RunConfig, planned: int, probed: dict[str, Any] | None, summary: Any) -> dict[str, Any] | None:
    """summary.json's ``forecast``: the forecast for the ``planned`` steps, and the measured
    figures beside it (peak memory, seconds per step, training joules) with their ratios."""
    if probed is None or "error" in probed:
        return probed
    f = recipe_forecast(cfg, planned, probed)
    if "out_of_memory" in f:
        return f
    memory, energy = summary.memory or {}, summary.energy or {}
    measured = {
        "steps": summary.steps,
        "time_s": summary.time_s,
        "peak_bytes": memory.get(memory.get("compare_with", "peak_bytes")),
        "train_joules": energy.get("train_joules"),
    }
    return {**f, "versus_measured": costs.compare(f, measured)}


def on_device(
    cfg: RunConfig, steps: int, name: str, mfu: float, grid: bool = False, fresh: bool = False, log: Any = None
) -> tuple[list[dict[str, Any]], str]:
    """:func:`ecoadapt.forecast.devices.project` of each recipe (the grid that device runs, with
    ``grid``) on the device called ``name`` (a GPU, or a CPU machine's ``cpu-<N>gb``), from trial
    steps on this machine at micro-batches of 1 and 2 blocks, or from the shapes where this
    machine cannot load the model; the rows and their table."""
    if not 0 < mfu <= 1:
        raise UserError(f"plan --mfu {mfu}: a fraction of the peak, in (0, 1]")
    target = devices.device(name, cfg.measure.cpu_watts_per_core, cfg.measure.memory_watts_per_gib)
    if cfg.precision.mode == "auto":  # what auto picks on that device
        cfg = dataclasses.replace(cfg, precision=dataclasses.replace(cfg.precision, mode=_auto_mode(target)))
    rows = []
    candidates = recipes(cfg, grid, "cpu" if target.kind == "cpu" else target.name)
    shapes_only = from_shapes.weights_missing(cfg) or not _loads_here(cfg)
    for i, (recipe, point) in enumerate(candidates, 1):
        if log is not None:
            how = "from its shapes" if shapes_only else "trial steps on this machine"
            log(f"{recipe}: {how} ({i}/{len(candidates)}) ...")
        probe = from_shapes.probe(point, target.kind) if shapes_only else _small_trials(point, recipe, steps, fresh)
        micro = _micro_batch_on(point, probe, target)
        per = tokens_per_step(point)
        if target.kind == "cpu" and "sizes" in probe:  # this machine's own steps: its speed, measured
            step = costs.per_step(probe, micro, point.train.grad_accum, per)
            row = devices.from_trial_steps(step, target, point.precision.mode, per, steps)
        else:
            row = devices.project(probe, target, point.precision.mode, micro, per, steps, mfu)
            if target.kind == "cpu" and point.lora.quantize:
                # Measured at 1.1B: 31 s a step of 128 tokens against 2 s at MFU 0.3 (BENCHMARKS.md).
                row["notes"].append("a quantized base dequantizes every weight at every pass on a CPU: far slower")
                row["time_understated"] = True
        rows.append({"recipe": recipe, "micro_batch": micro, "source": probe.get("source"), **row})
    return rows, devices.table(rows, target, mfu)


def _auto_mode(target: devices.Device) -> PrecisionMode:
    """precision.mode auto on ``target``: bf16 on a GPU with bf16 tensor cores, else fp16; on a
    CPU machine what auto picks here (bf16 where this CPU's bf16 matmuls are fast enough)."""
    if target.kind == "cpu":
        import torch

        return "bf16" if precision_choice.choose(torch.device("cpu"))["mode"] == "bf16" else "fp32"
    return "bf16" if "bf16" in target.peaks else "fp16"


TRIALS_SOURCE = "trial steps on this machine at micro-batches of 1 and 2 blocks, scaled to the device's"


def _small_trials(point: RunConfig, recipe: str, steps: int, fresh: bool) -> dict[str, Any]:
    """The recipe's trial steps on this CPU at micro-batches 1 and 2 (for a projection)."""
    small = dataclasses.replace(
        point,
        train=dataclasses.replace(
            point.train,
            micro_batch_size=2,
            grad_accum=1,
            fill_micro_batch=False,
            tokens_per_step=None,
            device="cpu",
            compile=False,
        ),
    )
    probe = measured_trials(small, steps, fresh)
    if "flops_per_token" not in probe:  # cached by a version that did not count them
        probe = measured_trials(small, steps, fresh=True)
    if "out_of_memory" in probe:
        raise UserError(f"plan --device: {recipe} does not fit this machine even at 1 block ({probe['out_of_memory']})")
    return {**probe, "source": TRIALS_SOURCE}


def _loads_here(cfg: RunConfig) -> bool:
    """Whether this machine can hold the recipe's weights, states and more for trial steps (else:
    the recipe is planned from its shapes)."""
    from ecoadapt.model import load_spec

    probe = from_shapes.probe(cfg, device_type="cpu")
    needed = sum(int(v) for v in probe["static_bytes"].values())
    return needed * 1.2 < load_spec.available_bytes(pick_device("cpu"))


def _micro_batch_on(cfg: RunConfig, probe: dict[str, Any], target: devices.Device) -> int:
    """The run's micro-batch, or with train.micro_batch_size: auto what the run would choose on
    ``target`` (:func:`ecoadapt.train.micro_batch.fitting_splits`, as on the device itself: the
    memory left after the weights and the CUDA context, or a CPU process's own resident set)."""
    if not cfg.train.fill_micro_batch:
        return cfg.train.micro_batch_size
    blocks, parts = cfg.train.micro_batch_size, probe["static_bytes"]
    free = target.capacity_bytes - int(parts.get("weights", 0)) - target.overhead_for(probe)
    later = int(parts.get("gradients", 0)) + int(parts.get("optimizer", 0))
    per_row = int(devices.activation_bytes_per_row(probe))
    splits, _ = micro_batch.fitting_splits(blocks, max(0, free), later, per_row)
    return micro_batch.part_size(blocks, splits)
