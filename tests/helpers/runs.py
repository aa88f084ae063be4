"""Configs and runs for the tests: one config writer, one ``--set`` builder, tiny training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml


def write_config(tmp_path, model, corpus, **sections):
    """A tiny run's YAML in ``tmp_path`` (run.yaml; output in ``tmp_path``/run), sections updated
    by ``sections`` (``train={"max_steps": 8}``); returns its path."""
    cfg = {
        "model": {"name_or_path": str(model)},
        "data": {"train": [str(corpus)], "text_field": "caption", "max_seq_len": 16, "eval_fraction": 0.1},
        "train": {"max_steps": 6, "micro_batch_size": 4, "lr": 5e-3, "log_every": 2},
        "output": {"dir": str(tmp_path / "run")},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def set_args(sets: dict[str, Any]) -> list[str]:
    """``{"train.max_steps": 4}`` as the command line's ``--set train.max_steps=4`` arguments."""
    return [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]


def fit_tiny(folder, cfg, lora=None, mode="fp32", layers=None):
    """Train a tiny model on 4 repeated blocks; returns (TrainResult, model, policy)."""
    from ecoadapt.config import LoraConfig, ModelConfig
    from ecoadapt.data.batches import BlockLoader, MaskSpec
    from ecoadapt.model import adapters, layerwise, pretrained
    from ecoadapt.model.precision import Policy
    from ecoadapt.train.loop import fit_model

    loaded = pretrained.load(ModelConfig(str(folder)), 16, seed=cfg.seed)
    model, _ = adapters.prepare(loaded, cfg, lora or LoraConfig())
    # Repetitive text: the same 4 blocks over and over, easy to learn.
    blocks = torch.randint(5, 30, (4, 16), generator=torch.Generator().manual_seed(1))
    mask = None
    if loaded.objective == "mlm":
        tok = loaded.tokenizer
        mask = MaskSpec(tok.mask_token_id, len(tok), tok.all_special_ids)
    loader = BlockLoader(blocks, cfg.micro_batch_size, loaded.objective, mask, cfg.seed)
    torch.manual_seed(cfg.seed)
    steps = cfg.max_steps or 1
    policy = Policy(mode, "cpu")
    policy.apply(model)
    if layers:
        layerwise.apply_map(model, layers, "cpu")
    result = fit_model(model, loader, steps, cfg, loaded.objective, policy, torch.device("cpu"))
    return result, model, policy


def heldout_loss_of(model, run_dir: Path, objective: str) -> float:
    """The held-out loss ``model`` computes on the run's own held-out blocks and masks (fp32, CPU):
    a saved model that is the trained one reproduces the run's summary."""
    from ecoadapt.config import RunConfig
    from ecoadapt.data import corpus
    from ecoadapt.model import pretrained
    from ecoadapt.model.precision import Policy
    from ecoadapt.train.heldout import heldout
    from ecoadapt.train.prepare import mask_spec

    cfg = RunConfig.from_yaml(run_dir / "config.yaml")
    tokenizer = pretrained.load_tokenizer(cfg.model)
    blocks = corpus.build(cfg.data, tokenizer, objective)
    mask = mask_spec(tokenizer, cfg.data.mlm_probability) if objective == "mlm" else None
    evaluated = blocks.eval[: cfg.data.eval_max_blocks]
    scores = heldout(
        model.eval(), evaluated, objective, mask, cfg.train.micro_batch_size, Policy("fp32", "cpu"), torch.device("cpu")
    )
    return scores.loss


def run_command(verb: str, tmp_path: Path, sets: dict[str, Any]) -> int:
    """``ecoadapt VERB`` on an empty config in ``tmp_path``, every key given by ``sets`` as
    ``--set`` overrides; returns the exit status."""
    from ecoadapt.cli import main

    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    return main([verb, str(empty), *set_args(sets)])


def adapt_summary(tmp_path: Path, sets: dict[str, Any]) -> dict[str, Any]:
    """``ecoadapt adapt`` as :func:`run_command` runs it; asserts it succeeded and returns the
    summary.json in ``sets["output.dir"]``."""
    assert run_command("adapt", tmp_path, sets) == 0
    return json.loads((Path(sets["output.dir"]) / "summary.json").read_text())
