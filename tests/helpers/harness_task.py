"""A domain and a harness task in it that adaptation can learn: the corpus always follows
"holding" with "bottle", and each harness item asks which of "bottle" and "lamp" comes after a
sentence that ends in "holding"."""

from __future__ import annotations

import json
import random
from pathlib import Path

from helpers.tiny_models import WORDS

OTHERS = [w for w in WORDS if w not in ("holding", "bottle", "lamp")]


def _prefix(rng: random.Random) -> str:
    return " ".join(rng.choice(OTHERS) for _ in range(rng.randint(2, 5)))


def write_domain(folder: Path, documents: int = 300, items: int = 40) -> tuple[Path, Path]:
    """The corpus (``corpus.jsonl``, field "text") and the task YAML (``holding.yaml`` over
    ``items.jsonl``, a relative data file) in ``folder``; returns (corpus, task YAML)."""
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.jsonl"
    corpus.write_text(
        "".join(json.dumps({"text": f"{_prefix(rng)} holding bottle {_prefix(rng)}"}) + "\n" for _ in range(documents))
    )
    (folder / "items.jsonl").write_text(
        "".join(json.dumps({"text": f"{_prefix(rng)} holding", "label": 0}) + "\n" for _ in range(items))
    )
    task = folder / "holding.yaml"
    task.write_text(
        "task: holding\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        "    test: items.jsonl\n"  # relative: read from the YAML's folder
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{text}}"\n'
        'doc_to_choice: ["bottle", "lamp"]\n'
        "doc_to_target: label\n"
        "metric_list:\n"
        "  - metric: acc\n"
    )
    return corpus, task
