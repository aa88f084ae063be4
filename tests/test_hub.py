"""Hub models as the ecosystem loads them, against a fake hub on localhost (never the network):
cache first, one download when online, no request at all when offline, a fast clear error when
the hub is out of reach."""

import os
import socket
import subprocess
import sys
import time

import pytest

from helpers.fake_hub import FakeHub

LOAD = (
    "from ecoadapt.model import pretrained\n"
    "from ecoadapt.config import ModelConfig\n"
    "loaded = pretrained.load(ModelConfig({repo!r}, offline={offline}, revision={revision!r}), 16)\n"
    "print('LOADED', loaded.source, loaded.objective)\n"
)


def load_in_child(tmp_path, repo, endpoint, offline_env=False, offline_cfg=False, revision=None):
    """Load ``repo`` in a fresh interpreter (the hub client reads its endpoint at import)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update({"HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1"})
    if offline_env:
        env["HF_HUB_OFFLINE"] = "1"
    code = LOAD.format(repo=repo, offline=offline_cfg, revision=revision)
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    return done, time.perf_counter() - t0


def test_a_hub_model_downloads_once_then_comes_from_the_cache(tmp_path, tiny_bert):
    with FakeHub(tiny_bert, "org/tiny-bert") as hub:
        first, _ = load_in_child(tmp_path, "org/tiny-bert", hub.endpoint)
        assert first.returncode == 0, first.stderr
        assert "LOADED org/tiny-bert mlm" in first.stdout  # the summary names the hub id
        assert (tmp_path / "hf" / "hub" / "models--org--tiny-bert" / "refs" / "main").is_file()  # the shared cache
        assert any("/resolve/" in path for _, path in hub.requests)  # the weights came over HTTP
        assert "downloading org/tiny-bert from the hub (once" in first.stderr
        hub.requests.clear()
        again, _ = load_in_child(tmp_path, "org/tiny-bert", hub.endpoint)
        assert again.returncode == 0, again.stderr
        assert hub.requests == []  # cache first: not one request
        offline, _ = load_in_child(tmp_path, "org/tiny-bert", hub.endpoint, offline_env=True)
        assert offline.returncode == 0 and hub.requests == []


@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "model.offline"])
def test_offline_means_no_request_at_all_and_says_how_to_fetch(tmp_path, tiny_bert, how):
    with FakeHub(tiny_bert, "org/tiny-bert") as hub:
        done, _ = load_in_child(
            tmp_path,
            "org/tiny-bert",
            hub.endpoint,
            offline_env=how == "HF_HUB_OFFLINE",
            offline_cfg=how != "HF_HUB_OFFLINE",
        )
        assert done.returncode != 0 and hub.requests == []
    assert "not in the local Hugging Face cache" in done.stderr and "hf download org/tiny-bert" in done.stderr


def test_an_unreachable_hub_fails_within_seconds_with_what_to_do(tmp_path):
    with socket.socket() as s:  # a port nothing listens on: connections are refused at once
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    done, seconds = load_in_child(tmp_path, "org/missing", closed)
    assert done.returncode != 0
    assert "the hub could not be reached" in done.stderr and "hf download org/missing" in done.stderr
    assert seconds < 30  # no retry storm (interpreter start and imports included)


def test_a_model_the_hub_does_not_have_is_named(tmp_path, tiny_bert):
    with FakeHub(tiny_bert, "org/tiny-bert") as hub:
        done, _ = load_in_child(tmp_path, "org/other", hub.endpoint)
    assert done.returncode != 0 and "'org/other' cannot be downloaded" in done.stderr


@pytest.mark.slow
def test_a_revision_is_asked_for_and_kept_under_its_name(tmp_path, tiny_bert):
    with FakeHub(tiny_bert, "org/tiny-bert") as hub:
        done, _ = load_in_child(tmp_path, "org/tiny-bert", hub.endpoint, revision="v1")
        assert done.returncode == 0, done.stderr
        assert any("/revision/v1" in path for _, path in hub.requests)
        hub.requests.clear()
        again, _ = load_in_child(tmp_path, "org/tiny-bert", hub.endpoint, revision="v1")
        assert again.returncode == 0 and hub.requests == []  # that revision now comes from the cache
    assert (tmp_path / "hf" / "hub" / "models--org--tiny-bert" / "refs" / "v1").is_file()
