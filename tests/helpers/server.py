"""The real cog HTTP server (coglet), started on 127.0.0.1 by the tests and stopped after."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler
from pathlib import Path

from PIL import Image

from tests.helpers import images
from tests.helpers.http import LocalServer

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def file_uri(path: Path, mime: str = "image/png") -> str:
    """A file's bytes as a data: URI input."""
    return images.data_uri(Path(path).read_bytes(), mime)


def decode_image(uri: str) -> Image.Image:
    header, _, payload = uri.partition(",")
    assert header.startswith("data:image/"), header[:40]
    return Image.open(io.BytesIO(base64.b64decode(payload)))


class CogServer:
    def __init__(self, log_path: Path, env: dict[str, str] | None = None, setup_timeout: float = 300,
                 cwd: Path = ROOT):
        self.cwd = cwd  # where coglet reads .cog/openapi_schema.json and the predictor's file from
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._env = {
            **os.environ,
            "PORT": str(self.port),
            "COG_PREDICT_TYPE_STUB": "predict.py:Predictor",
            # coglet spawns its worker as plain `python`: it must be this environment's.
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            **(env or {}),
        }
        self.setup_timeout = setup_timeout
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "CogServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"],
            cwd=self.cwd, env=self._env, stdout=self._log, stderr=subprocess.STDOUT,
        )

    def wait_status(self, wanted=("READY",), timeout: float | None = None) -> dict:
        deadline = time.monotonic() + (timeout or self.setup_timeout)
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"cog server exited ({self.process.returncode}); log: {self.log_path}")
            try:
                health = self.get("/health-check")[1]
                if health.get("status") in wanted:
                    return health
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"cog server not {wanted} after {timeout or self.setup_timeout}s; log: {self.log_path}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def request(self, method: str, path: str, body=None, headers=None, timeout: float = 300):
        data = None if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(
            self.base + path, data=data, method=method,
            headers={"Content-Type": "application/json", **(headers or {})},
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                return exc.code, json.loads(raw or b"null")
            except ValueError:
                return exc.code, {"raw": raw.decode(errors="replace")}

    def get(self, path: str):
        return self.request("GET", path, timeout=5)

    def predict(self, inputs: dict, **kwargs):
        """A sync prediction, retried through coglet's brief 409 (see retry_while_busy)."""
        return retry_while_busy(lambda: self.request("POST", "/predictions", {"input": inputs}, **kwargs),
                                status=lambda answer: answer[0])


def retry_while_busy(send, status, tries: int = 100):
    """coglet answers 409 "at capacity" for a moment after a prediction ends while its slot is released; a
    client (like Replicate's) waits and tries again. `status` reads the HTTP status off what `send` returns."""
    for _ in range(tries):
        answer = send()
        if status(answer) != 409:
            return answer
        time.sleep(0.05)
    return answer


class _WebhookHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        receiver = self.server.owner
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with receiver._cond:
            receiver.events.append(json.loads(body or b"null"))
            receiver._cond.notify_all()
        self.send_response(receiver.status)
        self.send_header("Content-Length", "0")
        self.end_headers()


class WebhookReceiver(LocalServer):
    """Records the JSON bodies POSTed to it (cog's webhooks), on 127.0.0.1, answering `status`."""

    handler = _WebhookHandler

    def __init__(self, status: int = 200):
        self.status = status
        self.events: list[dict] = []
        self._cond = threading.Condition()
        super().__init__()

    @property
    def hook_url(self) -> str:
        return self.url("/hook")

    def settled(self, predicate, quiet: float = 1.0, timeout: float = 60) -> list[dict]:
        """wait_for(predicate), then until no new event has come for `quiet` seconds: webhooks sent before the one
        that satisfied the predicate may still be on their way (delivery order is no promise)."""
        events = self.wait_for(predicate, timeout)
        deadline = time.monotonic() + timeout
        with self._cond:
            while time.monotonic() < deadline:
                count = len(self.events)
                self._cond.wait(quiet)
                if len(self.events) == count:
                    break
            return list(self.events) if self.events else events

    def wait_for(self, predicate, timeout: float = 60) -> list[dict]:
        """Block until predicate(events) is true; return the events."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self.events):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"webhook condition not met; got {[e.get('status') for e in self.events]}")
                self._cond.wait(left)
            return list(self.events)


def worker_pid(server_pid: int) -> int:
    """The coglet worker (the Python process running predict()) under the server process."""
    children = [c for task in Path(f"/proc/{server_pid}/task").iterdir() for c in (task / "children").read_text().split()]
    for child in children:
        cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        if b"python" in cmdline:
            return int(child)
    raise RuntimeError(f"no worker under {server_pid}: {children}")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def client_progress(prediction: dict):
    """`prediction.progress` as the real replicate client (replicate-python) computes it from a prediction's logs."""
    from replicate.prediction import Prediction

    return Prediction(id=prediction.get("id") or "local", model="local/flux", version="local",
                      status=prediction.get("status") or "processing", logs=prediction.get("logs") or "").progress
