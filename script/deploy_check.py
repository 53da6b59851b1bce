"""The image's install and start, rehearsed without Docker or a GPU: what `cog build` installs, in a fresh Python 3.11
environment, and the image's command started in a folder holding only what .dockerignore lets into /src, booting on
the defaults a GPU uses (FLUX_WEIGHTS=public) from a loopback host laid out as Replicate's weights delivery.

  script/deploy-check             build (or reuse) the environment, boot, one prediction per model; exit 0 when green
  script/deploy-check --fresh     build the environment anew even if one matching requirements.txt and cog.yaml exists
  script/deploy-check --work DIR  where the environment, the build context and the host's files go
                                  (default: $TMPDIR/flux-deploy-check)

The environment is built only as cog's Dockerfile generator builds the image: requirements.txt through pip, then
`cog==<build.sdk_version>`, then cog.yaml's `build.run` lines, read from cog.yaml and run as they are written (with
this environment's `python` first on PATH); nothing from requirements-dev.txt. Building it needs the package index
and several GB of disk; later runs reuse it while requirements.txt and cog.yaml are unchanged.

The host serves each variant's tiny twin as the .tar at its public path (dev and krea-dev under one top folder,
schnell's slim.tar with none), each after an unread member of 1 GiB that is a hole on disk, with byte ranges (a
variant whose public default is a single-file checkpoint, kontext-dev and fill-dev, as that file in BFL's layout);
and
the safety checkers' tiny twins as their Hugging Face repos (FLUX_WEIGHTS_HOST is their endpoint too). The check
prints the bytes served and fails if a byte of an unread member was fetched, if the server is not READY, or if a
prediction fails. Standard library only: it runs before the environment exists.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import image_pins  # script/image_pins.py: what the image installs, read once

ROOT = Path(__file__).resolve().parent.parent
UNREAD = "flux1-single-file.safetensors"  # a single-file checkpoint beside the folders, as Replicate's tars may hold
PROMPT = "a knitted purple prune"


def image_recipe(cog_yaml: str) -> tuple[str, list[str]]:
    """cog.yaml's build.sdk_version and its build.run lines as cog runs them (script/image_pins.py reads both)."""
    sdk = image_pins.sdk_version(cog_yaml)
    if not sdk:
        raise SystemExit("deploy-check: cog.yaml has no build.sdk_version")
    return sdk, image_pins.run_lines(cog_yaml)


def build_env(work: Path, fresh: bool) -> Path:
    """The image's Python environment (reused while requirements.txt and cog.yaml are unchanged); its python."""
    env_dir = work / "venv"
    stamp = hashlib.sha256((ROOT / "requirements.txt").read_bytes() + (ROOT / "cog.yaml").read_bytes()).hexdigest()
    python = env_dir / "bin" / "python"
    if not fresh and (env_dir / ".stamp").is_file() and (env_dir / ".stamp").read_text() == stamp:
        print(f"deploy-check: reusing the environment in {env_dir} (requirements.txt and cog.yaml unchanged)")
        return python
    sdk, run_lines = image_recipe((ROOT / "cog.yaml").read_text())
    shutil.rmtree(env_dir, ignore_errors=True)
    started = time.monotonic()
    step([shutil.which("python3.11") or "python3.11", "-m", "venv", str(env_dir)])
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--quiet", "--no-cache-dir"]
    step([*pip, "-r", str(ROOT / "requirements.txt")])
    step([*pip, f"cog=={sdk}"])
    path = f"{env_dir / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
    for line in run_lines:  # as the Dockerfile's RUN lines: a shell, the image's python first on PATH
        step(["bash", "-c", line], env={**os.environ, "PATH": path})
    (env_dir / ".stamp").write_text(stamp)
    print(f"deploy-check: environment built in {time.monotonic() - started:.0f}s")
    return python


def step(command: list[str], **kwargs) -> None:
    print("deploy-check: $", " ".join(command)[:200], flush=True)
    subprocess.run(command, check=True, **kwargs)


def build_context(work: Path) -> Path:
    """A fresh folder holding what `cog build` copies into /src: the checkout's files (tracked, and untracked ones
    git does not ignore) less what .dockerignore leaves out, matched by git: Docker's patterns are git's, anchored
    at the context's root (git matches a pattern without a slash at any depth, so each is anchored with '/')."""
    src = work / "src"
    shutil.rmtree(src, ignore_errors=True)
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                            capture_output=True).stdout.decode().split("\0")
    candidates = [name for name in listed if name and (ROOT / name).is_file()]
    anchored = work / "dockerignore.git"
    anchored.write_text("".join(
        line + "\n" if not line.strip() or line.startswith("#") or line.lstrip("!").startswith(("/", "**"))
        else ("!/" + line[1:] if line.startswith("!") else "/" + line) + "\n"
        for line in (ROOT / ".dockerignore").read_text().splitlines()))
    ignored = set(subprocess.run(
        ["git", "-c", f"core.excludesFile={anchored}", "check-ignore", "--no-index", "--stdin", "-z"],
        cwd=ROOT, input="\0".join(candidates).encode(), capture_output=True).stdout.decode().split("\0"))
    for name in candidates:
        if name not in ignored:
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    return src


def replicate_tar(path: Path, folder: Path, *, top: bool = True, unread: int = 2**30) -> Path:
    """A weights folder as a .tar on disk laid out like Replicate's: under one top folder named like the folder (top)
    or none, after a member no layout reads (`unread` bytes, a hole in the file: sparse on disk, nothing written)."""
    prefix = f"{folder.name}/" if top else ""
    with open(path, "wb") as fh:
        big = tarfile.TarInfo(f"{prefix}{UNREAD}")
        big.size = unread
        fh.write(big.tobuf(tarfile.PAX_FORMAT))
        fh.seek(-(-unread // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE, io.SEEK_CUR)  # the member's data: a hole
        with tarfile.open(fileobj=fh, mode="w") as tar:
            for entry in sorted(folder.rglob("*")):
                if not entry.name.startswith("."):
                    tar.add(entry, arcname=prefix + entry.relative_to(folder).as_posix(), recursive=False)
    return path


def twins(python: Path, src: Path, out: Path) -> dict:
    """Every component's tiny twin, built by the image's own code in the image's environment: {"variants": {name:
    [public path, folder or single file, whether it runs text-to-image]}, "safety": {kind: [repo, folder]},
    "picture": an image and a mask as data: URIs, for a variant that only inpaints}."""
    code = """
import json, pathlib, sys
from flux import variants, weights
from flux.fakes import tiny
out = pathlib.Path(sys.argv[1])
found = {"variants": {}, "safety": {}}
for v in variants.VARIANTS.values():
    if v.public.endswith((".safetensors", ".sft")):  # a single-file BFL checkpoint (flux/singlefile.py)
        twin = tiny.ensure_single_file(out / pathlib.PurePosixPath(v.public).name, v)
    else:
        twin = tiny.ensure_pipeline(out / pathlib.PurePosixPath(v.public).parent.name, v)
    found["variants"][v.name] = [v.public, str(twin), "txt2img" in v.pipelines]
import base64, io
from PIL import Image
def uri(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
mask = Image.new("L", (256, 256), 0)
mask.paste(255, (64, 64, 192, 192))
found["picture"] = {"image": uri(Image.new("RGB", (256, 256), (120, 80, 200))), "mask": uri(mask)}
for kind, repo, build in ((weights.SAFETY, weights.SAFETY_REPO, tiny.ensure_safety_checker),
                          (weights.SAFETY_SECOND, weights.SAFETY_SECOND_REPO, tiny.ensure_nsfw_classifier)):
    found["safety"][kind] = [repo, str(build(out / kind))]
print(json.dumps(found))
"""
    done = subprocess.run([str(python), "-c", code, str(out)], cwd=src, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


class Host(ThreadingHTTPServer):
    """Files on disk with byte ranges (`tars`: path -> file), and enough of the Hugging Face Hub API for
    snapshot_download (`repos`: repo id -> {file: bytes}); every byte range sent is recorded per path."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.tars: dict[str, Path] = {}
        self.repos: dict[str, dict[str, bytes]] = {}
        self.sent: dict[str, list[tuple[int, int]]] = {}  # path -> (first, last) of each body sent
        self.lock = threading.Lock()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request, client_address):
        """A client closing a kept-alive connection (the server's downloader when it is done) is no error here."""
        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            super().handle_error(request, client_address)

    def record(self, path: str, first: int, last: int) -> None:
        with self.lock:
            self.sent.setdefault(path, []).append((first, last))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Host

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self._serve(head=True)

    def do_GET(self):
        self._serve(head=False)

    def _serve(self, head: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        repo = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/[^/]+)?", path)
        if repo and repo.group(1) in self.server.repos:
            files = self.server.repos[repo.group(1)]
            return self._body(200, json.dumps({"id": repo.group(1), "sha": _sha(files), "private": False,
                                               "siblings": [{"rfilename": f} for f in sorted(files)]}).encode(),
                              {"Content-Type": "application/json"}, head)
        tree = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/[^/]+(?:/.*)?", path)
        if tree and tree.group(1) in self.server.repos:
            return self._body(200, json.dumps([
                {"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                for f, b in sorted(self.server.repos[tree.group(1)].items())]).encode(),
                {"Content-Type": "application/json"}, head)
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/[^/]+/(.+)", path)
        if resolve and resolve.group(2) in self.server.repos.get(resolve.group(1), {}):
            files = self.server.repos[resolve.group(1)]
            body = files[resolve.group(2)]
            return self._body(200, body, {"X-Repo-Commit": _sha(files),
                                          "ETag": f'"{hashlib.sha256(body).hexdigest()}"'}, head)
        if path not in self.server.tars:
            return self._body(404, b"not found", {}, head)
        file = self.server.tars[path]
        size = file.stat().st_size
        first, last, status = 0, size - 1, 200
        wanted = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if wanted:
            first = int(wanted.group(1))
            last = min(int(wanted.group(2)) if wanted.group(2) else size - 1, size - 1)
            if first >= size:
                return self._body(416, b"", {}, head)
            status = 206
        self.send_response(status)
        self.send_header("Content-Length", str(last - first + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{size}-{file.stat().st_mtime_ns}"')
        if status == 206:
            self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
        self.end_headers()
        if head:
            return
        self.server.record(path, first, last)
        with open(file, "rb") as fh:
            fh.seek(first)
            left = last - first + 1
            while left > 0:
                chunk = fh.read(min(left, 1 << 20))
                self.wfile.write(chunk)
                left -= len(chunk)

    def _body(self, status: int, body: bytes, headers: dict, head: bool) -> None:
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)


def _sha(files: dict[str, bytes]) -> str:
    digest = hashlib.sha1()
    for name in sorted(files):
        digest.update(name.encode() + hashlib.sha1(files[name]).digest())
    return digest.hexdigest()


def unread_ranges(archive: Path) -> list[tuple[int, int]]:
    """The byte ranges of the archive's unread members' data."""
    with tarfile.open(archive) as tar:
        return [(m.offset_data, m.offset_data + m.size - 1) for m in tar.getmembers() if m.name.endswith(UNREAD)]


def call(base: str, method: str, path: str, body: dict | None = None, timeout: float = 600) -> tuple[int, dict]:
    request = urllib.request.Request(base + path, method=method, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, {"error": exc.read().decode(errors="replace")[:500]}


def boot_and_predict(python: Path, src: Path, host: Host, work: Path, found: dict) -> list[str]:
    """The image's CMD started in src on the public defaults; READY, then one prediction per model. Returns what
    failed."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log_path = work / "cog.log"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("FLUX_", "HF_", "COG_"))},
           "PATH": f"{python.parent}{os.pathsep}{os.environ.get('PATH', '')}", "PORT": str(port),
           "COG_PREDICT_TYPE_STUB": "predict.py:Predictor",  # the image's ENV (cog's generator writes it)
           "FLUX_WEIGHTS": "public", "FLUX_WEIGHTS_HOST": host.base, "FLUX_WEIGHTS_DIR": str(work / "weights"),
           "FLUX_ALLOW_PRIVATE_URLS": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}  # the host is loopback; no HF
    shutil.rmtree(work / "weights", ignore_errors=True)
    failed = []
    started = time.monotonic()
    with open(log_path, "wb") as log:
        server = subprocess.Popen([str(python), "-m", "cog.server.http", "--host", "127.0.0.1"], cwd=src, env=env,
                                  stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            status = None
            while time.monotonic() - started < 900 and server.poll() is None:
                try:
                    status = call(base, "GET", "/health-check", timeout=5)[1].get("status")
                except OSError:
                    status = None
                if status in ("READY", "SETUP_FAILED"):
                    break
                time.sleep(0.5)
            print(f"deploy-check: server {status} after {time.monotonic() - started:.0f}s (log: {log_path})")
            if status != "READY":
                return [f"the server is {status or 'not up'}"]
            for model, (_, _, text) in found["variants"].items():  # every model; one that only inpaints, inpainting
                inputs = {"prompt": PROMPT, "model": model, "seed": 1, "megapixels": "0.25", "num_inference_steps": 2,
                          **({} if text else found["picture"])}
                for _ in range(100):  # coglet answers 409 for a moment while it frees the last prediction's slot
                    code, body = call(base, "POST", "/predictions", {"input": inputs})
                    if code != 409:
                        break
                    time.sleep(0.05)
                ok = code == 200 and body.get("status") == "succeeded" and body.get("output")
                print(f"deploy-check: {model}: {'succeeded' if ok else f'FAILED ({code}: {str(body)[:300]})'}")
                if not ok:
                    failed.append(f"the {model} prediction")
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
    return failed


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="script/deploy-check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fresh", action="store_true", help="build the environment anew")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "flux-deploy-check")
    args = parser.parse_args(argv)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    python = build_env(work, args.fresh)
    src = build_context(work)
    found = twins(python, src, work / "twins")
    host = Host()
    unread = {}
    for name, (public, twin, _) in found["variants"].items():
        if Path(twin).is_file():  # a single-file checkpoint, served whole as it is
            host.tars[public], unread[public] = Path(twin), []
            continue
        archive = replicate_tar(work / f"{name}.tar", Path(twin), top=not public.endswith("/slim.tar"))
        host.tars[public] = archive
        unread[public] = unread_ranges(archive)
    for repo, folder in found["safety"].values():
        host.repos[repo] = {p.relative_to(folder).as_posix(): p.read_bytes()
                            for p in Path(folder).rglob("*") if p.is_file() and not p.name.startswith(".")}
    threading.Thread(target=host.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
    try:
        failed = boot_and_predict(python, src, host, work, found)
    finally:
        host.shutdown()
        host.server_close()
    served = {path: sum(last - first + 1 for first, last in ranges) for path, ranges in host.sent.items()}
    for path, total in sorted(served.items()):
        tar = host.tars[path]
        print(f"deploy-check: served {total} bytes of {path} ({tar.stat().st_size} bytes, "
              f"{sum(b - a + 1 for a, b in unread[path])} of them unread members)")
    overlapping = [path for path, ranges in host.sent.items()
                   if any(first <= b and a <= last for first, last in ranges for a, b in unread[path])]
    failed += [f"bytes of {path}'s unread member were fetched" for path in overlapping]
    print(f"deploy-check: {'FAILED: ' + '; '.join(failed) if failed else 'OK'} in {time.monotonic() - started:.0f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
