"""The public defaults (no token): each FLUX variant's .tar on Replicate's weights delivery, the safety checkers'
public Hugging Face repos; FLUX_WEIGHTS_HOST moving all of them, FLUX_WEIGHTS=public selecting them on a CPU, where a
loopback host serves the tiny twins laid out as the real tars are."""

from __future__ import annotations

import pytest

from flux import variants, weights
from tests.helpers.http import HubServer
from tests.helpers.weights_tar import digests, loaded_bytes, serve_public

UNSET = ("FLUX_WEIGHTS", "COG_WEIGHTS", "FLUX_SAFETY_CHECKER", "FLUX_SAFETY_SECOND", "FLUX_WEIGHTS_HOST", "HF_TOKEN",
         *(v.setting for v in variants.VARIANTS.values()))


def test_a_gpu_with_no_setting_needs_no_token():
    srcs = weights.sources(has_cuda=True, env={})
    assert srcs.variants == {
        "dev": "https://weights.replicate.delivery/default/black-forest-labs/FLUX.1-dev/files.tar",
        "schnell": "https://weights.replicate.delivery/default/black-forest-labs/FLUX.1-schnell/slim.tar",
        "krea-dev": "https://weights.replicate.delivery/default/black-forest-labs/FLUX.1-krea-dev/files.tar",
        # single-file BFL checkpoints (flux/singlefile.py): gated on Hugging Face, public here
        "kontext-dev": "https://weights.replicate.delivery/default/black-forest-labs/kontext/release-candidate/"
                       "kontext-dev.sft",
        "fill-dev": "https://weights.replicate.delivery/default/black-forest-labs/ctrl-n-fill/flux1-fill-dev.safetensors"}
    # not gated, model.safetensors: read with no token from huggingface.co
    assert (srcs.safety, srcs.safety_second, srcs.endpoints) == (weights.SAFETY_REPO, weights.SAFETY_SECOND_REPO, {})
    assert weights.sources(has_cuda=False, env={"FLUX_WEIGHTS": "public"}) == srcs  # any machine


def test_the_weights_host_moves_every_default_and_nothing_set():
    first = variants.ON_FIRST_USE[0]
    env = {"FLUX_WEIGHTS_HOST": "http://mirror.test/", "FLUX_SAFETY_SECOND": "me/classifier", first.setting: "/models/x"}
    srcs = weights.sources(has_cuda=True, env=env)
    assert srcs.base == "http://mirror.test/default/black-forest-labs/FLUX.1-dev/files.tar"
    assert srcs.variants[first.name] == "/models/x"
    assert srcs.endpoints == {weights.SAFETY: "http://mirror.test"}  # the second checker's own repo: HF_ENDPOINT's
    assert weights.sources(has_cuda=False, env={"FLUX_WEIGHTS_HOST": "http://mirror.test"}).tiny  # CPU: still tiny


@pytest.fixture
def public_host(tmp_path_factory):
    with HubServer() as hub:
        yield hub, serve_public(hub, tmp_path_factory.mktemp("public"))


def test_public_on_a_cpu_fetches_the_twins_from_replicate_layout_tars_and_only_what_loads(public_host, weights_root,
                                                                                          monkeypatch):
    hub, twins = public_host
    for name in UNSET:
        monkeypatch.delenv(name, raising=False)
    srcs = weights.sources(has_cuda=False, env={"FLUX_WEIGHTS": "public", "FLUX_WEIGHTS_HOST": hub.base})
    kinds = {**srcs.variants, weights.SAFETY: srcs.safety, weights.SAFETY_SECOND: srcs.safety_second}
    loaded = 0
    for kind, source in kinds.items():
        path = weights.locate(source, kind, srcs.endpoints.get(kind))
        if kind in variants.VARIANTS and twins[kind].is_file():  # a single-file checkpoint: that file, whole
            assert path.read_bytes() == twins[kind].read_bytes(), kind
            loaded += path.stat().st_size
        elif kind in variants.VARIANTS:
            want = {n: d for n, d in digests(twins[kind]).items()
                    if n.split("/")[0] in ("model_index.json", *[f.split("/")[0] for f in variants.get(kind).files])}
            assert digests(path) == want, kind
            loaded += loaded_bytes(path)
    fetched = sum(int(b) - int(a) + 1 for a, b in (r.removeprefix("bytes=").split("-") for r in hub.ranged_gets()))
    whole_tars = [r.path for r in hub.requests if r.path.endswith(".tar") and "Range" not in r.headers]
    # what loads, and the headers of every member (a few blocks each); never the three unread GiB members
    assert not whole_tars and fetched <= loaded + 2**20, f"{fetched} bytes of the tars fetched for {loaded} loaded"
