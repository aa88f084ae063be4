"""Hub models the way the Hugging Face ecosystem loads them.

The local cache first (no network when the model is there); a download when online, once,
into the same cache transformers uses; no network use at all under ``HF_HUB_OFFLINE=1`` or
``model.offline: true``. When the model is missing and the hub is out of reach, the error
comes within seconds (one request, a short timeout, no retries) and says how to fetch the
model beforehand.
"""

from __future__ import annotations

import os
from pathlib import Path

from ecoadapt.core.errors import UserError, first_line
from ecoadapt.core.progress import say

TIMEOUT_S = 10.0  # one request's connect/read limit: a blackholed network fails in seconds
# What a model needs to load: config, weights, tokenizer. Never code (no trust_remote_code),
# and only one weight format (safetensors when the repository has it).
ALWAYS = ["*.json", "*.txt", "*.model", "*.tiktoken", "tokenizer*"]


def is_offline(setting: bool) -> bool:
    """Whether the hub must not be contacted: ``model.offline``, or the ecosystem's switch
    (``HF_HUB_OFFLINE``, read now, as the hub client reads it)."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    return setting or flag or bool(constants.HF_HUB_OFFLINE)


def how_to_fetch(repo_id: str, revision: str | None) -> str:
    """The command that puts the model in the cache on a machine that is online."""
    rev = f" --revision {revision}" if revision else ""
    return f"hf download {repo_id}{rev} (then copy ~/.cache/huggingface/hub, or set HF_HOME, on this machine)"


def snapshot(repo_id: str, revision: str | None = None, offline: bool = False) -> Path:
    """The local folder of hub model ``repo_id``: from the cache, else downloaded once.

    Raises:
        UserError: not a valid hub id, not cached and offline, or the hub cannot be reached, or
            no such model.
    """
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise UserError(
            f"model.name_or_path: '{repo_id}' is neither a local folder or file nor a valid hub id "
            "(ORG/NAME: letters, digits, '-', '_' and '.', not starting or ending with '-' or '.')"
        ) from None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    if is_offline(offline):
        raise UserError(
            f"model.name_or_path: '{repo_id}' is not in the local Hugging Face cache, and the hub may not be "
            "contacted (HF_HUB_OFFLINE=1 or model.offline: true). "
            f"Fetch it beforehand: {how_to_fetch(repo_id, revision)}"
        )
    return _download(repo_id, revision)


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = HfApi().model_info(repo_id, revision=revision, timeout=TIMEOUT_S)
        files = [s.rfilename for s in info.siblings or []]
        weights = ["*.safetensors"] if any(f.endswith(".safetensors") for f in files) else ["*.bin"]
        say(f"downloading {repo_id} from the hub (once; later runs read the cache) ...")
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=ALWAYS + weights, etag_timeout=TIMEOUT_S)
    except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError) as e:
        raise UserError(f"model.name_or_path: '{repo_id}' cannot be downloaded: {first_line(e)}") from None
    except (HfHubHTTPError, OSError, ValueError) as e:  # unreachable, refused, timed out, DNS
        raise _unreachable(repo_id, revision, e) from None
    except Exception as e:
        if type(e).__module__.split(".")[0] in TRANSPORTS:  # httpx's errors are not OSErrors
            raise _unreachable(repo_id, revision, e) from None
        raise
    return Path(str(folder))


TRANSPORTS = ("httpx", "httpx2", "httpcore", "requests", "urllib3")


def _unreachable(repo_id: str, revision: str | None, error: BaseException) -> UserError:
    return UserError(
        f"model.name_or_path: '{repo_id}' is not in the local cache and the hub could not be reached "
        f"({type(error).__name__}: {first_line(error)}). Fetch it beforehand: {how_to_fetch(repo_id, revision)}"
    )
