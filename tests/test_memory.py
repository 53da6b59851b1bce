"""The GPU memory plan: transformers placed within a byte budget with room for each request, least recently used
out first; FORA's memory counted; sizes planned on the full-size model (meta device, nothing allocated)."""

from __future__ import annotations

import pytest
import torch

from flux import fullsize, speed
from flux.errors import UserError
from flux.memory import GiB, Residency, activation_bytes, fp8_bytes, module_bytes

MiB = 1024**2


def model(mb: int) -> torch.nn.Module:
    return torch.nn.Linear(1024, mb * 256, bias=False)  # 1024 * 256 * 4 bytes = 1 MiB per mb


def where(module) -> str:
    return next(module.parameters()).device.type


def recording(budget: int) -> tuple[Residency, list]:
    """A GPU Residency whose moves are recorded, (name, device), instead of made (no GPU here)."""
    moves = []
    memory = Residency(torch.device("cuda"), budget)
    memory._move = lambda name, device: moves.append((name, device.type))
    return memory, moves


def test_module_bytes_counts_fp8_storage_and_shared_storage_once():
    from torchao.quantization import Float8WeightOnlyConfig, quantize_

    layer = torch.nn.Linear(64, 64, bias=False)
    assert module_bytes(layer) == 64 * 64 * 4
    planned = fp8_bytes(layer)
    quantize_(layer, Float8WeightOnlyConfig())
    assert module_bytes(layer) == planned == 64 * 64 + 64 * 4  # one byte a weight, a float32 scale per row
    pair = torch.nn.ModuleList([torch.nn.Linear(64, 64, bias=False), torch.nn.Linear(64, 32, bias=False)])
    pair[1].weight.data = pair[0].weight.data[:32]  # a view, like fused projections' separate q, k, v
    assert module_bytes(pair) == 64 * 64 * 4


def test_least_recently_used_transformers_leave_the_gpu_first():
    memory, moves = recording(3 * MiB)
    for name, mb in (("dev", 2), ("dev-fp8", 1), ("schnell", 2)):
        memory.add(name, model(mb), resident=False)
    memory.use("dev", 0)
    memory.use("dev-fp8", 0)
    assert moves == [("dev", "cuda"), ("dev-fp8", "cuda")]
    memory.use("dev", 0)  # now the most recent: schnell pushes out dev-fp8 first, then dev
    memory.use("schnell", 0)
    assert moves[2:] == [("dev-fp8", "cpu"), ("dev", "cpu"), ("schnell", "cuda")]
    memory.use("dev-fp8", 0)  # fits beside schnell
    assert list(memory.resident) == ["schnell", "dev-fp8"] and moves[-1] == ("dev-fp8", "cuda")


def test_a_request_that_needs_room_moves_the_least_recently_used_out():
    memory, moves = recording(5 * MiB)
    for name, mb in (("dev", 2), ("dev-fp8", 1), ("schnell", 2)):
        memory.add(name, model(mb), resident=True)
    assert memory.plan("dev", 0) == []  # 5 MiB: all three fit when the request needs nothing
    assert memory.plan("dev", 1 * MiB) == ["dev-fp8"]  # least recently used first, never the one in use
    assert memory.plan("schnell", 3 * MiB) == ["dev", "dev-fp8"]
    memory.use("dev", 1 * MiB)
    assert list(memory.resident) == ["schnell", "dev"] and moves == [("dev-fp8", "cpu")]


def test_no_budget_means_nothing_moves_and_too_big_is_refused():
    free = Residency(torch.device("cpu"), None)
    big = model(4)
    free.add("dev", big, resident=True)
    free.use("dev")
    assert where(big) == "cpu" and list(free.resident) == ["dev"]
    tight, _ = recording(1 * MiB)
    tight.add("dev", model(2), resident=False)
    with pytest.raises(UserError, match="does not fit"):
        tight.use("dev", 0)


# ----- the full-size model ---------------------------------------------------------------------------------------

H100_80GB = 85_031_714_816  # what torch reports as an 80 GB H100's total memory (79.2 GiB)


@pytest.fixture(scope="module")
def full():
    """The full-size FLUX.1-dev on the meta device, and the byte sizes the plan works with."""
    pipe = fullsize.build("meta")
    shared = sum(module_bytes(getattr(pipe, n)) for n in ("text_encoder", "text_encoder_2", "vae"))
    dev = module_bytes(pipe.transformer)
    return pipe, shared, {"dev": dev, "dev-fp8": fp8_bytes(pipe.transformer), "schnell": dev}


def test_fora_holds_every_block_output_at_full_size(full):
    pipe, _, _ = full
    assert speed.fora_bytes(pipe.transformer.config, 1024, 1024, 4, 512) / 1e9 == pytest.approx(6.45, abs=0.01)
    assert speed.fora_bytes(pipe.transformer.config, 1440, 1440, 4, 512) / 1e9 == pytest.approx(12.06, abs=0.01)


def test_an_80gb_gpu_holds_all_three_and_makes_room_for_a_4_output_1440_speed_mode_request(full):
    """Every transformer resident on an 80 GB H100; a Juiced 1440x1440 request with 4 outputs needs activations plus
    FORA's 12 GB: the plan moves the least recently used transformer out, instead of running out of memory and
    falling back to one output at a time."""
    pipe, shared, sizes = full
    assert sizes["dev"] / GiB == pytest.approx(22.17, abs=0.01) and sizes["dev-fp8"] / GiB == pytest.approx(11.10, abs=0.01)
    memory = Residency(torch.device("cuda"), H100_80GB - shared, mover=lambda module, device: None)
    memory.size = sizes.__getitem__
    for name in ("dev-fp8", "schnell", "dev"):  # dev most recently used
        memory.add(name, None, resident=True)
    plain = activation_bytes(1440, 1440, 4)
    fora = speed.fora_bytes(pipe.transformer.config, 1440, 1440, 4, 512)
    assert memory.plan("dev", plain) == []  # without a speed mode everything stays
    assert sum(sizes.values()) + plain + fora > memory.budget  # FORA's memory does not fit beside all three
    evicted = memory.plan("dev", plain + fora)
    assert evicted == ["dev-fp8"]
    assert sum(sizes[n] for n in sizes if n not in evicted) + plain + fora <= memory.budget
