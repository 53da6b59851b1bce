"""Property-based fuzzing of the published OpenAPI schema against the running cog server: no input gives a 5xx.

schemathesis generates valid and invalid requests from /openapi.json. Two things are pinned before a request
is sent, so the fuzz stays on this machine and in time: file inputs become small data: URIs (cog's server would
otherwise fetch whatever URL was generated, on any host), and step counts / output counts of requests that would
run are capped (they are still validated by the server when out of range).
"""

from __future__ import annotations


import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.generation import GenerationMode

from tests.helpers import images
from tests.helpers.server import CogServer, retry_while_busy

pytestmark = pytest.mark.server


SMALL_PNG = images.data_uri(images.encoded(images.gradient(128, 96)))


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, weights_dir):
    env = {"FLUX_WEIGHTS": "tiny", "FLUX_WEIGHTS_DIR": str(weights_dir)}
    with CogServer(tmp_path_factory.mktemp("fuzz") / "cog.log", env=env) as srv:
        srv.wait_status()
        yield srv


def _tame(body):
    inputs = body.get("input") if isinstance(body, dict) else None
    if not isinstance(inputs, dict):
        return
    for name in ("image", "mask"):
        if isinstance(inputs.get(name), str):
            inputs[name] = SMALL_PNG if "%" not in inputs[name] else "data:image/png;base64,AAAA"
    for name, cap in (("num_inference_steps", 2), ("num_outputs", 2)):
        value = inputs.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 50:
            inputs[name] = min(value, cap)
    if inputs.get("megapixels") == "1" or "megapixels" not in inputs:
        inputs["megapixels"] = "0.25" if inputs.get("aspect_ratio") != "custom" else inputs.get("megapixels", "1")
    if isinstance(inputs.get("width"), int) and isinstance(inputs.get("height"), int):
        inputs["width"], inputs["height"] = min(inputs["width"], 512), min(inputs["height"], 512)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_errors(fuzz_server, mode):
    api = schemathesis.openapi.from_url(fuzz_server.base + "/openapi.json")
    operation = api["/predictions"]["POST"]
    seen = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    def check(case):
        _tame(case.body)
        response = retry_while_busy(lambda: case.call(base_url=fuzz_server.base, timeout=120),
                                    status=lambda r: r.status_code)
        seen.append(response.status_code)
        assert response.status_code < 500, (case.body, response.status_code, response.text[:500])

    check()
    assert seen, "no request was generated"
    assert (422 if mode == GenerationMode.NEGATIVE else 200) in seen
    fuzz_server.wait_status(timeout=10)
