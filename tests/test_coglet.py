"""coglet 0.23.1's own behaviour where it meets this container's trust boundary, pinned so that an upgrade that
changes it is noticed (README, "Security"; docs/reliability.md, "coglet").

The server here runs tests/helpers/echo_predictor.py (no model: ready in a second), from a folder of its own with
the echo predictor's schema, on 127.0.0.1; every webhook goes to a receiver on 127.0.0.1. What is pinned:
  - a file input sent as a data: URI or an http(s) URL reaches predict() as cog's Path to a temporary file cog
    fetched it into (tempfile's folder and prefix, a regular file), deleted after the prediction; a string that is no
    URL reaches predict() as a str, unread: what predict.py's `delivered` relies on
  - prediction ids come from the caller unchecked: `..%2F` in an id makes coglet create folders outside its own,
    and a 256-character id fails the prediction and leaves the server BUSY for good (its own server instance)
  - every prediction leaves an empty folder under /tmp/coglet/predictions (coglet's, named by the id: a predictor
    is not told its id, so it cannot remove it)
  - webhooks go to whatever address the caller names, a loopback one included, and a failing one is retried
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.helpers import images
from tests.helpers.http import FileServer
from tests.helpers.server import CogServer, WebhookReceiver

pytestmark = pytest.mark.server

STUB = f"{ROOT}/tests/helpers/echo_predictor.py:EchoPredictor"
PREDICTIONS = Path("/tmp/coglet/predictions")  # coglet's, whatever TMPDIR says


def echo_folder(folder: Path) -> Path:
    """A folder coglet can serve the echo predictor from: its schema in .cog/, as script/schema.py writes it."""
    spec = importlib.util.spec_from_file_location("flux_schema_script", ROOT / "script" / "schema.py")
    schema = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(schema)
    schema.PREDICT_REF = ("tests.helpers.echo_predictor", "EchoPredictor")
    (folder / ".cog").mkdir(parents=True, exist_ok=True)
    (folder / ".cog" / "openapi_schema.json").write_text(schema.render())
    (folder / "tmp").mkdir(exist_ok=True)
    return folder


def echo_server(folder: Path) -> CogServer:
    return CogServer(folder / "cog.log", env={"COG_PREDICT_TYPE_STUB": STUB, "TMPDIR": str(folder / "tmp")},
                     cwd=folder, setup_timeout=120)


@pytest.fixture(scope="module")
def echo(tmp_path_factory):
    folder = echo_folder(tmp_path_factory.mktemp("echo"))
    with echo_server(folder) as srv:
        srv.wait_status()
        srv.tmp = folder / "tmp"
        yield srv


def seen(srv: CogServer, inputs: dict) -> dict:
    status, body = srv.predict(inputs)
    assert body.get("status") == "succeeded", body
    return json.loads(body["output"])


def test_files_reach_predict_as_cogs_path_to_a_temporary_file_it_fetched_and_deletes(echo):
    png = images.encoded(images.gradient(64, 64))
    with FileServer() as files:
        for value in (images.data_uri(png), files.add("/photo.png", png)):
            got = seen(echo, {"image": value})
            path = Path(got["path"])
            assert got["type"] == "cog.types.Path", got
            assert path.parent == echo.tmp and path.name.startswith("tmp"), got
            assert got["regular"] and got["links"] == 1 and got["mode"] == "0o600", got
            assert not path.exists(), "cog deletes the file after the prediction"


@pytest.mark.parametrize("value", ["/etc/hostname", "relative/photo.png", str(ROOT / "README.md")])
def test_a_string_that_is_no_url_reaches_predict_as_a_str_unread(echo, value):
    got = seen(echo, {"image": value})
    assert got["type"] == "builtins.str" and got["value"] == value, got


def test_every_prediction_leaves_an_empty_folder_named_by_its_id(echo):
    prediction = f"flux-test-{uuid.uuid4().hex}"
    try:
        status, body = echo.request("PUT", f"/predictions/{prediction}", {"input": {"text": "x"}})
        assert body["status"] == "succeeded", body
        folder = PREDICTIONS / prediction
        assert sorted(p.name for p in folder.iterdir()) == ["inputs", "outputs"]
        assert not [p for p in folder.rglob("*") if not p.is_dir()], "empty: the outputs went back in the response"
    finally:
        shutil.rmtree(PREDICTIONS / prediction, ignore_errors=True)


def test_an_id_with_dot_dot_slash_makes_coglet_create_folders_outside_its_own(echo):
    name = f"flux-test-{uuid.uuid4().hex}"
    outside = PREDICTIONS.parent / name
    try:
        status, body = echo.request("PUT", f"/predictions/..%2F{name}", {"input": {"text": "x"}})
        assert body["id"] == f"../{name}" and body["status"] == "succeeded", body
        assert sorted(p.name for p in outside.iterdir()) == ["inputs", "outputs"]
    finally:
        shutil.rmtree(outside, ignore_errors=True)


def test_webhooks_go_to_any_address_the_caller_names_and_a_failing_one_is_retried(echo):
    """127.0.0.1 is no public address: coglet sends to it as to any other, and retries a receiver that fails."""
    with WebhookReceiver(status=500) as hook:
        status, _ = echo.request("POST", "/predictions", {"input": {"text": "x"}, "webhook": hook.hook_url,
                                                          "webhook_events_filter": ["completed"]},
                                 headers={"Prefer": "respond-async"})
        assert status == 202
        events = hook.wait_for(lambda e: len(e) >= 3, timeout=20)
    assert {e["status"] for e in events} == {"succeeded"} and len({e["id"] for e in events}) == 1


def test_a_256_character_id_leaves_the_server_busy_for_good(tmp_path):
    """Its own server: the one this test breaks is thrown away."""
    with echo_server(echo_folder(tmp_path)) as srv:
        srv.wait_status()
        status, body = srv.request("PUT", "/predictions/" + "a" * 256, {"input": {"text": "x"}})
        assert body["status"] == "failed" and "File name too long" in body["error"], body
        for _ in range(3):
            time.sleep(0.5)
            assert srv.get("/health-check")[1]["status"] == "BUSY"
        status, body = srv.request("POST", "/predictions", {"input": {"text": "x"}}, timeout=10)
        assert status == 409, (status, body)
