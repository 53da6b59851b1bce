"""Small GPUs, simulated on the tiny FLUX: FLUX_GPU_MEMORY_GB on a machine without a GPU gives the engine that budget,
and the plan's offload paths run for real: T5 streamed through diffusers' group offloading (its block groups onloaded
and offloaded around each prompt), bf16 dev kept in CPU memory while requests run its fp8 copy, the fp8 copy of a
variant loaded on first use built then and swapped with dev's. There is one device here, so "moving" keeps the tensors where they are, but
every move goes through the same calls as on a GPU and is counted. Each image is bit-identical to the one the
all-resident engine makes. Also: go_fast's fp8 copy is built one block at a time, bit for bit what pruna's smash makes,
and the settings' and the plan's refusals."""

from __future__ import annotations

import copy
import logging
import types
import weakref

import numpy as np
import pytest
import torch

from flux import memory, output, variants, weights
from flux.engine import Engine
from flux.errors import UserError
from flux.memory import CPU, GPU, ON_DEMAND, STREAMED, GiB
from flux.request import Request
from flux.errors import SettingsError
from flux.settings import Settings
from flux.speed import fp8 as fp8_, projections
from tests.helpers import loras

STEPS = 3
FIRST, NEXT = variants.ON_FIRST_USE[:2]  # variants loaded on first use, from the table


def tiny_pipe(dtype=torch.float32):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(weights.locate(weights.sources(has_cuda=False).base, "dev"), dtype=dtype)


def build(gpu_memory: int | None = None, host_memory: int | None = None) -> Engine:
    """An engine on the tiny weights with a simulated GPU budget (None: everything resident) and CPU memory for
    weights (None: no limit), no safety checker."""
    return Engine(tiny_pipe(), None, weights.sources(has_cuda=False).variants, torch.device("cpu"), torch.float32,
                  Settings(gpu_memory=gpu_memory, host_memory=host_memory), compile_bundle=None)


def request(**inputs) -> Request:
    return Request.build(**{"prompt": "a knitted purple prune", "seed": 7, "num_inference_steps": STEPS,
                            "megapixels": "0.25", **inputs})


def render(engine, **inputs) -> np.ndarray:
    return np.stack([np.asarray(img) for img in engine.generate(request(**inputs)).images])


@pytest.fixture(scope="module")
def sizes(weights_dir) -> memory.Sizes:
    """The tiny model's sizes as the engine measures them (projections fused, T5 streamed without CUDA streams)."""
    pipe = tiny_pipe()
    projections.fuse_projections(pipe.transformer)
    return memory.Sizes.of(pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, pipe.vae, streams=False)


def small_budget(sizes: memory.Sizes) -> int:
    """Room for the shared models, fp8 dev and T5's streamed blocks with the planned request: a "24 GB" GPU."""
    b = sizes.bytes
    return (sum(b[n] for n in memory.SHARED) + b["dev-fp8"] + sizes.streamed + sizes.working
            + (b["text_encoder_2"] - sizes.streamed) // 2)


def mid_budget(sizes: memory.Sizes) -> int:
    """bf16 dev fits too, T5 does not: a "40 GB" GPU."""
    return small_budget(sizes) + sizes.bytes["dev"]


@pytest.fixture(scope="module")
def resident(weights_dir) -> Engine:
    return build()


@pytest.fixture(scope="module")
def small(sizes) -> Engine:
    return build(small_budget(sizes))


@pytest.fixture(scope="module")
def mid(sizes) -> Engine:
    return build(mid_budget(sizes))


@pytest.fixture
def group_moves(monkeypatch):
    """Counts the onloads and offloads diffusers' group offloading makes (the real ones run: spies, not mocks)."""
    from diffusers.hooks.group_offloading import ModuleGroup

    counts = {"onload": 0, "offload": 0}
    for name in ("onload_", "offload_"):
        real = getattr(ModuleGroup, name)

        def spy(self, _real=real, _name=name.rstrip("_")):
            counts[_name] += 1
            return _real(self)

        monkeypatch.setattr(ModuleGroup, name, spy)
    return counts


def test_a_small_gpu_plan_keeps_fp8_dev_and_streams_t5(small, sizes):
    plan = small.plan
    assert [plan.where(n) for n in ("dev", "dev-fp8", FIRST.name, FIRST.fp8, "text_encoder_2")] == \
        [CPU, GPU, CPU, ON_DEMAND, STREAMED]
    t5 = small.base.text_encoder_2
    assert t5.encoder.block[0]._diffusers_hook.get_hook("group_offloading") is not None  # diffusers' hooks on T5
    assert "dev" not in small.transformers.copies and list(small.residency.resident) == ["dev-fp8"]
    assert small.residency.budget == plan.budget - plan.shared_gpu
    with pytest.raises(ValueError, match="does not run on this GPU"):
        small.copy("dev")


def test_a_request_without_go_fast_runs_fp8_on_a_small_gpu_bit_identical(small, resident, group_moves, tmp_path,
                                                                         caplog, sizes):
    """bf16 dev stays in CPU memory: the request runs dev-fp8, says so, and matches go_fast on the all-resident
    engine; T5 is streamed for the prompt (every block group onloaded and offloaded) and the move is counted."""
    assert np.array_equal(render(small), render(resident, go_fast=True))
    t5_groups = len(small.base.text_encoder_2.encoder.block)
    assert group_moves["onload"] >= t5_groups and group_moves["offload"] >= t5_groups
    with caplog.at_level(logging.INFO, logger="flux"):
        prediction = output.write(small.run(request(output_format="png")), tmp_path / "out")
    m = prediction.metrics
    assert (m["path"], m["memory.moves"]) == ("dev-fp8", ["text_encoder_2 streamed"])
    assert m["memory.moved_gb"] == round(sizes.bytes["text_encoder_2"] / GiB, 3)
    assert "keeps FLUX.1-dev in fp8 only: it ran as with go_fast" in caplog.text
    assert "this prediction moved" in caplog.text


def test_a_lora_on_a_small_gpu_is_fused_into_bf16_in_cpu_memory_and_reaches_fp8(small, resident):
    """The LoRA is fused into bf16 dev where it lives (CPU memory) and the fp8 layers it touched are re-quantized
    from it: the same images as go_fast with that LoRA on the all-resident engine; removed, bit-identical again."""
    update = loras.make_update(resident.pipeline("dev", "txt2img").transformer, "ALL", seed=11, strength=2)
    uri = loras.lora_uri(update)
    plain = render(small)
    with_lora = render(small, replicate_weights=uri)
    assert np.array_equal(with_lora, render(resident, go_fast=True, replicate_weights=uri))
    assert not np.array_equal(with_lora, plain)
    assert small.base.transformer.transformer_blocks[0].attn.to_q.weight.device.type == "cpu"
    assert np.array_equal(render(small), plain)
    assert np.array_equal(render(resident, go_fast=True), plain)


def test_a_variants_fp8_is_built_on_demand_and_swaps_with_dev_fp8(small, resident, tmp_path):
    """At 1 MP the small GPU has room for one fp8 transformer beside the request: the fp8 copy of a variant loaded on
    first use is quantized onto it (its bf16 blocks cross, counted), dev's moves out for the request's room; the next
    dev request moves them back. Images match the all-resident engine's go_fast ones."""
    dev_before = render(small, megapixels="1")
    got = output.write(small.run(request(model=FIRST.name, megapixels="1", output_format="png")), tmp_path / "a")
    got = got.metrics
    assert got["path"] == FIRST.fp8
    # the build (its bf16 blocks crossed to be quantized on the GPU), then room for the request
    assert got["memory.moves"] == [f"{FIRST.fp8} to gpu", "dev-fp8 to cpu", "text_encoder_2 streamed"]
    assert small.transformers.twins[FIRST.name].sync.pairs  # it follows its bf16's LoRAs like dev-fp8 follows dev's
    assert np.array_equal(render(small, model=FIRST.name, megapixels="1"),
                          render(resident, model=FIRST.name, go_fast=True, megapixels="1"))
    back = output.write(small.run(request(megapixels="1", output_format="png")), tmp_path / "b").metrics
    assert back["memory.moves"] == [f"{FIRST.fp8} to cpu", "dev-fp8 to gpu", "text_encoder_2 streamed"]
    assert np.array_equal(render(small, megapixels="1"), dev_before)


def test_a_40gb_like_gpu_keeps_bf16_dev_and_streams_t5_bit_identical(mid, resident, group_moves, tmp_path):
    assert [mid.plan.where(n) for n in ("dev", "dev-fp8", "text_encoder_2")] == [GPU, GPU, STREAMED]
    assert np.array_equal(render(mid), render(resident))
    assert np.array_equal(render(mid, go_fast=True), render(resident, go_fast=True))
    assert group_moves["onload"] > 0
    m = output.write(mid.run(request(output_format="png")), tmp_path).metrics
    assert (m["path"], m["memory.moves"]) == ("dev", ["text_encoder_2 streamed"])


def test_the_all_resident_engine_moves_nothing(resident, tmp_path):
    m = output.write(resident.run(request(output_format="png")), tmp_path).metrics
    assert resident.plan is None and (m["memory.moves"], m["memory.moved_gb"]) == ([], 0.0)


# ----- CPU memory: the variants loaded on first use take turns ----------------------------------------------------

def short_of_ram(sizes: memory.Sizes, variants_kept: float) -> Engine:
    """A small GPU whose CPU memory holds the base's share and `variants_kept` of a variant loaded on first use."""
    small = memory.plan(small_budget(sizes), sizes, floor=0)
    one = sizes.bytes[FIRST.name] + sizes.bytes[FIRST.fp8]
    return build(small_budget(sizes), small.host_floor + int(variants_kept * one))


def test_variants_loaded_on_first_use_take_turns_in_cpu_memory_and_come_back_the_same(sizes, resident, caplog):
    """Room for one variant beside dev's share: the next variant's first request drops the first (least recently
    used) before it is read, the first's next request reads it again from disk and drops the next; every image, with
    and without a
    LoRA, is the one the engine without limits makes, and a dropped variant's weights are freed."""
    engine = short_of_ram(sizes, 1.5)
    uri = loras.lora_uri(loras.make_update(resident.pipeline("dev", "txt2img").transformer, "ALL", seed=5))
    first = render(engine, model=FIRST.name, replicate_weights=uri)
    bf16 = engine.transformers._pipes[FIRST.name].transformer
    kept = {id(p) for p in bf16.parameters()} & set(engine.loras._kept)  # the originals its LoRA keeps
    assert kept
    dropped = [weakref.ref(engine.transformers.copies[FIRST.fp8].transformer), weakref.ref(bf16)]
    del bf16
    with caplog.at_level(logging.INFO, logger="flux"):
        next_image = render(engine, model=NEXT.name)
    assert f"memory: {FIRST.name} dropped" in caplog.text
    assert "its next request reads it again from the disk" in caplog.text
    assert list(engine.transformers.loaded) == [NEXT.name] and FIRST.fp8 not in engine.transformers.copies
    assert [ref() for ref in dropped] == [None, None]  # the dropped transformers are freed
    assert not kept & set(engine.loras._kept)  # and the originals its LoRA kept
    assert np.array_equal(next_image, render(resident, model=NEXT.name, go_fast=True))
    again = render(engine, model=FIRST.name, replicate_weights=uri)
    assert list(engine.transformers.loaded) == [FIRST.name]
    assert np.array_equal(again, first)
    assert np.array_equal(again, render(resident, model=FIRST.name, go_fast=True, replicate_weights=uri))
    assert np.array_equal(render(engine, model=FIRST.name), render(resident, model=FIRST.name, go_fast=True))
    assert np.array_equal(render(engine), render(resident, go_fast=True))  # dev never dropped


def test_a_variant_moved_out_of_the_gpu_is_dropped_where_cpu_memory_cannot_hold_it(sizes, resident, tmp_path, caplog):
    """Room for the first variant's bf16 only: when dev's next request needs the GPU room its fp8 copy holds, the
    variant is dropped rather than moved out; nothing was moved to CPU memory, and dev's image is unchanged."""
    engine = short_of_ram(sizes, 1.0 * sizes.bytes[FIRST.name] / (sizes.bytes[FIRST.name] + sizes.bytes[FIRST.fp8]))
    render(engine, model=FIRST.name, megapixels="1")
    with caplog.at_level(logging.INFO, logger="flux"):
        moved = output.write(engine.run(request(megapixels="1", output_format="png")), tmp_path).metrics
    assert f"memory: {FIRST.name} dropped" in caplog.text
    assert f"moved out of the GPU, {FIRST.fp8} would not fit" in caplog.text
    assert f"{FIRST.fp8} to cpu" not in moved["memory.moves"] and not engine.transformers.loaded
    assert np.array_equal(render(engine, megapixels="1"), render(resident, go_fast=True, megapixels="1"))


def test_flux_host_memory_gb_is_read_once_and_defaults_to_the_ram_less_8_gb(tmp_path):
    import psutil

    cpu = torch.device("cpu")
    assert Settings.from_env(cpu, tmp_path, {"FLUX_HOST_MEMORY_GB": "48"}).host_memory == 48 * GiB
    assert Settings.from_env(cpu, tmp_path, {}).host_memory == psutil.virtual_memory().total - 8 * GiB
    with pytest.raises(SettingsError, match=r"FLUX_HOST_MEMORY_GB='lots' is not a size: set it to the GB of CPU "
                                            r"memory this container may use, e\.g\. 48, or unset it"):
        Settings.from_env(cpu, tmp_path, {"FLUX_HOST_MEMORY_GB": "lots"})


# ----- go_fast's fp8 copy, a block at a time ---------------------------------------------------------------------


def test_the_fp8_copy_is_built_one_bf16_block_at_a_time_and_matches_pruna(monkeypatch, weights_dir):
    """setup never holds two bf16 transformers: while the copy is built, at most one block's bf16 weights are
    alive besides the source's (each block copy's weights are freed once quantized). The result is bit for bit what
    pruna's smash with its torchao algorithm makes of a whole copy."""
    from pruna import SmashConfig, smash

    pipe = tiny_pipe(torch.bfloat16)
    projections.fuse_projections(pipe.transformer)
    source = pipe.transformer
    block_bytes = max(memory.module_bytes(b) for b in (*source.transformer_blocks, *source.single_transformer_blocks))
    alive, peak = [0], [0]

    def forget(nbytes):
        alive[0] -= nbytes

    real_drop = projections.drop_unfused

    def tracked(part):  # called on each block copy before it is quantized
        real_drop(part)
        for layer in part.modules():
            if isinstance(layer, torch.nn.Linear):
                nbytes = layer.weight.numel() * layer.weight.element_size()
                alive[0] += nbytes
                weakref.finalize(layer.weight, forget, nbytes)
        peak[0] = max(peak[0], alive[0])

    monkeypatch.setattr(fp8_, "drop_unfused", tracked)  # as the fp8 module calls it
    built = fp8_.fp8_transformer(source, "fp8dqrow", torch.device("cpu"), skip_hardware_check=True)
    assert 0 < peak[0] <= block_bytes and alive[0] == 0

    twin = copy.deepcopy(source)
    real_drop(twin)
    config = SmashConfig(["torchao"], device="cpu")
    config.add({"torchao_quant_type": "fp8dqrow"})
    config.disable_saving()
    with fp8_.hardware_check_skipped(True):
        smash(_with(pipe, twin), config)
    theirs, ours = dict(twin.named_parameters()), dict(built.named_parameters())
    assert sorted(theirs) == sorted(ours)
    for name, a in theirs.items():
        b = ours[name]
        assert type(a) is type(b), name
        if hasattr(a, "qdata"):
            assert torch.equal(a.qdata.view(torch.uint8), b.qdata.view(torch.uint8)) and torch.equal(a.scale, b.scale)
        else:
            assert torch.equal(a, b), name
    shared = {p.untyped_storage().data_ptr() for p in source.parameters()}
    assert not shared & {getattr(p, "qdata", p).untyped_storage().data_ptr() for p in built.parameters()}


def _with(pipe, transformer):
    from diffusers import FluxPipeline

    return FluxPipeline(**{**pipe.components, "transformer": transformer})


# ----- settings and refusals -------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["lots", "0", "-8", "inf", "nan"])
def test_flux_gpu_memory_gb_that_is_not_a_size_is_refused(value, tmp_path):
    with pytest.raises(SettingsError, match="FLUX_GPU_MEMORY_GB=.* is not a size: set it to the GB"):
        Settings.from_env(torch.device("cpu"), tmp_path, {"FLUX_GPU_MEMORY_GB": value})


def test_flux_gpu_memory_gb_caps_the_gpu_and_may_not_exceed_it(monkeypatch, tmp_path):
    """On a GPU the setting caps the budget; more than the card reports is an error naming what it has. (No GPU
    here: the card's reported memory is given to torch's device query.)"""
    card = types.SimpleNamespace(total_memory=int(23.6 * GiB), major=8, minor=9, name="a 24 GB card")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: card)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    env = {"FLUX_COMPILE": "off"}
    assert Settings.from_env(torch.device("cuda"), tmp_path, env | {"FLUX_GPU_MEMORY_GB": "20"}).gpu_memory == 20 * GiB
    with pytest.raises(SettingsError, match=r"FLUX_GPU_MEMORY_GB=30 is more than this GPU has \(23.6 GB\): set it to "
                                            r"23.6 or less"):
        Settings.from_env(torch.device("cuda"), tmp_path, env | {"FLUX_GPU_MEMORY_GB": "30"})
    assert Settings.from_env(torch.device("cpu"), tmp_path, {"FLUX_GPU_MEMORY_GB": "1.5"}).gpu_memory == int(1.5 * GiB)


def test_a_budget_below_the_smallest_plan_is_a_setup_error_after_logging_the_plan(sizes, caplog):
    b = sizes.bytes
    minimum = sum(b[n] for n in memory.SHARED) + b["dev-fp8"] + sizes.streamed + sizes.working
    with caplog.at_level(logging.INFO, logger="flux"), pytest.raises(UserError) as err:
        build(minimum - 1)
    assert "the smallest plan (fp8 dev, T5 streamed) needs" in str(err.value)
    assert "Run on a GPU of 24 GB" in str(err.value)
    table = caplog.text[caplog.text.index("memory plan for"):]
    for name in memory.COMPONENTS:
        assert f"\n{name} " in table
    assert "does not fit" in table
    assert build(minimum).plan.fits
