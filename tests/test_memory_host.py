"""The CPU memory the variants loaded on first use share (flux/hostmemory.py), on its own: plain sizes, no engine.
The engine's side (it drops what it is told, the images stay the same) is in tests/test_offload.py."""

from __future__ import annotations

import types

from flux import variants
from flux.hostmemory import HostMemory
from flux.memory import GiB

BASE = variants.BASE.name
A, B, C = "a", "b", "c"  # three variants loaded on first use, in that order


def loaded(room: int | None) -> HostMemory:
    host = HostMemory(room, current=BASE)
    for v in (A, B, C):
        host.add(v)
    return host


def test_the_room_is_what_the_settings_leave_beside_the_plans_share():
    plan = types.SimpleNamespace(host_floor=30 * GiB)
    assert HostMemory.for_plan(plan, 48 * GiB).room == 18 * GiB
    assert HostMemory.for_plan(None, 48 * GiB).room is None  # no GPU: nothing moves
    assert HostMemory.for_plan(plan, None).room is None


def test_least_recently_used_first_until_it_fits_never_the_kept_nor_the_running_one():
    host = loaded(10 * GiB)
    held = {A: 4 * GiB, B: 3 * GiB, C: 2 * GiB}  # 9 held: 1 more fits
    assert host.to_drop(1 * GiB, held, keep=C) == []
    assert [v for v, _ in host.to_drop(2 * GiB, held, keep=C)] == [A]
    assert [v for v, _ in host.to_drop(6 * GiB, held, keep=C)] == [A, B]
    host.asked(A)  # A runs now, and is the most recently used: B goes first, A never
    assert list(host.loaded) == [B, C, A]
    assert [v for v, _ in host.to_drop(6 * GiB, held, keep=C)] == [B]  # all it may drop, even short of room
    assert [v for v, _ in host.to_drop(2 * GiB, held, keep=B)] == [C]
    assert host.to_drop(2 * GiB, held, keep=C)[0][1] == ("2.00 GB more would not fit in the 10.0 GB of CPU memory "
                                                         "the variants share")
    host.forget(B)
    assert list(host.loaded) == [C, A] and [v for v, _ in host.to_drop(6 * GiB, held, keep=A)] == [C]
    assert HostMemory(None).to_drop(100 * GiB, held, keep=A) == []  # no limit


def test_a_transformer_moved_out_of_the_gpu_drops_others_first_then_its_own_variant():
    host = loaded(10 * GiB)
    host.asked(BASE)
    held = {A: 4 * GiB, B: 3 * GiB, C: 0}  # C's transformers are on the GPU
    assert host.to_drop_moving_out("c-fp8", C, 3 * GiB, held) == []  # 7 + 3 fit
    assert [v for v, _ in host.to_drop_moving_out("c-fp8", C, 5 * GiB, held)] == [A]  # 3 + 5 fit
    drops = host.to_drop_moving_out("c-fp8", C, 9 * GiB, held)  # A and B gone, 9 still fit
    assert [v for v, _ in drops] == [A, B]
    drops = host.to_drop_moving_out("c-fp8", C, 11 * GiB, held)  # nothing makes room: C dropped instead of moved
    assert [v for v, _ in drops] == [A, B, C]
    assert drops[-1][1] == "moved out of the GPU, c-fp8 would not fit in the 10.0 GB of CPU memory the variants share"
    assert host.to_drop_moving_out("dev-fp8", BASE, 11 * GiB, held) == []  # the base variant: not loaded on first use
    host.asked(C)
    assert host.to_drop_moving_out("c-fp8", C, 11 * GiB, held) == []  # the running one
    assert HostMemory(None).to_drop_moving_out("c-fp8", C, 11 * GiB, held) == []
