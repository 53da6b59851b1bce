"""The variants loaded on first use, fetched in the background once setup is done (FLUX_PREFETCH): their first
request waits for what is missing, showing progress; a failed fetch fails that request clearly and the next one
fetches again; the disk is checked first; nothing is fetched in the background with FLUX_PREFETCH=0."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import torch

from flux import variants, weights
from flux.engine import Engine
from flux.errors import UserError
from flux.fakes import tiny
from flux.request import Request
from flux.settings import Settings
from tests.helpers import images
from tests.helpers.http import FileServer
from tests.helpers.inputs import for_variant
from tests.helpers.weights_tar import tar_of


FIRST, NEXT = variants.ON_FIRST_USE[:2]  # the variants loaded on first use, in the order they are fetched


@pytest.fixture(scope="module")
def twin_tars() -> dict[str, bytes]:
    """Each variant's tiny twin as a weights .tar, by name, built on first use (here, in the test's thread)."""
    return {}


def twin_tar(twin_tars, variant: variants.Variant, tmp_path_factory) -> bytes:
    if variant.name not in twin_tars:
        folder = tmp_path_factory.mktemp("src") / variant.title
        twin_tars[variant.name] = tar_of(tiny.ensure_pipeline(folder, variant))
    return twin_tars[variant.name]


@pytest.fixture
def first_tar(twin_tars, tmp_path_factory) -> bytes:
    return twin_tar(twin_tars, FIRST, tmp_path_factory)


@pytest.fixture(scope="module")
def tiny_base(weights_dir) -> Path:
    """The session's tiny FLUX.1-dev folder (resolved before a test points FLUX_WEIGHTS_DIR at its own folder)."""
    return weights.locate(weights.TINY, "dev")


@pytest.fixture
def own_weights(tiny_base, weights_root):
    """A weights folder of this test's own (nothing downloaded yet); the tiny base stays the session's."""
    return tiny_base


def engine_with(base, **urls: str) -> Engine:
    """An engine whose variants named in `urls` come from those URLs (the others are tiny: read on first use)."""
    from diffusers import FluxPipeline

    sources = {**weights.sources(has_cuda=False).variants, **urls}
    return Engine(FluxPipeline.from_pretrained(base, dtype=torch.float32), None, sources, torch.device("cpu"),
                  torch.float32, Settings(prefetch=True), compile_bundle=None)


def request(model: str = FIRST.name) -> Request:
    picture = for_variant(variants.get(model), images.gradient(256, 256), images.box_mask(256, 256, (0, 0, 128, 128)))
    return Request.build(prompt="a knitted purple prune", model=model, seed=3, megapixels="0.25",
                         num_inference_steps=2, **picture)


def downloads(server, path: str) -> int:
    """Fetches of the file: each starts with a probe for its first byte (then reads its headers and members)."""
    return sum(r.path == path and r.method == "GET" and r.headers.get("Range") == "bytes=0-0" for r in server.requests)


@pytest.mark.parametrize("variant", variants.ON_FIRST_USE, ids=lambda v: v.name)
def test_a_variant_is_fetched_in_the_background_and_its_first_request_waits_for_it(own_weights, twin_tars,
                                                                                  tmp_path_factory, variant, caplog):
    caplog.set_level(logging.INFO, logger="flux")
    with FileServer() as server:
        url = server.add("/twin.tar", twin_tar(twin_tars, variant, tmp_path_factory), hang_first=1.5)
        engine = engine_with(own_weights, **{variant.name: url})
        prefetch = engine.start_prefetch()
        assert prefetch.names == [variant.name]  # the other variants are tiny here: nothing to download
        time.sleep(0.5)
        assert server.requests  # under way before any request asked for the variant
        generated = engine.generate(request(variant.name))  # arrives while the download still hangs: it waits
        assert generated.req.transformer == variant.name and len(generated.images) == 1
        assert downloads(server, "/twin.tar") == 1  # the request used the background download, no second one
    assert "weights: fetching" in caplog.text
    assert f"{variant.name}: waiting for the background download (" in caplog.text


def test_a_failed_background_fetch_fails_the_request_that_waited_and_the_next_fetches_again(own_weights, first_tar):
    with FileServer() as server:
        url = server.add("/first.tar", first_tar, status=503)
        engine = engine_with(own_weights, **{FIRST.name: url})
        engine.start_prefetch()
        with pytest.raises(UserError, match=rf"^{FIRST.name} weights: .*503") as failed:
            engine.generate(request())
        assert "Traceback" not in str(failed.value)
        server.add("/first.tar", first_tar)  # the host is back
        failed_fetches = downloads(server, "/first.tar")
        assert len(engine.generate(request()).images) == 1  # fetched again, by the request itself
        assert downloads(server, "/first.tar") == failed_fetches + 1


def test_a_failure_reported_while_the_next_variant_is_fetched_stops_nothing(own_weights, first_tar, twin_tars,
                                                                           tmp_path_factory):
    """The first variant's fetch fails and its request reports it while the next one's is still under way: that fetch
    goes on and its request gets it."""
    next_tar = twin_tar(twin_tars, NEXT, tmp_path_factory)
    with FileServer() as server:
        url = server.add("/first.tar", first_tar, status=503)
        next_url = server.add("/next.tar", next_tar, hang_first=1.5)
        engine = engine_with(own_weights, **{FIRST.name: url, NEXT.name: next_url})
        assert engine.start_prefetch().names == [FIRST.name, NEXT.name]
        with pytest.raises(UserError, match=rf"^{FIRST.name} weights: .*503"):
            engine.generate(request())
        assert len(engine.generate(request(NEXT.name)).images) == 1
        assert downloads(server, "/next.tar") == 1  # the background fetch's: it went on after the first's failure


def test_the_disk_is_checked_before_a_fetch(own_weights, first_tar, monkeypatch):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(weights.shutil, "disk_usage", lambda path: usage(2**40, 2**40 - 2**20, 2**20))  # 1 MiB free
    with FileServer() as server:
        url = server.add("/first.tar", first_tar)
        engine = engine_with(own_weights, **{FIRST.name: url})
        engine.start_prefetch()
        with pytest.raises(UserError, match=f"{FIRST.name} weights: not enough disk to fetch them: 1.0 MiB free "
                                            "under .*FLUX_WEIGHTS_DIR"):
            engine.generate(request())
        assert downloads(server, "/first.tar") == 0  # refused before anything was fetched


@pytest.mark.parametrize("prefetch", ["1", "0"])
def test_setup_starts_the_fetch_unless_flux_prefetch_is_0(own_weights, first_tar, monkeypatch, prefetch):
    from flux import engine

    with FileServer() as server:
        url = server.add("/first.tar", first_tar)
        monkeypatch.setenv(FIRST.setting, url)
        monkeypatch.setenv("FLUX_PREFETCH", prefetch)
        loaded = engine.load(weights.sources(has_cuda=False))
        if prefetch == "1":
            assert loaded.transformers.prefetch.names == [FIRST.name]
            loaded.transformers.prefetch.folder(FIRST.name)  # done
            assert downloads(server, "/first.tar") == 1
        else:
            time.sleep(0.5)
            assert loaded.transformers.prefetch is None and downloads(server, "/first.tar") == 0
        assert len(loaded.generate(request()).images) == 1
        assert downloads(server, "/first.tar") == 1  # fetched once either way
