"""script/benchmark gpu, kept from rotting, run the way the lent GPU machine runs it: the prepared command
(script/gpu-benchmark) in a copy of the working tree that has no .venv, through a python3 that already has the
packages (this interpreter's), on the tiny FLUX on this CPU (dynamo's eager backend, so that the many engines it
builds compile in seconds), with one section made to fail. Timings are not checked here: a benchmark reports them;
this checks that every section runs, reports, keeps its order and survives another's failure, and the rules that
decide what runs (deadline, GPU memory, guards)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers.server import ROOT

sys.path.insert(0, str(ROOT / "script"))

import benchmark_gpu  # noqa: E402
from gpu_bench import memory_model, names, schedule, sections  # noqa: E402
from gpu_rehearsal import working_tree_copy  # noqa: E402

FAILING = "ours: setup"  # the section made to fail in the run below (FLUX_BENCHMARK_FAIL)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tree = working_tree_copy(tmp_path_factory.mktemp("tree"))
    out = tmp_path_factory.mktemp("benchmark")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHINDUCTOR_", "TRITON_", "FLUX_"))}
    # python3 is this interpreter, which has every package: nothing may be built
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env[names.FAIL_ENV] = FAILING
    started = time.monotonic()
    done = subprocess.run(
        [str(tree / "script" / "gpu-benchmark"), "--kit", str(tree / "no-kit"), "--out", str(out), "--limit", "1500",
         "--", "--tiny", "--backend", "eager", "--size", "256x256", "--steps", "1", "--repeats", "1"],
        cwd=tree, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return rows, out, tree, time.monotonic() - started


def test_the_prepared_command_runs_from_a_tree_without_venv_and_builds_none(tiny_run):
    rows, out, tree, seconds = tiny_run
    assert not (tree / ".venv").exists()
    log = (out / "gpu-benchmark.log").read_text()
    assert "no wheels in" in log and "script/setup" not in log and "ended after" in log
    machine = rows[0]
    assert machine["kind"] == "machine" and machine["versions"]["torch"] == torch.__version__
    assert {"torch", "torchao", "diffusers", "pruna"} <= set(machine["versions"])
    assert all(r["software"] == machine["software"] for r in rows[1:])  # every row says what it ran
    assert (out / "results.md").read_text().startswith("# script/benchmark gpu: tiny FLUX")
    assert rows[-1]["kind"] == "done" and rows[-1]["elapsed s"] < seconds


def test_an_injected_failure_leaves_an_error_row_and_the_later_sections_run(tiny_run):
    rows = tiny_run[0]
    errors = [r for r in rows if r["kind"] == "error"]
    assert [r["section"] for r in errors] == [FAILING]
    assert "injected failure" in errors[0]["error"] and "after freeing" in errors[0]
    later = rows[rows.index(errors[0]) + 1:]
    # our engine is built by the next section that needs it, and every later section still runs
    assert next(r for r in later if r["kind"] == "setup")["name"] == "ours"
    assert {r["section"].split(":")[0].split(",")[0] for r in later} >= {"ours", "diffusers-torchao", "LoRA switch",
                                                                        "4 outputs", "other speed modes", "offload",
                                                                        "switch", "boot"}


def test_sections_run_key_rows_first_in_the_order_of_the_issue(tiny_run):
    rows = tiny_run[0]
    order = []
    for r in rows[1:-1]:
        group = next(g for g in names.GROUPS if r["section"].startswith(g))
        if group not in order:
            order.append(group)
    assert order == list(names.GROUPS)
    timings = [(r["name"], r["outputs"]) for r in rows if r["kind"] == "timing"]
    key = [(names.BARE, 1), *((name, 1) for name, _ in names.KEY), (names.TORCHAO, 1)]
    assert timings[:len(key)] == key  # bare diffusers, bf16 compiled, go_fast, Juiced, Blink, then the torchao peer


def test_every_contender_and_section_reports(tiny_run):
    rows = tiny_run[0]
    timings = {(r["name"], r["outputs"]): r for r in rows if r["kind"] == "timing"}
    expected = {(name, 1) for name in (*names.PEERS, *(n for n, _ in names.OURS))}
    expected |= {(name, 4) for name in (*names.PEERS, *(n for n, _ in names.OURS))}
    assert expected <= set(timings)
    assert all(r["finite"] and r["s"] > 0 and len(r["runs"]) == 1 for r in timings.values())
    for (name, _), r in timings.items():  # each row says whether its transformer ran compiled or eager
        if name == names.BARE:
            assert r["transformer"] == "eager (bare diffusers)"
        elif name == names.TORCHAO:
            assert r["compile mode"] == "n/a" and "graphs compiled" in r["transformer"] and r["fp8"]
        elif name == "go_fast, FLUX_COMPILE=off":
            assert r["transformer"] == "eager (FLUX_COMPILE=off)"
        else:
            assert r["transformer"].startswith("compiled (eager)") and "graphs held" in r["transformer"], name
    setups = [r for r in rows if r["kind"] == "setup"]
    ours = next(r for r in setups if r["name"] == "ours")
    assert {"fp8 quantize", "warm-up dev", "warm-up dev-fp8", "total"} <= set(ours["stages"]) and ours["graphs"]
    assert "only (the sizes this run measures" in ours["warmed"]
    assert any(r["name"] == "ours (again)" and not r["graphs"] for r in setups)  # a rebuild reuses the graphs
    switches = [r for r in rows if r["kind"] == "lora"]
    assert [(r["rank"], r["path"]) for r in switches] == [(16, "go_fast"), (16, "bf16"), (64, "go_fast"), (64, "bf16")]
    assert not any(r["recompiled"] for r in switches)
    offload = [r for r in rows if r["kind"] == "offload"]
    assert len(offload) == 6 and all(r["s"] > 0 for r in offload)
    assert [name for name, _, _ in sections.switch_rows()] == [  # flux/speed's SWITCHES, the unguarded last
        "FLUX_COMPILE=off", "FLUX_ATTENTION=cudnn", "FLUX_ATTENTION=fa3", "FLUX_FUSED_PROJECTIONS=0",
        "FLUX_COMPILE_VAE=0", "FLUX_CHANNELS_LAST=0", "FLUX_INDUCTOR_TUNING_FLAGS=0"]
    for name, _, _ in sections.switch_rows():  # measured, or why it cannot run here (no time spent on it)
        section = f"switch: {name}"
        measured = (f"go_fast, {name}", 1) in timings
        refused = [r for r in rows if r["section"] == section and r["kind"] == "not available"]
        assert measured != bool(refused), name
    refusals = {r["section"]: r["reason"] for r in rows if r["kind"] == "not available"}
    assert "needs an NVIDIA GPU" in refusals["switch: FLUX_ATTENTION=fa3"]
    assert "same settings as the default" in refusals["switch: FLUX_INDUCTOR_TUNING_FLAGS=0"]  # off on a CPU already
    assert next(r for r in rows if r["section"] == "boot")["reason"].startswith("our engine wrote no compile bundle")
    assert not [r for r in rows if r["kind"] in ("skipped", "stopped") and r.get("reason") in ("time", "GPU memory")]


def make_ctx(tmp_path, budget: float = 600) -> schedule.Ctx:
    args = benchmark_gpu.parse(["--tiny", "--backend", "eager"])
    run = schedule.Run(tmp_path, time.time() + budget, {"model": "m", "device": "d", "software": "s",
                                                             "size": "8x8", "steps": 1, "repeats": 1, "budget s": 60})
    return schedule.Ctx(args, torch.device("cpu"), torch.bfloat16, None, run, tmp_path)


def test_a_section_that_does_not_fit_is_skipped_with_a_row_and_an_error_row_frees_and_goes_on(tmp_path, monkeypatch):
    ctx = make_ctx(tmp_path)
    ran = []
    monkeypatch.setattr(schedule, "gpu_available", lambda device: 10 * 2**30)
    assert not ctx.section("too long", 3600, 0, lambda: ran.append("too long"))
    assert not ctx.section("too big", 1, 11 * 2**30, lambda: ran.append("too big"))
    assert not ctx.section("fails", 1, 0, lambda: 1 / 0)
    assert ctx.section("fits", 1, 9 * 2**30, lambda: ran.append("fits"))
    assert ran == ["fits"]
    lines = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["section"], r.get("reason")) for r in lines[1:]] == [
        ("skipped", "too long", "time"), ("skipped", "too big", "GPU memory"), ("error", "fails", None)]
    assert lines[1]["estimate s"] == 3600 and lines[2]["needs GB"] == 11.0 and lines[2]["available GB"] == 10.0
    assert lines[3]["error"] == "ZeroDivisionError: division by zero"
    md = (tmp_path / "results.md").read_text()
    assert "section: too long, kind: skipped, reason: time" in md and "section: fails, kind: error" in md


def test_the_deadline_cuts_the_section_that_runs_then(tmp_path):
    ctx = make_ctx(tmp_path, budget=0.5)
    ctx.run.arm()
    started = time.monotonic()
    try:
        with pytest.raises(schedule.DeadlineReached):  # not an Exception: no section's guard swallows it
            ctx.section("slow", 0.1, 0, lambda: time.sleep(30))
    finally:
        schedule.Run.disarm()
    assert time.monotonic() - started < 5
    assert not ctx.run.fits("next", 1)  # nothing starts after the deadline


def test_each_section_fits_an_h100_alone_by_the_meta_device_sizes():
    table = memory_model.plan_table((78, 139))
    rows = [line for line in table.splitlines() if line.startswith("| ") and "GiB)" not in line]
    assert len(rows) == len(memory_model.PLAN_ROWS)
    assert all(line.endswith("| fits | fits |") for line in rows), table
    held = {line.split(" | ")[0][2:]: float(line.split(" | ")[1]) for line in rows}
    assert held["ours: setup"] < 60 and held["4 outputs: ours (Juiced)"] < 78  # one engine at a time
    assert "does not fit" in memory_model.plan_table((40,))  # the rule that skips: bf16 and fp8 beside T5


def test_the_rehearsal_passes_only_with_every_key_row_measured_inside_the_limit(tmp_path):
    import gpu_rehearsal

    def write(rows, log_line, rc=0):
        (tmp_path / "results.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        (tmp_path / "gpu-benchmark.log").write_text(f"...\nscript/gpu-benchmark: {log_line}\n")
        return gpu_rehearsal.verdict(tmp_path, rc)

    key = gpu_rehearsal.key_rows()
    assert key[0] == names.BARE and key[-1] == names.TORCHAO and len(key) == 6
    good = [{"kind": "machine"}] + [{"kind": "timing", "name": n, "outputs": 1, "s": 1.5, "finite": True}
                                    for n in key]
    assert write(good, "ended after 300s (limit 480s), rc 0") == []
    assert write(good, "ended after 481s (limit 480s), rc 0") == ["the command ran 481 s, over its limit of 480 s"]
    cut = good[:3] + [{"kind": "stopped", "section": "ours, 1 output", "reason": "deadline"}]
    problems = write(cut, "ended after 470s (limit 480s), rc 0")
    assert [p.split(" (")[0] for p in problems] == [f"key row missing: {n}" for n in key[2:]]
    assert "deadline" in problems[0]
    assert write(good[:-1] + [dict(good[-1], finite=False)], "ended after 1s (limit 480s), rc 0")[0].startswith(
        "key row not a finite timing")
    assert write(good, "ended after 1s (limit 480s), rc 1", rc=1) == ["script/gpu-benchmark exited 1"]
