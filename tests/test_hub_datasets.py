"""Corpora from the hub (data.train: hf:ORG/NAME) by the rules models follow, against a fake hub on
localhost serving a dataset repository: downloaded once into datasets' cache, then read from it
with no request, nothing fetched under HF_HUB_OFFLINE=1, and clear errors naming the key."""

import json
import os
import subprocess
import sys

import pytest

from ecoadapt.core.errors import UserError
from ecoadapt.data import hub_datasets, readers
from helpers.fake_hub import FakeHub

pytest.importorskip("datasets")

BUILD = (
    "from ecoadapt.config import DataConfig, ModelConfig\n"
    "from ecoadapt.data import corpus\n"
    "from ecoadapt.model import pretrained\n"
    "tok = pretrained.load_tokenizer(ModelConfig({model!r}))\n"
    "data = DataConfig(train=[{source!r}], text_field='caption', max_seq_len=16, eval_fraction=0.2)\n"
    "stats = corpus.build(data, tok, 'clm').stats\n"
    "print('STATS', stats['train_documents'] + stats['eval_documents'], stats['cache'])\n"
)


def build_in_child(tmp_path, model, source, endpoint, offline=False):
    """Tokenize ``source`` in a fresh interpreter (datasets reads its endpoint at import)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update({"HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1"})
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    code = BUILD.format(model=str(model), source=source)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)


@pytest.fixture
def dataset_repo(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    rows = [{"caption": f"a photo of a red can number {i}", "id": i} for i in range(60)]
    (repo / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return repo


def test_a_hub_corpus_downloads_once_then_is_read_from_the_cache_even_offline(tmp_path, tiny_llama, dataset_repo):
    with FakeHub(dataset_repo, "org/captions", repo_type="dataset") as hub:
        first = build_in_child(tmp_path, tiny_llama, "hf:org/captions", hub.endpoint)
        assert first.returncode == 0, first.stderr[-2000:]
        assert "STATS 60 miss" in first.stdout  # every row, tokenized into the store
        assert ("GET", "/datasets/org/captions/resolve/" + "0123456789abcdef0123456789abcdef01234567/train.jsonl") in [
            (m, p.split("?")[0]) for m, p in hub.requests
        ]
        assert (tmp_path / "hf" / "datasets").is_dir()  # datasets' own cache, under HF_HOME
        hub.requests.clear()
        offline = build_in_child(tmp_path, tiny_llama, "hf:org/captions", hub.endpoint, offline=True)
        assert offline.returncode == 0, offline.stderr[-2000:]
        assert "STATS 60 hit" in offline.stdout  # the same contents: the token store is reused
        assert hub.requests == []  # not one request
        part = build_in_child(tmp_path, tiny_llama, "hf:org/captions?split=train[:20]", hub.endpoint, offline=True)
        assert "STATS 20 miss" in part.stdout, part.stderr[-2000:]


def test_a_hub_corpus_not_cached_under_hf_hub_offline_is_a_clear_error_without_a_request(
    tmp_path, tiny_llama, dataset_repo
):
    with FakeHub(dataset_repo, "org/captions", repo_type="dataset") as hub:
        done = build_in_child(tmp_path, tiny_llama, "hf:org/captions", hub.endpoint, offline=True)
        assert done.returncode != 0 and hub.requests == []
    assert "data.train: hf:org/captions is not in the local datasets cache" in done.stderr
    assert "datasets.load_dataset('org/captions', split='train')" in done.stderr  # how to fetch it


@pytest.mark.parametrize(
    ("source", "says"),
    [
        ("hf:not a/valid id", "is not a hub dataset id"),
        ("hf:org/captions?shard=2", "option 'shard' is unknown"),
        ("hf:org/captions?split=train&split=test", "option 'split' is unknown, repeated"),
    ],
)
def test_a_malformed_hub_source_is_refused_naming_the_key(source, says):
    with pytest.raises(UserError, match="data.train") as error:
        readers.resolve([source])
    assert says in str(error.value)


def test_options_and_a_missing_text_column_are_named(monkeypatch):
    ref = hub_datasets.parse("hf:org/set?config=es&split=test&revision=v1")
    assert ref == hub_datasets.HubDataset("org/set", "es", "test", "v1")

    import datasets

    rows = datasets.Dataset.from_dict({"body": [f"row {i}" for i in range(2500)]})  # a set as load returns it
    monkeypatch.setattr(hub_datasets, "load", lambda source: rows)
    with pytest.raises(UserError, match=r"data\.text_field: hf:org/set has no column 'text'; its columns: body"):
        list(hub_datasets.records("hf:org/set", "text"))
    read = list(hub_datasets.records("hf:org/set", "body"))  # in slices of 1,024 rows, every row once, in order
    assert [record["body"] for _, record in read] == [f"row {i}" for i in range(2500)]
    assert read[-1][0] == "hf:org/set: row 2499"
