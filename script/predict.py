"""`cog predict`, natively: start the real cog HTTP server on loopback, run one prediction, write the outputs.

  script/predict -i prompt="a knitted purple prune" [-i image=@photo.png] [-i num_outputs=2] [-o out.webp]

Like `cog predict`: each -i is name=value (value typed by the schema; @path sends a
file), outputs are written to output.<i>.<ext> in the current folder (or -o), and
the prediction's logs are printed as they come (its progress bar live: the server's
`logs` webhooks, received on 127.0.0.1), then its metrics. The server's own log goes to stderr.
"""

from __future__ import annotations

import argparse
import base64
import http.server
import json
import mimetypes
import os
import queue
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_PATH = ROOT / ".cog" / "openapi_schema.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_inputs(pairs: list[str], schema: dict) -> dict:
    props = schema["components"]["schemas"]["Input"]["properties"]
    types = {}
    for name, prop in props.items():
        if "allOf" in prop:
            ref = prop["allOf"][0]["$ref"].rsplit("/", 1)[1]
            types[name] = schema["components"]["schemas"][ref]["type"]
        else:
            types[name] = prop.get("type", "string")
    inputs: dict = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"-i {pair!r}: expected name=value")
        if name not in props:
            raise SystemExit(f"-i {name}: unknown input; the inputs are: {', '.join(props)}")
        if value.startswith("@"):
            path = Path(value[1:]).expanduser()
            if not path.is_file():
                raise SystemExit(f"-i {name}: no such file {path}")
            mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            inputs[name] = f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"
            continue
        kind = types[name]
        try:
            if kind == "integer":
                inputs[name] = int(value)
            elif kind == "number":
                inputs[name] = float(value)
            elif kind == "boolean":
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                inputs[name] = value.lower() in ("true", "1")
            else:
                inputs[name] = value
        except ValueError:
            raise SystemExit(f"-i {name}={value}: expected a {kind}") from None
    return inputs


def request(url: str, body: dict | None = None, timeout: float = 5.0, headers: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(req, timeout=timeout) as response:
        return response.status, json.loads(response.read() or b"null")


def wait_ready(base: str, server: subprocess.Popen) -> dict:
    while True:
        if server.poll() is not None:
            raise SystemExit(f"the cog server exited during setup (code {server.returncode})")
        try:
            _, health = request(base + "/health-check")
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            health = {}
        status = health.get("status")
        if status == "READY":
            return health
        if status == "SETUP_FAILED":
            raise SystemExit("setup failed (see the log above)")
        time.sleep(0.25)


def echo_setup_log(stream) -> None:
    """Show setup's log lines as they happen (weights downloads can take minutes)."""
    for line in stream:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        fields = record.get("fields") or {}
        if record.get("target") == "coglet::setup" or record.get("level") in ("WARN", "ERROR"):
            message = fields.get("message", "")
            if message.strip() and "\r" not in message:
                print(message, file=sys.stderr, flush=True)


class Webhooks:
    """A webhook receiver on 127.0.0.1: the server posts the prediction to it as it starts, as its logs grow and
    when it completes."""

    def __init__(self):
        self.received: queue.Queue = queue.Queue()
        received = self.received

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(200)
                self.end_headers()
                received.put(json.loads(body or b"{}"))

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/webhook"

    def follow(self, server: subprocess.Popen) -> dict:
        """Print the prediction's new log text as each webhook brings it; return the completed prediction."""
        shown = 0
        try:
            while True:
                try:
                    prediction = self.received.get(timeout=1)
                except queue.Empty:
                    if server.poll() is not None:
                        raise SystemExit(f"the cog server exited during the prediction (code {server.returncode})")
                    continue
                logs = prediction.get("logs") or ""
                if len(logs) > shown:
                    sys.stderr.write(logs[shown:])
                    sys.stderr.flush()
                    shown = len(logs)
                if prediction.get("status") in ("succeeded", "failed", "canceled"):
                    return prediction
        finally:
            self.server.shutdown()


def write_outputs(output, out: str | None) -> list[Path]:
    items = output if isinstance(output, list) else [output]
    written = []
    for i, item in enumerate(items):
        if not (isinstance(item, str) and item.startswith("data:")):
            print(json.dumps(item))
            continue
        header, _, payload = item.partition(",")
        mime = header[5:].split(";")[0]
        ext = {"image/jpeg": ".jpg"}.get(mime) or mimetypes.guess_extension(mime) or ""
        if out:
            stem, suffix = os.path.splitext(out)
            path = Path(f"{stem}.{i}{suffix or ext}" if len(items) > 1 else out)
        else:
            path = Path(f"output.{i}{ext}")
        path.write_bytes(base64.b64decode(payload))
        written.append(path)
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-i", "--input", action="append", default=[], metavar="name=value")
    parser.add_argument("-o", "--output", help="output path (an index is added when there are several)")
    args = parser.parse_args()

    schema = json.loads(SCHEMA_PATH.read_text())
    inputs = parse_inputs(args.input, schema)
    port = free_port()
    env = {**os.environ, "PORT": str(port), "COG_PREDICT_TYPE_STUB": "predict.py:Predictor"}
    server = subprocess.Popen(
        [sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    threading.Thread(target=echo_setup_log, args=(server.stdout,), daemon=True).start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, server)
        hooks = Webhooks()
        try:
            request(base + "/predictions", {"input": inputs, "webhook": hooks.url,
                                            "webhook_events_filter": ["start", "logs", "completed"]},
                    headers={"Prefer": "respond-async"})
        except urllib.error.HTTPError as exc:
            detail = json.loads(exc.read() or b"{}").get("detail", [])
            for d in detail:
                print(f"invalid input {'.'.join(map(str, d['loc'][2:]))}: {d['msg']}", file=sys.stderr)
            return 1
        prediction = hooks.follow(server)
        if prediction.get("status") != "succeeded":
            print(f"prediction {prediction.get('status')}: {prediction.get('error')}", file=sys.stderr)
            return 1
        print(f"metrics: {json.dumps(prediction.get('metrics') or {}, ensure_ascii=False)}", file=sys.stderr)
        for path in write_outputs(prediction.get("output"), args.output):
            print(f"Written output to: {path}")
        return 0
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    sys.exit(main())
