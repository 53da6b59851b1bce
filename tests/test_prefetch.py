"""The variants loaded on first use, fetched in the background once setup is done (FLUX_PREFETCH): their first
request waits for what is missing, showing progress; a failed fetch fails that request clearly and the next one
fetches again; the disk is checked first; nothing is fetched in the background with FLUX_PREFETCH=0."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import torch

from flux import weights
from flux.engine import Engine
from flux.errors import UserError
from flux.fakes import tiny
from flux.request import Request
from flux.settings import Settings
from tests.helpers.http import FileServer
from tests.helpers.weights_tar import tar_of


@pytest.fixture(scope="module")
def schnell_tar(tmp_path_factory) -> bytes:
    """schnell's tiny twin as a weights .tar (built here, in the test's thread)."""
    from flux import variants

    return tar_of(tiny.ensure_pipeline(tmp_path_factory.mktemp("src") / "FLUX.1-schnell", variants.get("schnell")))


@pytest.fixture(scope="module")
def tiny_base(weights_dir) -> Path:
    """The session's tiny FLUX.1-dev folder (resolved before a test points FLUX_WEIGHTS_DIR at its own folder)."""
    return weights.locate(weights.TINY, "dev")


@pytest.fixture
def own_weights(tiny_base, weights_root):
    """A weights folder of this test's own (nothing downloaded yet); the tiny base stays the session's."""
    return tiny_base


def engine_with(base, schnell_url: str, **urls: str) -> Engine:
    """An engine whose schnell (and the variants named in `urls`) come from those URLs."""
    from diffusers import FluxPipeline

    sources = {**weights.sources(has_cuda=False).variants, "schnell": schnell_url, **urls}
    return Engine(FluxPipeline.from_pretrained(base, dtype=torch.float32), None, sources, torch.device("cpu"),
                  torch.float32, Settings(prefetch=True), compile_bundle=None)


def schnell_request(model: str = "schnell") -> Request:
    return Request.build(prompt="a knitted purple prune", model=model, seed=3, megapixels="0.25",
                         num_inference_steps=2)


def downloads(server, path: str) -> int:
    """Fetches of the file: each starts with a probe for its first byte (then reads its headers and members)."""
    return sum(r.path == path and r.method == "GET" and r.headers.get("Range") == "bytes=0-0" for r in server.requests)


def test_a_variant_is_fetched_in_the_background_and_its_first_request_waits_for_it(own_weights, schnell_tar, caplog):
    caplog.set_level(logging.INFO, logger="flux")
    with FileServer() as server:
        url = server.add("/schnell.tar", schnell_tar, hang_first=1.5)
        engine = engine_with(own_weights, url)
        prefetch = engine.start_prefetch()
        assert prefetch.names == ["schnell"]  # krea-dev is tiny here: nothing to download, read on first use
        time.sleep(0.5)
        assert server.requests  # under way before any request asked for schnell
        generated = engine.generate(schnell_request())  # arrives while the download still hangs: it waits
        assert generated.req.transformer == "schnell" and len(generated.images) == 1
        assert downloads(server, "/schnell.tar") == 1  # the request used the background download, no second one
    assert "weights: fetching" in caplog.text and "schnell: waiting for the background download (" in caplog.text


def test_a_failed_background_fetch_fails_the_request_that_waited_and_the_next_fetches_again(own_weights, schnell_tar):
    with FileServer() as server:
        url = server.add("/schnell.tar", schnell_tar, status=503)
        engine = engine_with(own_weights, url)
        engine.start_prefetch()
        with pytest.raises(UserError, match=r"^schnell weights: .*503") as failed:
            engine.generate(schnell_request())
        assert "Traceback" not in str(failed.value)
        server.add("/schnell.tar", schnell_tar)  # the host is back
        failed_fetches = downloads(server, "/schnell.tar")
        assert len(engine.generate(schnell_request()).images) == 1  # fetched again, by the request itself
        assert downloads(server, "/schnell.tar") == failed_fetches + 1


def test_a_failure_reported_while_the_next_variant_is_fetched_stops_nothing(own_weights, schnell_tar,
                                                                           tmp_path_factory):
    """schnell's fetch fails and its request reports it while krea-dev's is still under way: krea-dev's fetch goes
    on and its request gets it."""
    from flux import variants

    krea_tar = tar_of(tiny.ensure_pipeline(tmp_path_factory.mktemp("krea") / "FLUX.1-Krea-dev",
                                           variants.get("krea-dev")))
    with FileServer() as server:
        url = server.add("/schnell.tar", schnell_tar, status=503)
        engine = engine_with(own_weights, url, **{"krea-dev": server.add("/krea.tar", krea_tar, hang_first=1.5)})
        assert engine.start_prefetch().names == ["schnell", "krea-dev"]
        with pytest.raises(UserError, match=r"^schnell weights: .*503"):
            engine.generate(schnell_request())
        assert len(engine.generate(schnell_request("krea-dev")).images) == 1
        assert downloads(server, "/krea.tar") == 1  # the background fetch's: it went on after schnell's failure


def test_the_disk_is_checked_before_a_fetch(own_weights, schnell_tar, monkeypatch):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(weights.shutil, "disk_usage", lambda path: usage(2**40, 2**40 - 2**20, 2**20))  # 1 MiB free
    with FileServer() as server:
        url = server.add("/schnell.tar", schnell_tar)
        engine = engine_with(own_weights, url)
        engine.start_prefetch()
        with pytest.raises(UserError, match="schnell weights: not enough disk to fetch them: 1.0 MiB free under .*"
                                            "FLUX_WEIGHTS_DIR"):
            engine.generate(schnell_request())
        assert downloads(server, "/schnell.tar") == 0  # refused before anything was fetched


@pytest.mark.parametrize("prefetch", ["1", "0"])
def test_setup_starts_the_fetch_unless_flux_prefetch_is_0(own_weights, schnell_tar, monkeypatch, prefetch):
    from flux import engine

    with FileServer() as server:
        url = server.add("/schnell.tar", schnell_tar)
        monkeypatch.setenv("FLUX_SCHNELL_WEIGHTS", url)
        monkeypatch.setenv("FLUX_PREFETCH", prefetch)
        loaded = engine.load(weights.sources(has_cuda=False))
        if prefetch == "1":
            assert loaded.transformers.prefetch.names == ["schnell"]
            loaded.transformers.prefetch.folder("schnell")  # done
            assert downloads(server, "/schnell.tar") == 1
        else:
            time.sleep(0.5)
            assert loaded.transformers.prefetch is None and downloads(server, "/schnell.tar") == 0
        assert len(loaded.generate(schnell_request()).images) == 1
        assert downloads(server, "/schnell.tar") == 1  # fetched once either way
