"""The ``data`` section of a run's config: the domain corpus, and the general text beside it
(its own module to keep run.py small; ``ecoadapt.config`` re-exports it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

MLM_PROBABILITY = 0.15  # BERT's masking rate (Devlin et al. 2019)


@dataclass
class DataConfig:
    """The domain corpus for continued pre-training."""

    train: list[str] = field(default_factory=list)
    """Files, globs or folders: .txt (one document per line; blank lines are skipped), .jsonl,
    .json (a list of records, or an object holding them under data.json_key), .csv, .tsv,
    .parquet, a folder written by datasets' save_to_disk; .txt/.jsonl/.csv/.tsv may be .gz or
    .zst compressed. Also builtin:NAME for a corpus that ships with Python
    (builtin:python-docstrings), and hf:ORG/NAME for a hub dataset read through datasets'
    cache (?config=NAME&split=SPLIT&revision=REV; nothing fetched under HF_HUB_OFFLINE=1)."""
    text_field: str = "text"
    """Record field (or CSV/TSV column) that holds the text; ignored for .txt."""
    json_key: str | None = None
    """Key of the record list inside a .json object; detected when exactly one list of
    records holds data.text_field (COCO-style caption files: annotations)."""
    general_text_field: str | None = None
    """Record field holding the text in data.general_eval's files (default: data.text_field)."""
    max_seq_len: int = 128
    """Tokens per training block (documents are packed into blocks; no padding)."""
    eval_fraction: float = 0.05
    """Fraction of documents held out for evaluation, chosen by a hash of each document's
    text: deterministic, and duplicates never straddle the split."""
    eval_max_blocks: int = 64
    """At most this many held-out blocks are evaluated (evaluation time grows with it); the same
    bound holds for data.general_eval."""
    general_eval: list[str] = field(default_factory=lambda: ["builtin:general-english"])
    """General-domain text whose loss is measured before and after training, beside the held-out
    loss and in its windows: what adapting to the domain cost the model elsewhere (forgetting),
    with a 95% interval paired over the same batches. Files, globs or builtin:NAME as in
    data.train, every document evaluated (data.eval_max_blocks blocks at most), none of them may
    be a training document; default builtin:general-english, a small sample of everyday English
    shipped with ecoadapt (for a standard measure give your own general corpus, or WikiText's
    test split through hf:); [] turns it off."""
    bad_records: Literal["error", "skip"] = "error"
    """A record without usable text (a .jsonl line that is not JSON, a missing or non-text
    field): stop with an error naming it (error), or skip it and count it in the summary's
    data.bad_records (skip)."""
    mlm_probability: float = MLM_PROBABILITY
    """Fraction of tokens masked for masked LM (80% [MASK], 10% random, 10% unchanged)."""
    cache_dir: str | None = None
    """Where token stores go (memory-mapped token files, keyed by the files' contents, the
    tokenizer, the objective and the split; any sequence length reads the same store); default
    the tokens/ folder of ecoadapt's cache ($ECOADAPT_CACHE, else ~/.cache/ecoadapt). Needs about
    1-2 bytes per character of text."""
    lock_timeout_s: float = 3600.0
    """How long a run waits for another process that is preparing the same token store (s),
    saying which process it waits for, before giving up with a message. A process that died
    holds no lock."""
