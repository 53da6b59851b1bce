"""One caller cannot harm the next: after any request, failed or not, the shared state (every module's class, every
weight, the LoRA cache's files) is what it was, and the next request is bit-identical to a fresh predictor's.

Each case goes through predict() on the shared tiny predictor, as cog calls it: LoRA files (data: URIs) whose
adapter metadata, tensors or archives are hostile or careless, and image/mask inputs that name files on this machine
instead of what cog delivered. A refused request fails with a UserError in our words (no library exception, no
library message); a case the loader can honour succeeds and goes away exactly. The fingerprint is
tests/helpers/state.py's. docs/reliability.md lists these cases with what a caller sees.
"""

from __future__ import annotations

import math
import os
import tempfile
import uuid
from pathlib import Path

import pytest
import torch
from cog import Path as CogPath

from flux.errors import UserError
from tests.helpers import hostile, loras, state
from tests.helpers.images import data_uri, encoded, gradient, save

KW = dict(aspect_ratio="custom", width=256, height=256, num_inference_steps=2, seed=11, output_format="png",
          disable_safety_checker=True)


def run(predict, **inputs) -> bytes:
    [path] = predict(**{**KW, **inputs})
    return path.read_bytes()


@pytest.fixture(scope="module")
def transformer(engine):
    return engine.pipeline("dev", "txt2img").transformer


@pytest.fixture(scope="module")
def update(transformer):
    return loras.make_update(transformer, "ATTENTION", seed=21)


@pytest.fixture(scope="module")
def cache_dir(weights_dir) -> Path:
    return weights_dir / "loras"


@pytest.fixture(scope="module")
def reference(predict, engine, cache_dir):
    """The image of a request without a LoRA, and the shared state's fingerprint, with the predictor at rest."""
    image = run(predict)
    return image, state.fingerprint(engine, cache_dir)


def test_the_reference_is_a_fresh_predictors(reference):
    """What every case is compared with is what a freshly set-up predictor gives and holds."""
    from predict import Predictor
    from tests.helpers.inputs import defaults

    fresh = Predictor()
    fresh.setup()
    [path] = fresh.predict(**{**defaults(), **KW})
    image, fingerprint = reference
    assert path.read_bytes() == image
    fresh_state = state.fingerprint(fresh.engine)  # what it holds: no variant loaded on first use yet
    assert not state.diff({k: v for k, v in fingerprint.items() if k in fresh_state}, fresh_state)


def without_files(fingerprint: dict) -> dict:
    return {k: v for k, v in fingerprint.items() if not k.startswith("files")}


def lora(body: bytes) -> str:
    return data_uri(body, "application/octet-stream")


# ----- LoRA files: (case, builder of the file's bytes, what the caller sees: a message pattern, or None: it works) ---

def _meta(**fields):
    return lambda u, t: hostile.metadata_fields(u, **fields)


def _tensors(change, layout="ai-toolkit"):
    return lambda u, t: hostile.tensors_changed(u, change, layout)


def _lycoris(change):
    def build(u, t):
        tensors, _ = loras.lycoris_file(t, "lokr", "bfl", "ATTENTION", seed=5)
        change(tensors)
        return loras.safetensors_bytes(tensors)
    return build


LORA_CASES = [
    # adapter metadata: read as numbers where it scales the LoRA, never as a configuration of the serving model
    ("modules_to_save in the metadata", _meta(modules_to_save=["norm_out"]), None),
    ("target_modules naming more than the file holds", _meta(target_modules=["to_q", "to_k", "to_v", "proj_out"]), None),
    ("an unknown metadata field", _meta(not_a_lora_config_field=1), None),
    ("layer_replication in the metadata", _meta(layer_replication=[[0, 1], [0, 1]]), None),
    ("rank 0 in the metadata", _meta(r=0), r"adapter metadata .*rank"),
    ("a rank in the metadata the weights do not have", _meta(r=8), r"adapter metadata .*rank"),
    ("lora_alpha not a number", _meta(lora_alpha="abc"), r"lora_alpha"),
    ("lora_alpha NaN", _meta(lora_alpha=float("nan")), r"lora_alpha"),
    ("lora_alpha so large the weights overflow", _meta(lora_alpha=1e38), r"too large"),
    ("DoRA in the metadata", _meta(use_dora=True), r"DoRA"),
    ("an alpha_pattern that is a regular expression", _meta(alpha_pattern={"to_.*": 4}), r"alpha_pattern"),
    ("metadata that is not JSON", lambda u, t: hostile.metadata_text(u, "{not json"), r"metadata .*not valid JSON"),
    ("metadata that is a JSON list", lambda u, t: hostile.metadata_text(u, "[1, 2]"), r"metadata"),
    # tensors
    ("a NaN in lora_B", _tensors(lambda d: hostile.poisoned(d, ".lora_B.weight", math.nan)), r"not finite"),
    ("an inf in lora_A", _tensors(lambda d: hostile.poisoned(d, ".lora_A.weight", math.inf)), r"not finite"),
    ("a NaN alpha (kohya)", _tensors(lambda d: hostile.poisoned(d, ".alpha", math.nan), "kohya"), r"not finite"),
    ("an inf alpha (kohya)", _tensors(lambda d: hostile.poisoned(d, ".alpha", math.inf), "kohya"), r"not finite"),
    ("rank-0 tensors", _tensors(hostile.rank_zero), r"rank 0"),
    ("integer tensors", _tensors(hostile.integers), r"not floating-point"),
    ("a full weight among the LoRA's", _tensors(lambda d: d.update({"transformer.norm_out.linear.weight": torch.zeros(64, 32)})),
     r"norm_out\.linear"),
    ("DoRA magnitudes", _tensors(lambda d: d.update({"transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector":
                                                     torch.ones(32)})), r"DoRA"),
    ("a LoKr with a NaN", _lycoris(lambda d: hostile.poisoned(d, ".lokr_w1", math.nan)), r"not finite"),
    ("a LoKr with a NaN alpha", _lycoris(lambda d: hostile.poisoned(d, ".alpha", math.nan)), r"not finite"),
    # archives
    ("a .tar.gz of 60,000 empty members", lambda u, t: hostile.targz_of_empty_members(60_000, loras.lora_bytes(u, "ai-toolkit")),
     r"more than [\d,]+ files"),
    ("a zip holding the .safetensors", lambda u, t: hostile.zip_of({"x/lora.safetensors": loras.lora_bytes(u, "ai-toolkit")}),
     None),
    ("a torch checkpoint (a zip holding a pickle)", lambda u, t: hostile.torch_zip_checkpoint(), r"pickle"),
    ("a zip holding two .safetensors", lambda u, t: hostile.zip_of({"a.safetensors": loras.lora_bytes(u, "ai-toolkit"),
                                                                   "b.safetensors": loras.lora_bytes(u, "kohya")}),
     r"several \.safetensors"),
]


@pytest.fixture(scope="module")
def good_lora(predict, update):
    """A sound LoRA and its images at scales 1 and 0.5: every case must leave it working as before."""
    uri = lora(loras.lora_bytes(update, "ai-toolkit"))
    image = run(predict, replicate_weights=uri)
    half = run(predict, replicate_weights=uri, lora_scale=0.5)
    assert half != image
    run(predict)  # at rest again
    return uri, image, half


@pytest.mark.parametrize("case,build,refused", LORA_CASES, ids=[c[0] for c in LORA_CASES])
def test_hostile_loras_leave_nothing_behind(predict, engine, reference, good_lora, cache_dir, update, transformer,
                                            case, build, refused):
    image, fresh = reference
    body = build(update, transformer)
    if refused is None:  # the same update, read the same way; then the next LoRA still works
        assert run(predict, replicate_weights=lora(body)) == good_lora[1]
        assert run(predict, replicate_weights=good_lora[0], lora_scale=0.5) == good_lora[2]  # fused afresh
    else:
        before = state.fingerprint(engine, cache_dir)
        with pytest.raises(UserError, match=refused) as failed:
            run(predict, replicate_weights=lora(body))
        assert not hostile.library_words(str(failed.value)), str(failed.value)
        assert not state.diff(before, state.fingerprint(engine, cache_dir))  # the cache too: nothing kept
    assert run(predict) == image
    assert not state.diff(without_files(fresh), state.fingerprint(engine))


@pytest.mark.parametrize("go_fast", [False, True], ids=["bf16", "go_fast"])
def test_a_lora_that_makes_the_latents_non_finite_fails_naming_it_and_its_scale(predict, engine, reference, update,
                                                                                go_fast):
    """Finite weights within the dtype's range, yet the activations overflow: never an all-black image."""
    image, fresh = reference
    expected = run(predict, go_fast=go_fast)
    body = hostile.metadata_fields(update, lora_alpha=1e30)
    with pytest.raises(UserError, match=r"not finite .*data: URI .* at scale 0\.7") as failed:
        run(predict, replicate_weights=lora(body), lora_scale=0.7, go_fast=go_fast)
    assert not hostile.library_words(str(failed.value))
    assert run(predict, go_fast=go_fast) == expected
    assert run(predict) == image
    assert not state.diff(without_files(fresh), state.fingerprint(engine))


# ----- image and mask: only files cog delivered for this prediction are read -------------------------------------

REFUSED_IMAGE = "image could not be read: send an uploaded file, a data: URI or an http(s) URL."


@pytest.fixture
def delivered():
    """A file as cog delivers it: cog's own Path for a data: URI, fetched by cog into its temporary file (which cog
    deletes after the prediction, and this fixture after the test)."""
    made = []

    def deliver(body: bytes, mime: str = "image/png") -> CogPath:
        made.append(CogPath.validate(data_uri(body, mime)).convert())
        return made[-1]

    yield deliver
    for path in made:
        path.unlink(missing_ok=True)


@pytest.fixture
def in_temp():
    """Names in the folder cog delivers into, with the prefix its temporary files have; removed afterwards."""
    made = []

    def name(suffix: str = ".png") -> Path:
        path = Path(tempfile.gettempdir()) / f"tmp{uuid.uuid4().hex[:8]}{suffix}"
        made.append(path)
        return path

    yield name
    for path in made:
        if path.is_dir() and not path.is_symlink():
            path.rmdir()
        elif path.is_symlink() or path.exists():
            path.unlink()


def _fifo(name):
    path = name()
    os.mkfifo(path)
    return CogPath(path)


def _symlink(name, tmp_path):
    target = save(gradient(256, 256), tmp_path, "elsewhere.png")
    path = name()
    path.symlink_to(target)
    return CogPath(path)


def _hardlink(name, tmp_path):
    target = save(gradient(256, 256), tmp_path, "elsewhere.png")
    path = name()
    os.link(target, path)
    return CogPath(path)


def _folder(name):
    path = name("")
    path.mkdir()
    return CogPath(path)


PATH_CASES = [
    ("a path string to a file of the server", lambda name, tmp: "/etc/hostname"),
    ("a path string to a missing file", lambda name, tmp: "/nonexistent/photo.png"),
    ("a path string to a folder", lambda name, tmp: "/etc"),
    ("a path string to a FIFO", lambda name, tmp: str(_fifo(name))),
    ("cog's Path to a file outside its temporary folder", lambda name, tmp: CogPath(save(gradient(256, 256), tmp, "x.png"))),
    ("cog's Path to a FIFO in its temporary folder", lambda name, tmp: _fifo(name)),
    ("cog's Path to a symlink in its temporary folder", _symlink),
    ("cog's Path to a hard link in its temporary folder", _hardlink),
    ("cog's Path to a folder in its temporary folder", lambda name, tmp: _folder(name)),
    ("cog's Path to /dev/zero", lambda name, tmp: CogPath("/dev/zero")),
]


@pytest.mark.parametrize("case,make", PATH_CASES, ids=[c[0] for c in PATH_CASES])
@pytest.mark.parametrize("field", ["image", "mask"])
def test_files_cog_did_not_deliver_are_refused_with_one_message(predict, engine, reference, cache_dir, in_temp,
                                                                delivered, tmp_path, case, make, field):
    image, _ = reference
    before = state.fingerprint(engine, cache_dir)
    value = make(in_temp, tmp_path)
    inputs = {field: value} if field == "image" else {"image": delivered(encoded(gradient(256, 256))), "mask": value}
    with pytest.raises(UserError) as failed:
        run(predict, prompt_strength=1.0, **inputs)
    assert str(failed.value) == REFUSED_IMAGE.replace("image", field, 1)
    assert not state.diff(before, state.fingerprint(engine, cache_dir))
    assert run(predict) == image


def test_files_cog_delivered_are_read(predict, delivered, tmp_path):
    """An upload / data: URI as cog hands it to predict() works, as does a Python caller's own file."""
    body = encoded(gradient(256, 256))
    own = save(gradient(256, 256), tmp_path, "own.png")
    # at strength 0.5 the output depends on the image's pixels (at 1.0 it would not: the test could not fail)
    kw = dict(prompt_strength=0.5, num_inference_steps=4)
    assert run(predict, image=delivered(body), **kw) == run(predict, image=own, **kw)
