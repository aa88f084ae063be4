"""Tiny models and corpora that the tests build themselves: no downloads, no ../shared."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

WORDS = [
    "the",
    "a",
    "photo",
    "of",
    "can",
    "bottle",
    "label",
    "shows",
    "white",
    "black",
    "red",
    "blue",
    "table",
    "couch",
    "lamp",
    "hand",
    "holding",
    "screen",
    "computer",
    "box",
    "food",
    "package",
    "what",
    "is",
    "this",
    "color",
    "text",
    "on",
    "front",
    "back",
]


def sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` short caption-like sentences from a small vocabulary (deterministic)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(n)]


def _word_tokenizer(specials: dict[str, str], template: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*specials.values(), *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=specials["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if template:
        cls, sep = specials["cls_token"], specials["sep_token"]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {sep}", special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])]
        )
    return PreTrainedTokenizerFast(tokenizer_object=backend, **specials)


def build_tiny_bert(folder: Path) -> Path:
    """A 2-block BERT masked LM with a word-level tokenizer, saved like a hub model."""
    from transformers import BertConfig, BertForMaskedLM

    tok = _word_tokenizer(
        {
            "unk_token": "[UNK]",
            "pad_token": "[PAD]",
            "cls_token": "[CLS]",
            "sep_token": "[SEP]",
            "mask_token": "[MASK]",
        },
        template=True,
    )
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    BertForMaskedLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def build_tiny_llama(folder: Path) -> Path:
    """A 2-block Llama causal LM with a word-level tokenizer, saved like a hub model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _word_tokenizer({"unk_token": "<unk>", "eos_token": "</s>", "pad_token": "<pad>"}, template=False)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=64, eos_token_id=tok.eos_token_id, bos_token_id=None,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=True,
    )  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked gpu run where a CUDA device is visible, multigpu where two are; else skipped."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for item in items:
        if "multigpu" in item.keywords and gpus < 2:
            item.add_marker(pytest.mark.skip(reason=f"needs 2 CUDA devices, {gpus} visible"))
        elif "gpu" in item.keywords and gpus < 1:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def corpus_jsonl(tmp_path: Path) -> Path:
    """A 400-document JSONL corpus with a "caption" field."""
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"caption": s}) + "\n" for s in sentences(400)))
    return path


@pytest.fixture(scope="session")
def _session_plan_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("plan-cache")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _session_plan_cache: Path) -> None:
    """Each test gets its own token cache (and never writes to the user's). The forecast
    probes every run makes first (measure.forecast) are shared by the session, as a user's
    repeated recipes share them: a probe is keyed by model files, recipe and device, so a test
    that needs a fresh one uses its own model or recipe."""
    cache = tmp_path / "token-cache"
    monkeypatch.setenv("ECOADAPT_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "plan").symlink_to(_session_plan_cache, target_is_directory=True)


def fit(folder, cfg, lora=None, mode="fp32", layers=None):
    """Train a tiny model on 4 repeated blocks; returns (TrainResult, model, policy)."""
    from ecoadapt import adapters, layerwise, models
    from ecoadapt import train as train_loop
    from ecoadapt.config import LoraConfig, ModelConfig
    from ecoadapt.data.batches import BlockLoader, MaskSpec
    from ecoadapt.precision import Policy

    loaded = models.load(ModelConfig(str(folder)), 16, seed=cfg.seed)
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
    result = train_loop.run(model, loader, steps, cfg, loaded.objective, policy, torch.device("cpu"))
    return result, model, policy


def heldout_loss_of(model, run_dir: Path, objective: str) -> float:
    """The held-out loss ``model`` computes on the run's own held-out blocks and masks (fp32, CPU):
    a saved model that is the trained one reproduces the run's summary."""
    from ecoadapt import config as config_mod
    from ecoadapt import models
    from ecoadapt.data import corpus
    from ecoadapt.heldout import heldout
    from ecoadapt.precision import Policy
    from ecoadapt.prepare import mask_spec

    cfg = config_mod.load(run_dir / "config.yaml")
    tokenizer = models.load_tokenizer(cfg.model)
    blocks = corpus.build(cfg.data, tokenizer, objective)
    mask = mask_spec(tokenizer, cfg.data.mlm_probability) if objective == "mlm" else None
    evaluated = blocks.eval[: cfg.data.eval_max_blocks]
    scores = heldout(
        model.eval(), evaluated, objective, mask, cfg.train.micro_batch_size, Policy("fp32", "cpu"), torch.device("cpu")
    )
    return float(scores["loss"])
