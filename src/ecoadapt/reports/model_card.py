"""A model card with every saved model and adapter, in the Hugging Face card format.

``README.md`` (YAML metadata, then prose, as the Trainer writes one): the base model, the corpus,
the recipe, held-out loss before and after, the task's result with its interval, energy (with
method and meter), peak memory and hardware. Its metadata carry the hub's ``co2_eq_emissions``
block, so the hub shows it; ``energy.spdx.json`` beside it gives the adaptation energy as SPDX
3.0's AI-profile ``finetuningEnergyConsumption`` (in kWh, saying measured or estimated) for AI
bills of materials.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ecoadapt.core import storage
from ecoadapt.measure import carbon
from ecoadapt.results.summary import RunSummary

SPDX_CONTEXT = "https://spdx.org/rdf/3.0.1/spdx-context.jsonld"


def metadata(summary: RunSummary, folder_name: str) -> dict[str, Any]:
    """The card's YAML metadata (hub keys)."""
    config = summary.config
    model = config.get("model", {})
    energy = summary.energy or {}
    grid = carbon.grid((config.get("measure") or {}).get("grid_g_co2_per_kwh"))
    name = str(model.get("name_or_path", ""))
    meta: dict[str, Any] = {
        "library_name": "peft" if folder_name == "adapter" else "transformers",
        "tags": ["ecoadapt", "domain-adaptation", "masked-lm" if summary.objective == "mlm" else "causal-lm"],
    }
    if "/" in name and not name.startswith((".", "/", "~", "pkg:")) and not name.endswith(".gguf"):
        meta["base_model"] = name  # a hub id: the hub links the card to it
    version = (summary.environment or {}).get("ecoadapt", "")
    if energy.get("train_joules") is not None:
        meta["co2_eq_emissions"] = {
            "emissions": float(f"{grid.grams(energy['train_joules']):.6g}"),  # grams, 6 significant digits
            "source": f"ecoadapt {version}: energy {carbon.method_text(energy)}, "
            f"grid {grid.g_per_kwh:g} g CO2e/kWh ({grid.source})",
            "training_type": "fine-tuning",
            "geographical_location": (config.get("measure") or {}).get("location") or "not given",
            "hardware_used": carbon.hardware(
                summary.environment, (summary.parallel.world_size if summary.parallel else 1)
            ),
        }
    return meta


def _recipe(summary: RunSummary) -> list[str]:
    cfg = summary.config
    train, lora, precision = cfg.get("train", {}), cfg.get("lora", {}), cfg.get("precision", {})
    data = summary.data or {}
    model = summary.model
    lines = [
        f"- base model: `{cfg.get('model', {}).get('name_or_path')}`; objective: {summary.objective}",
        f"- corpus: {', '.join(map(str, data.get('sources', [])))} ({data.get('documents', 0):,} documents, "
        f"{summary.tokens or 0:,} tokens trained on)",
        f"- precision: {precision.get('mode')}; LoRA: "
        + (f"r={lora.get('r')}, alpha={lora.get('alpha')}" if lora.get("enabled") else "no")
        + f"; trainable blocks: {train.get('trainable_layers')}"
        + (f" ({len(model.trainable_blocks)} of {model.n_blocks})" if model else ""),
        f"- steps: {summary.steps}, micro-batch {train.get('micro_batch_size')} x {train.get('grad_accum')} "
        f"accumulation, lr {train.get('lr')}, seed {train.get('seed')}",
    ]
    lines += [f"- note: {n}" for n in summary.notes or []]
    return lines


def _results(summary: RunSummary) -> list[str]:
    lines = []
    if summary.eval is not None:
        e = summary.eval
        lines.append(
            f"- held-out loss: {e.loss_before:.4f} before, {e.loss:.4f} after (perplexity {e.perplexity:,.1f})"
        )
    task = summary.task
    if task is not None and task.failed:
        lines.append(f"- downstream task: failed ({task.error})")
    elif task is not None and task.verdict_text and task.base is not None and task.adapted is not None:
        lines.append(
            f"- downstream task ({task.metric}, {task.mode}): base {task.base:.4f}, adapted "
            f"{task.adapted:.4f}; {task.verdict_text}"
        )
    return lines


def _costs(summary: RunSummary) -> list[str]:
    energy = summary.energy or {}
    memory = summary.memory or {}
    lines = []
    if energy:
        joules = energy.get("train_joules", 0.0)
        lines.append(
            f"- adaptation energy: {joules:,.0f} J ({carbon.kwh(joules):.6f} kWh), {carbon.method_text(energy)}; "
            f"all phases {energy.get('joules', 0):,.0f} J"
        )
    if memory.get("train_peak_bytes") is not None:
        lines.append(
            f"- peak memory of training: {memory['train_peak_bytes'] / 2**20:,.0f} MiB ({memory.get('device')})"
        )
    lines.append(
        f"- hardware: {carbon.hardware(summary.environment, summary.parallel.world_size if summary.parallel else 1)}"
    )
    lines.append(f"- training time: {summary.time_s or 0:,.1f} s, {summary.tokens_per_s or 0:,.0f} tokens/s")
    return lines


def body(summary: RunSummary, folder_name: str) -> str:
    """The card's prose: recipe, results, costs, and how to load it."""
    name = summary.config.get("model", {}).get("name_or_path")
    auto = "AutoModelForMaskedLM" if summary.objective == "mlm" else "AutoModelForCausalLM"
    load = (
        "from peft import PeftModel\nmodel = PeftModel.from_pretrained(base_model, 'adapter')"
        if folder_name == "adapter"
        else f"from transformers import {auto}\nmodel = {auto}.from_pretrained('model')"
    )
    parts = [
        f"# {name}, adapted by ecoadapt\n",
        "Continued pre-training (domain adaptation) with ecoadapt (cite it with its CITATION.cff); every "
        "figure below comes from the run's `summary.json`.\n",
        "## Recipe\n",
        *_recipe(summary),
        "\n## Results\n",
        *_results(summary),
        "\n## Cost\n",
        *_costs(summary),
        "\n## Use\n",
        f"```python\n{load}\n```\n",
    ]
    return "\n".join(parts)


def spdx(summary: RunSummary, folder: Path) -> dict[str, Any]:
    """The adaptation's energy as an SPDX 3.0 AI package's ``finetuningEnergyConsumption``."""
    energy = summary.energy or {}
    name = str(summary.config.get("model", {}).get("name_or_path", "model"))
    kwh_text = f"{carbon.kwh(energy.get('train_joules', 0.0)):.12f}"  # xsd:decimal: no exponent
    return {
        "@context": SPDX_CONTEXT,
        "@graph": [
            {
                "type": "ai_AIPackage",
                "spdxId": f"urn:ecoadapt:{folder.parent.name}:{folder.name}",
                "name": f"{name} adapted ({folder.name})",
                "comment": f"adaptation energy {carbon.method_text(energy)}; written by ecoadapt",
                "ai_energyConsumption": {
                    "type": "ai_EnergyConsumption",
                    "ai_finetuningEnergyConsumption": [
                        {
                            "type": "ai_EnergyConsumptionDescription",
                            "ai_energyQuantity": kwh_text,
                            "ai_energyUnit": "kilowattHour",
                        }
                    ],
                },
            }
        ],
    }


def write(run_dir: Path, summary: RunSummary) -> list[Path]:
    """README.md and energy.spdx.json into every saved folder of the run (atomically)."""
    from huggingface_hub import ModelCardData

    written = []
    for name in summary.model.saved if summary.model else []:
        folder = run_dir / name
        meta = ModelCardData(**metadata(summary, name)).to_yaml()
        storage.atomic_write_text(folder / "README.md", f"---\n{meta}\n---\n\n{body(summary, name)}")
        storage.atomic_write_text(folder / "energy.spdx.json", json.dumps(spdx(summary, folder), indent=2) + "\n")
        written.append(folder / "README.md")
    return written
