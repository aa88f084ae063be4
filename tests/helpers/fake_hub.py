"""A stand-in for the Hugging Face hub on localhost: serves one folder as one model repository
(the API calls and file downloads huggingface_hub makes), and records every request, so tests
can say whether the network was used at all. Never touches the real hub."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """``with FakeHub(folder, "org/name") as hub:`` then ``hub.endpoint``, ``hub.requests``;
    ``repo_type="dataset"`` serves the folder as a dataset repository instead."""

    def __init__(self, folder: Path, repo_id: str, repo_type: str = "model") -> None:
        self.files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
        self.repo_id = repo_id
        self.repo_type = repo_type
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                hub.answer(self, head=False)

            def do_HEAD(self) -> None:
                hub.answer(self, head=True)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_port}"

    def __enter__(self) -> FakeHub:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def answer(self, request: http.server.BaseHTTPRequestHandler, head: bool) -> None:
        self.requests.append((request.command, request.path))
        path = request.path.split("?")[0]
        api = f"/api/{self.repo_type}s/{self.repo_id}"
        if path.startswith(f"{api}/tree/"):
            listing = [{"type": "file", "path": n, "size": len(b), "oid": _sha1(b)} for n, b in self.files.items()]
            return _send(request, json.dumps(listing).encode(), head, {"Content-Type": "application/json"})
        if path == api or path.startswith(f"{api}/revision/"):
            info = {"id": self.repo_id, "sha": COMMIT, "siblings": [{"rfilename": n} for n in self.files]}
            return _send(request, json.dumps(info).encode(), head, {"Content-Type": "application/json"})
        prefix = f"/{self.repo_id}/resolve/" if self.repo_type == "model" else f"/datasets/{self.repo_id}/resolve/"
        name = path.rsplit("/", 1)[-1]
        if path.startswith(prefix) and name in self.files:
            body = self.files[name]
            headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(body).hexdigest()}"'}
            return _send(request, body, head, headers)
        request.send_response(404)
        request.send_header("X-Error-Code", "RepoNotFound" if path.startswith("/api/") else "EntryNotFound")
        request.send_header("Content-Length", "0")
        request.end_headers()
        return None


def _sha1(body: bytes) -> str:
    return hashlib.sha1(body).hexdigest()  # git blob ids are SHA-1


def _send(request: http.server.BaseHTTPRequestHandler, body: bytes, head: bool, headers: dict[str, str]) -> None:
    request.send_response(200)
    for key, value in {**headers, "Content-Length": str(len(body))}.items():
        request.send_header(key, value)
    request.end_headers()
    if not head:
        request.wfile.write(body)
