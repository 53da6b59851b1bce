"""The GPU memory plan: the planner for every GPU size on the full-size model (meta device, nothing allocated), what
setup's peak is, script/memory-plan; transformers placed within a byte budget with room for each request, "on demand"
and least recently used out first; FORA's memory counted."""

from __future__ import annotations

import pytest
import torch

from flux import memory, variants
from flux.fakes import fullsize
from flux.errors import UserError
from flux.memory import CPU, GPU, ON_DEMAND, STREAMED, GiB, activation_bytes, fp8_bytes, module_bytes
from flux.residency import Residency
from flux.speed import step_cache

MiB = 1024**2
FIRST = variants.ON_FIRST_USE[0]  # a variant loaded on first use, from the table


def model(mb: int) -> torch.nn.Module:
    return torch.nn.Linear(1024, mb * 256, bias=False)  # 1024 * 256 * 4 bytes = 1 MiB per mb


def where(module) -> str:
    return next(module.parameters()).device.type


def recording(budget: int, pinned=()) -> tuple[Residency, list]:
    """A GPU Residency whose moves are recorded, (name, device), instead of made (no GPU here)."""
    moves = []
    residency = Residency(torch.device("cuda"), budget, pinned=pinned)
    residency._move = lambda name, gpu: moves.append((name, "cuda" if gpu else "cpu"))
    return residency, moves


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
    residency, moves = recording(3 * MiB)
    for name, mb in (("dev", 2), ("dev-fp8", 1), (FIRST.name, 2)):
        residency.add(name, model(mb), resident=False)
    residency.use("dev", 0)
    residency.use("dev-fp8", 0)
    assert moves == [("dev", "cuda"), ("dev-fp8", "cuda")]
    residency.use("dev", 0)  # now the most recent: FIRST pushes out dev-fp8 first, then dev
    residency.use(FIRST.name, 0)
    assert moves[2:] == [("dev-fp8", "cpu"), ("dev", "cpu"), (FIRST.name, "cuda")]
    residency.use("dev-fp8", 0)  # fits beside FIRST
    assert list(residency.resident) == [FIRST.name, "dev-fp8"] and moves[-1] == ("dev-fp8", "cuda")


def test_a_request_that_needs_room_moves_the_least_recently_used_out():
    residency, moves = recording(5 * MiB)
    for name, mb in (("dev", 2), ("dev-fp8", 1), (FIRST.name, 2)):
        residency.add(name, model(mb), resident=True)
    assert residency.evictions("dev", 0) == []  # 5 MiB: all three fit when the request needs nothing
    assert residency.evictions("dev", 1 * MiB) == ["dev-fp8"]  # least recently used first, never the one in use
    assert residency.evictions(FIRST.name, 3 * MiB) == ["dev", "dev-fp8"]
    residency.use("dev", 1 * MiB)
    assert list(residency.resident) == [FIRST.name, "dev"] and moves == [("dev-fp8", "cpu")]


def test_on_demand_transformers_leave_before_resident_ones():
    """The plan's resident transformers (pinned) move out only after every "on demand" one, whatever the order of
    use; room made for a new transformer (make_room) follows the same order."""
    residency, moves = recording(5 * MiB, pinned=("dev", "dev-fp8"))
    for name, mb in ((FIRST.name, 2), ("dev", 2), ("dev-fp8", 1)):  # FIRST the least recently used... then dev
        residency.add(name, model(mb), resident=True)
    residency.use(FIRST.name, 0)  # FIRST now the most recent, yet the first to go for dev-fp8's room
    assert residency.evictions("dev-fp8", 1 * MiB) == [FIRST.name]
    assert residency.evictions("dev-fp8", 3 * MiB) == [FIRST.name, "dev"]
    residency.make_room(1 * MiB)  # 5 MiB are taken: 1 more moves FIRST out, not dev
    assert moves == [(FIRST.name, "cpu")] and list(residency.resident) == ["dev", "dev-fp8"]


def test_no_budget_means_nothing_moves_and_too_big_is_refused():
    free = Residency(torch.device("cpu"), None)
    big = model(4)
    free.add("dev", big, resident=False)  # without a budget everything is where it is, resident
    free.use("dev")
    assert where(big) == "cpu" and list(free.resident) == ["dev"] and free.moves == []
    tight, _ = recording(1 * MiB)
    tight.add("dev", model(2), resident=False)
    with pytest.raises(UserError, match="does not fit"):
        tight.use("dev", 0)


# ----- the full-size model ---------------------------------------------------------------------------------------

# What torch reports as the total memory of the smallest card of each size class, in GiB (nvidia-smi shows a little
# more): L4 22.0 (A10G 22.2, RTX 4090 23.6), A100 40GB 39.6, L40S 44.4 (ECC on; RTX A6000 47.5), H100 80GB 79.2,
# H200 139.8.
CARDS = {"L4": 22.0, "RTX 4090": 23.6, "A100 40GB": 39.6, "L40S": 44.4, "RTX A6000": 47.5, "H100": 79.2, "H200": 139.8}
H100_80GB = 85_031_714_816  # what torch reports as an 80 GB H100's total memory (79.2 GiB)


@pytest.fixture(scope="module")
def sizes() -> memory.Sizes:
    """The full-size FLUX.1-dev's sizes, counted on the meta device (what script/memory-plan plans with)."""
    return fullsize.plan_sizes()


def planned(sizes, gb: float) -> memory.Plan:
    return memory.plan(int(gb * GiB), sizes)


def test_full_size_components_as_the_plan_counts_them(sizes):
    got = {name: round(n / GiB, 2) for name, n in sizes.bytes.items()}
    assert got == {"dev": 22.17, "dev-fp8": 11.10, "schnell": 22.15, "schnell-fp8": 11.09, "krea-dev": 22.17,
                   "krea-dev-fp8": 11.10, "kontext-dev": 22.17, "kontext-dev-fp8": 11.10, "fill-dev": 22.17,
                   "fill-dev-fp8": 11.10, "text_encoder": 0.23, "text_encoder_2": 8.87, "vae": 0.16, "safety": 0.73}
    assert sizes.bytes["fill-dev"] - sizes.bytes["dev"] == 2 * 3072 * (384 - 64)  # its wider input embedder
    assert round(sizes.block / GiB, 2) == 0.63  # a double-stream block in bf16: what building the fp8 copy adds
    assert round(sizes.streamed / GiB, 2) == 0.96  # T5 streamed: its embedding and final norm, and two blocks
    assert round(sizes.largest / GiB, 1) == 30.5  # 4 x 1440x1440, a speed mode, true CFG: FORA caches both passes


@pytest.mark.parametrize("gb", [24, 40, 48, 80, 141])
def test_the_plan_fits_every_common_gpu_size_and_never_holds_two_bf16_transformers_in_setup(sizes, gb):
    plan = planned(sizes, gb)
    assert plan.fits, plan.table()
    assert plan.where("dev-fp8") == GPU  # go_fast's path runs on every GPU
    assert all(plan.where(n) == GPU for n in ("text_encoder", "vae", "safety"))
    assert plan.setup_peak <= plan.budget
    # setup's peak: what it places and one bf16 block (the fp8 copy is built a block at a time: tests/test_offload.py)
    assert plan.setup_peak == sum(sizes.bytes[n] for n in plan.resident if n not in memory.ON_FIRST_USE) + sizes.block
    # what stays on the GPU and the room of the planned request fit the budget
    assert plan.shared_gpu + sum(sizes.bytes[n] for n in ("dev", "dev-fp8") if plan.where(n) == GPU) \
        + sizes.working <= plan.budget


def test_80_gb_and_more_keep_bf16_dev_fp8_dev_and_t5_and_141_gb_the_first_variants_loaded_on_first_use_too(sizes):
    for gb in (80, CARDS["H100"], 141, CARDS["H200"]):
        plan = planned(sizes, gb)
        assert {"dev", "dev-fp8", "text_encoder_2"} <= set(plan.resident), gb
        assert plan.per_request_moves == 0
        # they stay even for the largest request: only what is "on demand" would move
        assert plan.shared_gpu + sizes.bytes["dev"] + sizes.bytes["dev-fp8"] + sizes.largest <= plan.budget
    # 141 GB: the variants loaded on first use in table order, each while it fits beside the largest request
    # (schnell and krea-dev, with their fp8 copies); the rest on demand
    first, rest = variants.ON_FIRST_USE[:2], variants.ON_FIRST_USE[2:]
    for variant in variants.ON_FIRST_USE:
        assert [planned(sizes, gb).where(variant.name) for gb in (80, CARDS["H100"], 141, CARDS["H200"])] == \
            ([ON_DEMAND, ON_DEMAND, GPU, GPU] if variant in first else [ON_DEMAND] * 4), variant.name
    resident = [n for v in (variants.BASE, *first) for n in (v.name, v.fp8)]
    assert planned(sizes, 141).resident == [*resident, "text_encoder", "text_encoder_2", "vae", "safety"]
    plan = planned(sizes, 141)
    assert sum(sizes.bytes[n] for n in plan.resident) + sizes.bytes[rest[0].name] + sizes.largest > plan.budget  # no room


def test_40_and_48_gb_keep_bf16_dev_and_stream_t5_where_it_does_not_fit(sizes):
    for gb, t5 in ((40, STREAMED), (CARDS["A100 40GB"], STREAMED), (CARDS["L40S"], STREAMED), (48, GPU),
                   (CARDS["RTX A6000"], GPU)):
        plan = planned(sizes, gb)
        assert (plan.where("dev"), plan.where("dev-fp8"), plan.where("text_encoder_2")) == (GPU, GPU, t5), gb
        assert all((plan.where(v.name), plan.where(v.fp8)) == (ON_DEMAND, ON_DEMAND) for v in variants.ON_FIRST_USE)
        assert plan.per_request_moves == (sizes.bytes["text_encoder_2"] if t5 == STREAMED else 0)


def test_24_gb_runs_fp8_only_with_t5_streamed(sizes):
    for gb in (CARDS["L4"], CARDS["RTX 4090"], 24):
        plan = planned(sizes, gb)
        assert plan.fits
        assert plan.where("dev") == CPU
        assert all((plan.where(v.name), plan.where(v.fp8)) == (CPU, ON_DEMAND) for v in variants.ON_FIRST_USE)
        assert "go_fast" in plan.placements["dev"].note
        assert plan.setup_peak < sizes.bytes["dev"]  # no bf16 transformer on the GPU, ever
    for gb in (CARDS["L4"], CARDS["RTX 4090"]):  # real 24 GB cards report under 24: T5 is streamed
        assert planned(sizes, gb).where("text_encoder_2") == STREAMED
        assert planned(sizes, gb).per_request_moves == sizes.bytes["text_encoder_2"]


def test_under_24_gb_is_refused_naming_the_minimum(sizes):
    for gb in (16, 20):
        plan = planned(sizes, gb)
        assert not plan.fits and "24 GB" in plan.problem
        with pytest.raises(UserError, match=f"This GPU gives this container {gb}.00 GB") as err:
            memory.refuse(plan, torch.device("cuda"))
        assert "24 GB (L4, A10G, RTX 3090 or 4090, or larger)" in str(err.value)
    assert planned(sizes, 21.5).fits  # the floor sits between 20 GB and 24 GB cards


def test_memory_plan_script_prints_the_table_and_a_json_summary(sizes):
    """script/memory-plan as a deployer runs it, in its own process; and its exit code for a GPU too small."""
    import json
    import subprocess
    import sys

    from tests.conftest import ROOT

    done = subprocess.run([sys.executable, "script/memory_plan.py", "--gpu-gb", "24", "--json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0] == "FLUX.1-dev on 24 GB of GPU memory:"
    assert [line.split()[0] for line in lines[2:2 + len(memory.COMPONENTS)]] == list(memory.COMPONENTS)
    summary = json.loads(lines[-1])
    assert summary == planned(sizes, 24).summary()
    assert set(summary) == {"fits", "setup_peak_gb", "resident", "offloaded", "per_request_moves_gb"}
    assert summary["fits"] is True and "dev-fp8" in summary["resident"] and "dev" in summary["offloaded"]
    sys.path.insert(0, str(ROOT / "script"))
    import memory_plan

    assert memory_plan.main(["--gpu-gb", "16"]) == 1


def test_fora_holds_every_block_output_at_full_size():
    pipe = fullsize.build_model("transformer", "meta")
    assert step_cache.Fora.holds_bytes(pipe.config, 1024, 1024, 4, 512) / 1e9 == pytest.approx(6.45, abs=0.01)
    assert step_cache.Fora.holds_bytes(pipe.config, 1440, 1440, 4, 512) / 1e9 == pytest.approx(12.06, abs=0.01)


def test_an_80gb_gpu_makes_room_for_a_4_output_1440_speed_mode_request_when_a_variant_is_in(sizes):
    """On an 80 GB H100 dev, fp8 dev and a variant loaded on first use (once used) fit; a Juiced 1440x1440 request
    with 4 outputs needs activations plus FORA's 12 GB: the residency moves the variant out (on demand) before a
    resident transformer, instead of running out of memory and falling back to one output at a time."""
    plan = memory.plan(H100_80GB, sizes)
    residency = Residency.for_plan(torch.device("cuda"), plan, mover=lambda module, device: None)
    residency.size = sizes.bytes.__getitem__
    for name in ("dev-fp8", FIRST.name, "dev"):  # dev most recently used
        residency.add(name, None, resident=True)
    plain = activation_bytes(1440, 1440, 4)
    fora = step_cache.Fora.holds_bytes(fullsize.TRANSFORMER, 1440, 1440, 4, 512)
    assert residency.evictions("dev", plain) == []  # without a speed mode everything stays
    assert sum(sizes.bytes[n] for n in ("dev", "dev-fp8", FIRST.name)) + plain + fora > residency.budget
    assert residency.evictions("dev", plain + fora) == [FIRST.name]


def test_moves_outside_a_prediction_are_bounded_and_a_predictions_own_are_all_kept():
    """A container runs for days: moves made outside a prediction (setup's, a tool's) keep only the last MOVES_KEPT;
    a prediction's trace receives every move it made."""
    from flux import residency as residency_

    free = Residency(torch.device("cpu"), None)
    for i in range(residency_.MOVES_KEPT + 10):
        free.record(residency_.Move(f"m{i}", "gpu", 1))
    assert len(free.moves) == residency_.MOVES_KEPT and free.moves[-1].name == f"m{residency_.MOVES_KEPT + 9}"
    trace: list = []
    with free.recording(trace):
        for i in range(residency_.MOVES_KEPT + 10):
            free.record(residency_.Move("p", "gpu", 1))
    assert len(trace) == residency_.MOVES_KEPT + 10 and len(free.moves) == residency_.MOVES_KEPT
