"""Test world: the tiny FLUX built in a temporary folder, no network beyond 127.0.0.1.

Every test runs the real code on the tiny random-weight FLUX (flux/fakes/tiny.py).
HF_ENDPOINT points at a closed loopback port so that nothing can reach
huggingface.co; tests that need a hub start their own on 127.0.0.1.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Compile caches of this test run, never the checkout's weights/ (flux/__init__.py would put them there), set before
# anything imports torch._dynamo (which fixes inductor's cache folder at import).
_caches = tempfile.mkdtemp(prefix="flux-test-compile-")
os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(_caches, "inductor")
os.environ["TRITON_CACHE_DIR"] = os.path.join(_caches, "triton")

from flux.settings import VARIABLES  # noqa: E402  (reads no environment at import)

# Nothing from the machine's environment reaches a test: no tokens, no limits, no other weights, no speed switch.
for name in VARIABLES:
    os.environ.pop(name, None)
# Before anything imports huggingface_hub / diffusers.
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"
# Replicate and CivitAI LoRA references resolve against these; tests that need them start their own server.
os.environ["FLUX_REPLICATE_URL"] = "http://127.0.0.1:9"
os.environ["FLUX_CIVITAI_URL"] = "http://127.0.0.1:9"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["FLUX_WEIGHTS"] = "tiny"
os.environ["FLUX_ALLOW_PRIVATE_URLS"] = "1"  # test servers live on 127.0.0.1; tests/test_netguard.py turns it off
# Setup's budget counts from the process's start (flux/budget.py), and engines built in this process may boot after
# its default has passed: unbounded here (tests/test_setup_budget.py sets its own).
os.environ["FLUX_SETUP_BUDGET_S"] = "1000000000"

import pytest  # noqa: E402

import flux  # noqa: E402,F401


@pytest.fixture(scope="session")
def weights_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights")
    os.environ["FLUX_WEIGHTS_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_dev(tmp_path_factory) -> Path:
    """The tiny FLUX.1-dev saved as a diffusers folder of its own (what weights URLs serve in tests)."""
    from flux.fakes import tiny

    return tiny.ensure_pipeline(tmp_path_factory.mktemp("src") / "FLUX.1-dev")


@pytest.fixture
def weights_root(tmp_path, monkeypatch) -> Path:
    """An empty weights folder of the test's own (FLUX_WEIGHTS_DIR)."""
    monkeypatch.setenv("FLUX_WEIGHTS_DIR", str(tmp_path / "weights"))
    return tmp_path / "weights"


@pytest.fixture(scope="session")
def predictor(weights_dir):
    """One Predictor, set up once on the tiny model, as cog would run it."""
    from predict import Predictor

    p = Predictor()
    p.setup()
    return p


@pytest.fixture(scope="session")
def engine(predictor):
    return predictor.engine


@pytest.fixture(scope="session")
def predict(predictor):
    """Call predict() with Replicate's defaults filled in, like cog does."""
    from tests.helpers.inputs import defaults

    def run(**inputs):
        return predictor.predict(**{**defaults(), **inputs})

    return run
