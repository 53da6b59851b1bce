"""The GPU memory plan: transformers placed within a byte budget, least recently used out first."""

from __future__ import annotations

import pytest
import torch

from flux.errors import UserError
from flux.memory import Residency, module_bytes


def model(mb: int) -> torch.nn.Module:
    return torch.nn.Linear(1024, mb * 256, bias=False)  # 1024 * 256 * 4 bytes = 1 MiB per mb


def where(module) -> str:
    return next(module.parameters()).device.type


def test_module_bytes_counts_fp8_storage():
    from torchao.quantization import Float8WeightOnlyConfig, quantize_

    layer = torch.nn.Linear(64, 64, bias=False)
    assert module_bytes(layer) == 64 * 64 * 4
    quantize_(layer, Float8WeightOnlyConfig())
    assert 64 * 64 <= module_bytes(layer) < 64 * 64 * 2  # one byte a weight, plus per-row scales


def test_least_recently_used_transformers_leave_the_gpu_first():
    memory = Residency(torch.device("cuda"), budget=3 * 1024**2)
    moves = []
    memory._move = lambda name, device: moves.append((name, device.type))  # record, instead of .to() (no GPU here)
    for name, mb in (("dev", 2), ("dev-fp8", 1), ("schnell", 2)):
        memory.add(name, model(mb), resident=False)
    memory.use("dev")
    memory.use("dev-fp8")
    assert moves == [("dev", "cuda"), ("dev-fp8", "cuda")]
    memory.use("dev")  # now the most recent: schnell pushes out dev-fp8 first, then dev
    memory.use("schnell")
    assert moves[2:] == [("dev-fp8", "cpu"), ("dev", "cpu"), ("schnell", "cuda")]
    memory.use("dev-fp8")  # fits beside schnell
    assert list(memory.resident) == ["schnell", "dev-fp8"] and moves[-1] == ("dev-fp8", "cuda")


def test_no_budget_means_nothing_moves_and_too_big_is_refused():
    free = Residency(torch.device("cpu"), None)
    big = model(4)
    free.add("dev", big, resident=True)
    free.use("dev")
    assert where(big) == "cpu" and list(free.resident) == ["dev"]
    tight = Residency(torch.device("cuda"), budget=1024**2)
    tight.add("dev", model(2), resident=False)
    with pytest.raises(UserError, match="does not fit"):
        tight.use("dev")
