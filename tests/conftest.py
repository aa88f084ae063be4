"""Tiny models and corpora that the tests build themselves: no downloads, no ../shared."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from helpers.tiny_models import build_tiny_bert, build_tiny_llama, sentences


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


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The whole session's cache, never the user's: set before any fixture runs, so module- and
    session-scoped fixtures (and the processes they start) write here too. Offline throughout."""
    cache = tmp_path_factory.mktemp("session-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ECOADAPT_CACHE", str(cache))
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield cache


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _session_cache: Path) -> None:
    """Each test gets its own token cache. The trial steps of `ecoadapt plan` are shared by the
    session, as a user's repeated recipes share them: they are keyed by model files, recipe and
    device, so a test that needs fresh ones uses its own model or recipe."""
    cache = tmp_path / "token-cache"
    monkeypatch.setenv("ECOADAPT_CACHE", str(cache))
    cache.mkdir(parents=True, exist_ok=True)
    (_session_cache / "plan").mkdir(exist_ok=True)
    (cache / "plan").symlink_to(_session_cache / "plan", target_is_directory=True)
