"""script/weights-check, run as a user runs it, against loopback hosts: the public defaults laid out as Replicate's
tars (with an unread GiB member each) hold and nothing but headers is read; a source that lacks its layout, or a
server that takes no ranges, does not hold."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from flux import variants
from flux.fakes import tiny
from tests.helpers.http import HubServer
from tests.helpers.weights_tar import serve_public

ROOT = Path(__file__).resolve().parent.parent


def check(*args: str) -> subprocess.CompletedProcess:
    # this Python (never script/setup's .venv), and loopback hosts allowed, as the server needs for them too
    env = {**os.environ, "FLUX_PYTHON": sys.executable, "FLUX_ALLOW_PRIVATE_URLS": "1"}
    env.pop("FLUX_WEIGHTS")  # the test world's tiny: a GPU's settings here are none
    return subprocess.run([str(ROOT / "script" / "weights-check"), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_the_defaults_on_a_replicate_layout_host_hold_and_only_headers_are_read(tmp_path):
    with HubServer() as hub:
        served = serve_public(hub, tmp_path)
        done = check("--host", hub.base)
        biggest = max((int(b) - int(a) + 1 for a, b in (r.removeprefix("bytes=").split("-")
                                                        for r in hub.ranged_gets())), default=0)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "7 of 7 sources hold: OK" in done.stdout
    assert "skips 1 files, 1.0 GiB: flux1-single-file.safetensors" in done.stdout  # dev's: its folders all fetched
    assert "fetches 4 files" in done.stdout and "transformer/ (2 files)" in done.stdout  # schnell's and krea-dev's
    assert "holds one transformer checkpoint in BFL's layout" in done.stdout  # kontext-dev's and fill-dev's
    headers = [8 + int.from_bytes(served[v].read_bytes()[:8], "little") for v in ("kontext-dev", "fill-dev")]
    assert biggest <= max(2 * tarfile.BLOCKSIZE, *headers)  # headers only: no data


def test_a_source_without_its_layout_or_without_ranges_does_not_hold(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("FLUX.1-dev/model_index.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    with HubServer() as hub:
        lacking = hub.add("/lacking.tar", buf.getvalue())
        plain = hub.add("/plain.tar", buf.getvalue(), no_ranges=True)
        done = check(f"dev={lacking}", f"schnell={plain}")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "DOES NOT HOLD: the layout needs transformer, vae, text_encoder, text_encoder_2" in done.stdout
    assert "does not take byte ranges" in done.stdout and "0 of 2 sources hold" in done.stdout


def test_a_single_file_checkpoint_is_described_from_its_header(tmp_path):
    krea = variants.get("krea-dev")
    twin = tiny.ensure_single_file(tmp_path / "flux1-krea-dev.sft", krea)
    with HubServer() as hub:
        url = hub.add("/kontext/flux1-krea-dev.sft", twin.read_bytes())
        done = check(f"krea-dev={url}", url)
    assert done.returncode == 1, done.stdout + done.stderr  # dev's does not hold: one transformer is not a pipeline
    assert "krea-dev: " in done.stdout and "(file-url)" in done.stdout
    assert "holds one transformer checkpoint in BFL's layout (1 double and 2 single blocks, width 32" in done.stdout
    assert "is one transformer checkpoint, but this setting needs every component" in done.stdout
    assert "1 of 2 sources hold" in done.stdout
