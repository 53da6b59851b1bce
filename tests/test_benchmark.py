"""script/benchmark gpu, kept from rotting: its whole sequence on the tiny FLUX on this CPU (dynamo's eager backend,
so that the many engines it builds compile in seconds), and its budget rule. Timings are not checked here: a
benchmark reports them; this checks that every section runs and reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers.server import ROOT

sys.path.insert(0, str(ROOT / "script"))

import benchmark_gpu  # noqa: E402


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("benchmark")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHINDUCTOR_", "TRITON_"))}
    done = subprocess.run(
        [sys.executable, str(ROOT / "script" / "benchmark.py"), "gpu", "--tiny", "--backend", "eager",
         "--size", "256x256", "--steps", "1", "--repeats", "1", "--budget", "900", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return rows, (out / "results.md").read_text(), done.stdout


def test_every_section_runs_and_reports(tiny_run):
    rows, md, stdout = tiny_run
    timings = {(r["name"], r["outputs"]): r for r in rows if r["kind"] == "timing"}
    expected = [*benchmark_gpu.PEERS, *(name for name, _ in benchmark_gpu.OURS)]
    assert {(name, n) for name in expected for n in (1, 4)} <= set(timings)
    assert all(r["finite"] and r["s"] > 0 and len(r["runs"]) == 1 for r in timings.values())
    ours = next(r for r in rows if r["kind"] == "setup" and r["name"] == "ours")
    assert {"fp8 quantize", "warm-up dev", "warm-up dev-fp8", "total"} <= set(ours["stages"])
    assert "fp8=fp8dqrow" in ours["settings"] and ours["graphs"]  # the H100's fp8 path, compiled graphs timed
    switches = [r for r in rows if r["kind"] == "lora"]
    assert {(r["path"], r["rank"]) for r in switches} == {(p, k) for p in ("bf16", "go_fast") for k in (16, 64)}
    assert not any(r["recompiled"] for r in switches)
    for name, _ in benchmark_gpu.SWITCHES:  # each optimization off: measured, or why it cannot run on a CPU
        measured = (f"go_fast, {name}", 1) in timings
        refused = any(r["kind"] == "error" and r["section"] == f"switch: {name}" and "needs an NVIDIA GPU" in r["error"]
                      for r in rows)
        assert measured or refused, name
    offload = [r for r in rows if r["kind"] == "offload"]  # the small-GPU cost model's measurements, each with its GB
    assert len(offload) == 6 and all(r["s"] > 0 for r in offload)
    assert next(r for r in offload if "T5 encode, streamed" in r["name"])["GB"] > 0
    assert rows[-1]["kind"] == "done" and not [r for r in rows if r["kind"] == "skipped" and "estimate s" in r]
    assert "| diffusers bf16 eager | 1 |" in md and "## LoRA switch" in md and "## Offloading" in md and md in stdout


def test_a_section_that_does_not_fit_the_budget_is_skipped_and_every_row_is_written_at_once(tmp_path):
    run = benchmark_gpu.Run(tmp_path, budget=60, meta={"model": "m", "device": "d", "software": "s", "size": "8x8",
                                                          "steps": 1, "repeats": 1, "budget s": 60})
    assert run.fits("quick", 5) and not run.fits("slow", 3600)
    run.add({"kind": "timing", "name": "x", "outputs": 1, "s": 1.0, "runs": [1.0], "first s": 2.0, "finite": True,
             "latent std": 1.0})
    lines = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in lines] == ["machine", "skipped", "timing"]
    assert lines[1]["section"] == "slow" and lines[1]["estimate s"] == 3600
    assert "| x | 1 | 1.000 |" in (tmp_path / "results.md").read_text()
