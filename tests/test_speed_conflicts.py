"""Conflicts declared per switch (flux/switches.py `Conflict`), settled before any work: two explicit settings that
conflict are a SettingsError naming both and what to set instead, a default gives way to an explicit choice with a
log line, and speed.check / speed.optimize respect them for Settings made in code.

No two of the project's switches conflict (flux/switches.py says what was checked), so these tests run the mechanism
on a synthetic table: a kernel that cannot run with int8 weights, and a cache that cannot run with the fast kernel."""

from __future__ import annotations

import dataclasses
import logging
import types

import pytest
import torch

from flux import speed, switches
from flux.errors import SettingsError
from flux.switches import Conflict, Setting, choice, flag

CPU = torch.device("cpu")
KERNEL = Setting("kernel", "FLUX_T_KERNEL", choice(("plain", "fast"), "plain"), "plain", True, "a kernel",
                 conflicts=(Conflict("quant", "the fast kernel takes no int8 weights", at="int8", value="fast"),),
                 off="plain")
QUANT = Setting("quant", "FLUX_T_QUANT", choice(("none", "int8"), "int8"), "none", True, "weights", off="none")
CACHE = Setting("cache", "FLUX_T_CACHE", flag(True), False, True, "a cache",
                conflicts=(Conflict("kernel", "the cache hooks the plain kernel only", at="fast"),))
TUNING = Setting("tuning", "FLUX_T_TUNING", flag(True), False, True, "tuning of the cache", requires={"cache": True})
TABLE = (KERNEL, QUANT, CACHE, TUNING)


def test_without_a_conflict_every_switch_keeps_its_value():
    assert switches.read({}, CPU, TABLE) == {"kernel": "plain", "quant": "int8", "cache": True, "tuning": True}
    assert switches.read({"FLUX_T_QUANT": "none", "FLUX_T_CACHE": "0"}, CPU, TABLE) == {
        "kernel": "plain", "quant": "none", "cache": False, "tuning": False}


def test_two_explicit_settings_that_conflict_are_a_settings_error_naming_both_and_what_to_set():
    with pytest.raises(SettingsError) as refused:
        switches.read({"FLUX_T_KERNEL": "fast", "FLUX_T_QUANT": "int8", "FLUX_T_CACHE": "0"}, CPU, TABLE)
    assert str(refused.value) == ("FLUX_T_KERNEL=fast cannot run with FLUX_T_QUANT=int8: the fast kernel takes no "
                                  "int8 weights. Set FLUX_T_KERNEL=plain or FLUX_T_QUANT=none, or unset one of them.")
    with pytest.raises(SettingsError, match=r"^FLUX_T_CACHE=1 cannot run with FLUX_T_KERNEL=fast: the cache hooks "
                                            r"the plain kernel only\. Set FLUX_T_CACHE=0 or FLUX_T_KERNEL=plain"):
        switches.read({"FLUX_T_KERNEL": "fast", "FLUX_T_QUANT": "none", "FLUX_T_CACHE": "1"}, CPU, TABLE)


def test_a_default_gives_way_to_an_explicit_choice_with_a_log_line_and_takes_what_requires_it_along(caplog):
    with caplog.at_level(logging.INFO, logger="flux"):
        values = switches.read({"FLUX_T_KERNEL": "fast"}, CPU, TABLE)
    # the other side's default gives way (quant), and so does a declarer's default (cache); tuning required the cache
    assert values == {"kernel": "fast", "quant": "none", "cache": False, "tuning": False}
    assert ("FLUX_T_QUANT is int8 by default, which cannot run with FLUX_T_KERNEL=fast (the fast kernel takes no "
            "int8 weights): FLUX_T_QUANT=none instead") in caplog.text
    assert ("FLUX_T_CACHE is 1 by default, which cannot run with FLUX_T_KERNEL=fast (the cache hooks the plain "
            "kernel only): FLUX_T_CACHE=0 instead") in caplog.text
    # two defaults that conflict: the switch that declares the conflict gives way
    fast_by_default = (dataclasses.replace(KERNEL, read=choice(("plain", "fast"), "fast")), QUANT, CACHE, TUNING)
    assert switches.read({}, CPU, fast_by_default) == {"kernel": "plain", "quant": "int8", "cache": True,
                                                       "tuning": True}


def test_a_conflict_must_name_a_switch_and_be_settled_by_the_off_values():
    with pytest.raises(ValueError, match="not a switch"):
        switches.read({}, CPU, (dataclasses.replace(KERNEL, conflicts=(Conflict("nothing", "why"),)), QUANT))
    with pytest.raises(ValueError, match="would still conflict"):  # "on at all" on a switch whose off is "plain"
        switches.read({}, CPU, (dataclasses.replace(KERNEL, conflicts=(Conflict("quant", "why"),)), QUANT))


def test_speed_check_refuses_and_optimize_skips_a_conflict_in_settings_made_in_code(monkeypatch):
    applied = []

    def apply(target, value, settings, **context):
        applied.append(value)

    table = tuple(speed.Switch(s, "stage", apply) for s in (KERNEL, QUANT))
    monkeypatch.setattr(switches, "SETTINGS", (KERNEL, QUANT))
    monkeypatch.setattr(speed, "SWITCHES", table)
    conflicting = types.SimpleNamespace(kernel="fast", quant="int8")
    with pytest.raises(SettingsError, match="^FLUX_T_KERNEL=fast cannot run with FLUX_T_QUANT=int8"):
        speed.check(conflicting, CPU)
    speed.check(types.SimpleNamespace(kernel="fast", quant="none"), CPU)
    assert speed.optimize("stage", object(), conflicting) == [] and applied == ["int8"]  # the kernel did not apply
    assert speed.describe("stage", conflicting) == "quant int8"
    applied.clear()
    speed.optimize("stage", object(), types.SimpleNamespace(kernel="fast", quant="none"))
    assert applied == ["fast", "none"]
