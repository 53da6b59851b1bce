"""The real cog HTTP server (coglet), started on 127.0.0.1 by the tests and stopped after."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_uri(path: Path, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(Path(path).read_bytes()).decode()}"


def decode_image(uri: str) -> Image.Image:
    header, _, payload = uri.partition(",")
    assert header.startswith("data:image/"), header[:40]
    return Image.open(io.BytesIO(base64.b64decode(payload)))


class CogServer:
    def __init__(self, log_path: Path, env: dict[str, str] | None = None, setup_timeout: float = 300):
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
            cwd=ROOT, env=self._env, stdout=self._log, stderr=subprocess.STDOUT,
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
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.base + path, data=data, method=method,
            headers={"Content-Type": "application/json", **(headers or {})},
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def get(self, path: str):
        return self.request("GET", path, timeout=5)

    def predict(self, inputs: dict, **kwargs):
        return self.request("POST", "/predictions", {"input": inputs}, **kwargs)
