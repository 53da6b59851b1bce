"""Setup within its time budget (flux/budget.py, FLUX_SETUP_BUDGET_S): on the tiny model, a budget already spent
when setup starts defers what can wait (the log says what), and every prediction after it, go_fast included, is
identical to an unbounded boot's."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from flux import weights
from flux.engine import build
from flux.request import Request

UNBOUNDED = "1000000000"  # a test process may be older than the default 540 s by the time it boots an engine
# (tests/conftest.py sets the same for every test)


def boot(monkeypatch, budget: str):
    monkeypatch.setenv("FLUX_SETUP_BUDGET_S", budget)
    return build.load(weights.sources(has_cuda=False), device=torch.device("cpu"))


def pixels(generated) -> list[np.ndarray]:
    return [np.asarray(image) for image in generated.images]


@pytest.mark.parametrize("bad", ["0", "-5", "soon", "inf"])
def test_a_budget_that_is_not_a_number_of_seconds_is_a_setup_error(monkeypatch, bad):
    from flux.errors import SettingsError
    from flux.settings import Settings

    with pytest.raises(SettingsError, match="FLUX_SETUP_BUDGET_S"):
        Settings.from_env(torch.device("cpu"), weights.weights_dir(), {"FLUX_SETUP_BUDGET_S": bad})


def test_a_spent_budget_defers_what_can_wait_and_changes_no_prediction(weights_dir, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="flux")
    short = boot(monkeypatch, "1")
    said = caplog.text
    assert "setup: deferring dev-fp8, the fp8 copy" in said and "setup: deferring the background prefetch" in said
    assert "deferred to stay within FLUX_SETUP_BUDGET_S=1 (" in said and "the first go_fast request builds it" in said
    assert "dev-fp8" not in short.transformers.copies and short.transformers.deferred == {"dev-fp8"}
    caplog.clear()
    full = boot(monkeypatch, UNBOUNDED)
    assert "deferr" not in caplog.text and "dev-fp8" in full.transformers.copies
    for inputs in ({}, {"go_fast": True}, {"go_fast": True, "aspect_ratio": "16:9", "num_outputs": 2},
                   {"model": "schnell", "go_fast": True}, {"model": "krea-dev"}):
        req = Request.build(prompt="a knitted purple prune", seed=7, megapixels="0.25", num_inference_steps=2,
                            output_format="png", **inputs)
        got, want = short.run(req), full.run(req)
        assert got.req.transformer == want.req.transformer and len(got.images) == len(want.images) > 0, inputs
        assert all(np.array_equal(a, b) for a, b in zip(pixels(got), pixels(want))), inputs
    assert not short.transformers.deferred  # the first go_fast request built it
