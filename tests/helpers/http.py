"""A tiny Hugging Face hub on 127.0.0.1 for tests, on script/fileserver.py's FileServer (which tests import from here
too, with the rest of that module: static files with misbehaviours, served on 127.0.0.1 only)."""

from __future__ import annotations

import hashlib
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[2] / "script"))

from fileserver import FileServer, LocalServer, OnDisk, _Handler, _Server, etag  # noqa: E402,F401


@dataclass
class Repo:
    files: dict[str, bytes]
    gated_token: str | None = None  # when set, its files need this token (its metadata answers anyone, as the hub's)
    sha: str = field(default="")

    def __post_init__(self):
        if not self.sha:
            digest = hashlib.sha1()
            for name in sorted(self.files):
                digest.update(name.encode() + hashlib.sha1(self.files[name]).digest())
            self.sha = digest.hexdigest()


class HubServer(FileServer):
    """Enough of the Hugging Face Hub API for huggingface_hub's snapshot_download and hf_hub_download. A gated repo
    is gated as the hub gates one: its files need the token, its metadata (model info, file tree) answers anyone.

    Point huggingface_hub at it with HF_ENDPOINT=hub.base (read at import: set it before importing).
    """

    def __init__(self):
        super().__init__()
        self.repos: dict[str, Repo] = {}

    def add_repo(self, repo_id: str, files: dict[str, bytes], gated_token: str | None = None) -> Repo:
        self.repos[repo_id] = repo = Repo(files, gated_token)
        return repo

    def _check(self, handler: _Handler, repo_id: str, file: bool = False) -> Repo | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            handler.json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            return None
        if file and repo.gated_token and handler.headers.get("Authorization") != f"Bearer {repo.gated_token}":
            handler.json(401, {"error": "Access to this repo is restricted"}, {"X-Error-Code": "GatedRepo"})
            return None
        return repo

    def route(self, handler: _Handler, path: str, head: bool):
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(/revision/[^/]+)?", path)
        if m:
            repo = self._check(handler, m.group(1))
            if repo:
                handler.json(200, {"id": m.group(1), "sha": repo.sha, "private": False,
                                   "siblings": [{"rfilename": f} for f in sorted(repo.files)]})
            return True
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", path)
        if m:
            repo = self._check(handler, m.group(1))
            if repo:
                handler.json(200, [
                    {"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                    for f, b in sorted(repo.files.items())
                ])
            return True
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m:
            repo = self._check(handler, m.group(1), file=True)
            if repo is None:
                return True
            body = repo.files.get(m.group(3))
            if body is None:
                handler.json(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
                return True
            handler.send_response(200)
            handler.send_header("Content-Length", str(len(body)))
            handler.send_header("ETag", etag(body))
            handler.send_header("X-Repo-Commit", repo.sha)
            handler.end_headers()
            if not head:
                handler.wfile.write(body)
            return True
        return None
