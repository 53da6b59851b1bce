"""One transformer checkpoint in a single file, in Black Forest Labs' layout, as a variant's weights (flux/singlefile.py):
a tiny twin written that way loads through the same code a real one does, from a local path and over HTTP (fetched,
prefetched, checked), and gives the diffusers-layout twin's image bit for bit; its keys read exactly as diffusers'
converter reads FLUX.1's; every variant has its published config; what is not such a checkpoint is refused in our
words; script/weights-check reads the header only."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from flux import bfl, singlefile, survey, variants, weights
from flux.engine import Engine
from flux.errors import UserError, WeightsError
from flux.fakes import tiny
from flux.request import Request
from flux.settings import Settings
from tests.helpers.http import FileServer

KREA = variants.get("krea-dev")


@pytest.fixture(scope="module")
def base(weights_dir):
    return weights.locate(weights.TINY, variants.BASE.name)


@pytest.fixture(scope="module")
def krea_file(tmp_path_factory):
    """krea-dev's tiny twin as one BFL single-file checkpoint."""
    return tiny.ensure_single_file(tmp_path_factory.mktemp("single") / "flux1-krea-dev.safetensors", KREA)


def image(base, source: str, prefetch: bool = False) -> bytes:
    """krea-dev's image of one request, on an engine whose krea-dev weights are `source`."""
    from diffusers import FluxPipeline

    engine = Engine(FluxPipeline.from_pretrained(base, dtype=torch.float32), None,
                    {**weights.sources(has_cuda=False).variants, KREA.name: source}, torch.device("cpu"),
                    torch.float32, Settings(prefetch=prefetch), compile_bundle=None)
    if prefetch:
        assert engine.start_prefetch().names == [KREA.name]
    req = Request.build(prompt="a knitted purple prune", model=KREA.name, seed=3, megapixels="0.25",
                        num_inference_steps=2)
    generated = engine.generate(req)
    assert engine.pipeline(KREA.name, "txt2img").scheduler.config.use_dynamic_shifting  # the twin's config folder
    return generated.images[0].tobytes()


def published(name: str) -> dict[str, torch.Tensor]:
    """The state dict of a variant's full-size transformer as its published config builds it, on the meta device."""
    from diffusers import FluxTransformer2DModel

    config = json.loads((singlefile.CONFIGS / name / "transformer" / "config.json").read_text())
    with torch.device("meta"):
        return FluxTransformer2DModel.from_config(config).state_dict()


def thin_state(name: str) -> dict[str, torch.Tensor]:
    """A variant's full-size parameters at their row counts, two columns wide (cheap at full width)."""
    generator = torch.Generator().manual_seed(0)
    return {k: torch.randn(v.shape[:1] + ((2,) if v.ndim > 1 else ()), generator=generator)
            for k, v in published(name).items()}


@pytest.mark.parametrize("name", ["dev", "schnell", "fill-dev"])
def test_bfl_keys_read_exactly_as_diffusers_converter_reads_them_at_flux1_width(name):
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    state = thin_state(name)
    written = bfl.from_diffusers(dict(state))
    assert "single_blocks.37.linear1.weight" in written and not bfl.unknown(written)
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(written))
    ours = bfl.to_diffusers({f"model.diffusion_model.{k}": v for k, v in written.items()})  # a wrapped copy reads too
    assert set(theirs) == set(ours) == set(state)
    assert all(torch.equal(theirs[k], state[k]) and torch.equal(ours[k], state[k]) for k in state)


def test_a_full_size_checkpoint_is_read_with_its_variants_published_config_and_another_is_refused(weights_root):
    def header(name: str) -> dict[str, list[int]]:  # what a real checkpoint's header says
        return {k: list(v.shape) for k, v in bfl.from_diffusers(published(name)).items()}

    assert singlefile.config_for(header("dev"), KREA, "krea-dev weights", "f.sft") == singlefile.CONFIGS / "krea-dev"
    assert not (weights_root / "tiny").exists()  # the tiny twin's config is not even written
    with pytest.raises(WeightsError, match=r"flux1-fill-dev.safetensors is not FLUX.1-Krea-dev's transformer: input "
                                           r"channels 384, not 64 \(the config: flux/configs/krea-dev\)\. Point "
                                           "FLUX_KREA_DEV_WEIGHTS at"):
        singlefile.config_for(header("fill-dev"), KREA, "krea-dev weights", "flux1-fill-dev.safetensors")


def test_every_variant_has_its_published_config_and_it_agrees_with_its_row():
    for v in variants.VARIANTS.values():
        folder = singlefile.CONFIGS / v.name
        transformer = json.loads((folder / "transformer" / "config.json").read_text())
        scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        assert transformer["_class_name"] == "FluxTransformer2DModel" and transformer["guidance_embeds"] == v.guidance
        assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler"
        assert {k: scheduler[k] for k in v.scheduler} == v.scheduler, v.name
    fill = json.loads((singlefile.CONFIGS / "fill-dev" / "transformer" / "config.json").read_text())
    assert (fill["in_channels"], fill["out_channels"]) == (384, 64)  # its row comes with its task


def test_a_tiny_twin_as_a_bfl_single_file_gives_the_diffusers_twins_image_from_a_path_and_over_http(
        base, krea_file, weights_root, caplog, monkeypatch):
    import dataclasses

    monkeypatch.setattr(weights, "TAR_LIMITS", dataclasses.replace(weights.TAR_LIMITS, part_size=64 * 1024))
    expected = image(base, weights.TINY)
    assert image(base, str(krea_file)) == expected
    caplog.set_level(logging.INFO, logger="flux")
    with FileServer() as server:
        url = server.add("/black-forest-labs/krea/flux1-krea-dev.sft", krea_file.read_bytes()) + "?sig=SECRET"
        assert weights.form_of(url, KREA.name)[0] == singlefile.URL
        assert image(base, url, prefetch=True) == expected  # fetched in the background, then read
        assert len(server.ranged_gets()) > 1  # in parallel ranged parts
        fetched = weights.locate(url, KREA.name)
        assert fetched.name == "flux1-krea-dev.sft" and (fetched.parent / ".complete").is_file()
        assert fetched.read_bytes() == krea_file.read_bytes() and not weights.needs_download(url, KREA.name)
        count = len(server.requests)
        assert image(base, url) == expected and len(server.requests) == count  # on disk: no request at all
    assert "SECRET" not in caplog.text and "SECRET" not in str(fetched)


def test_the_base_variant_refuses_a_single_file(krea_file, weights_root):
    with pytest.raises(WeightsError, match="one transformer checkpoint, but this setting needs every component .* "
                                           "a folder in diffusers format, a Hugging Face repo id or an https URL of "
                                           "a .tar .*FLUX_KREA_DEV_WEIGHTS"):
        weights.locate(str(krea_file), variants.BASE.name)


def test_what_is_not_the_variants_bfl_checkpoint_is_refused_in_our_words(tmp_path, krea_file, weights_root):
    from safetensors.torch import save_file

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + b"\0" * 64)
    with pytest.raises(WeightsError, match="junk.safetensors is not a complete safetensors file"):
        weights.locate(str(junk), KREA.name)
    schnell = tiny.ensure_single_file(tmp_path / "schnell.safetensors", variants.get("schnell"))
    with pytest.raises(WeightsError, match=r"is not FLUX.1-Krea-dev's transformer: guidance embedder False, not True "
                                           r"\(the config: its tiny twin's\)"):
        weights.locate(str(schnell), KREA.name)  # FLUX.1-schnell's twin has no guidance embedder
    other = tmp_path / "unet.safetensors"
    save_file({"down_blocks.0.weight": torch.zeros(2)}, other)
    with pytest.raises(WeightsError, match="not a FLUX.1 transformer checkpoint in Black Forest Labs' layout"):
        weights.locate(str(other), KREA.name)
    with pytest.raises(WeightsError, match="does not exist"):
        weights.locate(str(tmp_path / "missing.sft"), KREA.name)
    with FileServer() as server:  # a download that is no safetensors file is not kept
        url = server.add("/w/junk.safetensors", junk.read_bytes())
        with pytest.raises(UserError, match="junk.safetensors is not a complete safetensors file"):
            weights.locate(url, KREA.name)
        dest = weights.download_folder(url, KREA.name)
        assert weights.needs_download(url, KREA.name) and not (dest / "junk.safetensors").exists()


def test_the_disk_is_checked_for_the_files_size_before_it_is_fetched(krea_file, weights_root, monkeypatch):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("shutil.disk_usage", lambda path: usage(2**40, 2**40 - 2**20, 2**20))  # 1 MiB free
    with FileServer() as server:
        url = server.add("/w/flux1-krea-dev.safetensors", krea_file.read_bytes())
        with pytest.raises(UserError, match="krea-dev weights: not enough disk to fetch them: 1.0 MiB free"):
            weights.locate(url, KREA.name)
        assert [r.headers.get("Range") for r in server.requests] == ["bytes=0-0"]  # the probe only


def test_weights_check_reads_a_single_files_header_only(krea_file, weights_root):
    size = krea_file.stat().st_size
    with FileServer() as server:
        url = server.add("/kontext/flux1-krea-dev.safetensors", krea_file.read_bytes())
        found = survey.survey(url, KREA.name)
        plain = server.add("/plain.safetensors", krea_file.read_bytes(), no_ranges=True)
        refused = survey.survey(plain, KREA.name)
        read = sum(int(b) - int(a) + 1 for a, b in (r.removeprefix("bytes=").split("-") for r in server.ranged_gets()))
    assert found.holds and found.form == singlefile.URL and found.files == {"flux1-krea-dev.safetensors": size}
    assert found.holds_what.startswith("one transformer checkpoint in BFL's layout (1 double and 2 single blocks")
    header = int.from_bytes(krea_file.read_bytes()[:8], "little")
    assert read == 8 + header < size  # the header's length, then the header: no tensor data
    assert not refused.holds and "does not take byte ranges" in refused.problem
    assert survey.survey(str(krea_file), KREA.name).holds
    assert "one transformer checkpoint" in survey.survey(str(krea_file), variants.BASE.name).problem
