"""script/benchmark gpu: this container against its peers on one GPU, in one run that ends by its deadline.

  script/gpu-benchmark                                     the prepared command for a lent GPU machine (no network):
                                                           installs the device kit, runs this, ends within 8 minutes
  script/benchmark gpu [--budget 450] [--out DIR]          on an H100 or H200: the full-size FLUX.1-dev
  script/benchmark gpu --tiny [--size 256x256 --steps 4]   the same sequence on the tiny FLUX, on a CPU
  script/benchmark gpu --plan                              what each section holds on the GPU, on 78 and 139 GiB
  script/benchmark gpu --only 'LoRA switch,4 outputs'      only the sections whose names start with these

The model is the full-size FLUX.1-dev architecture with random weights built on the GPU (flux/fakes/fullsize.py: no
download, deterministic, seeded). Every timing is the whole pipeline call (text encoders, 28 denoising steps, VAE
decode, PIL images) at 1024x1024, the median of --repeats calls after one untimed call; that first call also checks
that the latents stay finite at every step (no NaN, no inf) and records their spread.

Sections, key rows first (docs/benchmarks.md gives each one's H100 time estimate and GPU memory):

  bare diffusers, 1 output       FluxPipeline in bf16, eager
  ours: setup                    this engine as setup() builds it, every setting at its default, warming up only the
                                 sizes this run measures (setup() warms 22 sizes; the boot section measures that)
  ours, 1 output                 bf16 compiled, go_fast, Juiced on go_fast, Blink of an eye
  diffusers-torchao, 1 output    the published recipe: fused QKV, torchao's dynamic per-row float8 quantize_,
                                 torch.compile (fullgraph, mode="max-autotune" when its estimate fits, else the
                                 default mode: the row says which) of the transformer and the VAE decode, with the
                                 recipe's inductor flags
  LoRA switch                    a rank-16 then a rank-64 LoRA on every attention and MLP linear, from the disk
                                 cache, on go_fast then bf16, and the prediction right after (checked: no recompile)
  4 outputs                      ours (after compiling its batch-2+ graphs), bare diffusers, the torchao peer
  other speed modes              Lightly Juiced and Juiced on bf16, Lightly Juiced on go_fast, Extra Juiced
  offload                        the small-GPU cost model: T5 streamed, the fp8 transformer moved, the fp8 copy
                                 quantized from bf16 on the GPU and from CPU memory
  switch: ...                    each optimization off (or changed) on go_fast, one engine each
  boot                           a fresh process booting this engine from the compile bundle ours wrote, with the
                                 full warm-up of setup() (every size), this process's GPU memory released first

Deadline: --deadline (seconds since the epoch; script/gpu-benchmark passes its own start + 8 minutes less a margin)
or --budget seconds from this process's start. A section starts only when its estimated time fits in what is left
and its GPU memory fits in what is free (each skip is a row saying why); at the deadline the section running is cut
(a "stopped" row) and the run ends. Every row is written as soon as it exists (DIR/results.jsonl, DIR/results.md),
with the torch, torchao, diffusers and pruna versions it ran.

Every section is guarded: an exception (out of memory included) becomes an error row with its message and the GPU
memory in use, what the section held is freed, and the run goes on. FLUX_BENCHMARK_FAIL=<section name> makes that
section raise at its start (for tests).

GPU memory: one engine at a time. The shared pipeline's bf16 transformer (the pristine source every contender copies)
leaves the GPU while a contender holds its own copy; each engine is freed before the next contender is built.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

STARTED = time.time()  # this process's start, near enough (the heavy imports come later): --budget counts from here

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT = "a knitted purple prune on a wooden table, studio light, 85mm"
SEED = 1
BARE, TORCHAO = "diffusers bf16 eager", "diffusers-torchao fp8 compiled"
PEERS = (BARE, TORCHAO)
LIGHTLY, JUICED = "Lightly Juiced 🍊 (more consistent)", "Juiced 🔥 (default)"
EXTRA, BLINK = "Extra Juiced 🔥 (more speed)", "Blink of an eye 👁️"
KEY = (  # (row name, request inputs): measured right after setup
    ("bf16 compiled", {}),
    ("go_fast", {"go_fast": True}),
    ("Juiced, go_fast", {"speed_mode": JUICED, "go_fast": True}),
    ("Blink of an eye", {"speed_mode": BLINK}),
)
OTHER_MODES = (
    ("Lightly Juiced, bf16", {"speed_mode": LIGHTLY}),
    ("Juiced, bf16", {"speed_mode": JUICED}),
    ("Lightly Juiced, go_fast", {"speed_mode": LIGHTLY, "go_fast": True}),
    ("Extra Juiced", {"speed_mode": EXTRA}),
)
OURS = KEY + OTHER_MODES
LORA_STEPS = ((16, True), (16, False), (64, True), (64, False))  # (rank, go_fast)
# The sections' groups, in the order they run (a section's name starts with its group's).
GROUPS = ("bare diffusers, 1 output", "ours: setup", "ours, 1 output", "diffusers-torchao, 1 output", "LoRA switch",
          "4 outputs", "other speed modes", "offload", "switch", "boot")
FAIL_ENV = "FLUX_BENCHMARK_FAIL"
TORCHAO_MODES = ("auto", "default", "max-autotune")

# Seconds each kind of work is expected to take on an H100 before this run has measured it; docs/benchmarks.md
# ("Time estimates") says where each number comes from. Measured numbers replace them as the run goes.
H100 = {"bare call": 6.7, "ours setup": 150.0, "ours rebuild": 30.0, "batch warm-up": 40.0,
        "torchao default": 130.0, "torchao max-autotune": 330.0, "lora files": 10.0, "lora switch": 3.0,
        "offload": 40.0, "boot": 120.0}
# The same on this machine's CPU with the tiny model (only the order of magnitude matters: tests give large budgets).
CPU = {"bare call": 1.0, "ours setup": 150.0, "ours rebuild": 20.0, "batch warm-up": 40.0, "torchao default": 80.0,
       "torchao max-autotune": 200.0, "lora files": 2.0, "lora switch": 1.0, "offload": 10.0, "boot": 150.0}
# A call's time over the bare bf16 call's, per transformer pass (1024x1024: 4.5 s compiled bf16 and 2.97 s for the
# diffusers-torchao recipe against 6.7 s eager, published), and the part that does not shrink with FORA's skipped
# passes (text encoders and the VAE decode, about 0.3 s of 6.7).
CALL_RATIO = {"dev": 0.67, "dev-fp8": 0.45}
FIXED_SHARE = 0.05


class DeadlineReached(BaseException):
    """Raised in the main thread at the deadline (SIGALRM): not an Exception, so no section's guard catches it."""


# ----- the run: deadline, results -----------------------------------------------------------------------------------


class Run:
    """The deadline and the results: each row written to results.jsonl and results.md as soon as it exists."""

    def __init__(self, out: Path, deadline: float, meta: dict):
        self.deadline = deadline  # seconds since the epoch
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = []
        self.meta = meta
        self.section = "start"  # the section rows belong to (the last one gated)
        self.running: str | None = None  # the section whose work runs now (the deadline cuts it)
        (out / "results.jsonl").write_text("")
        self.add({"kind": "machine", **meta})

    def elapsed(self) -> float:
        return time.time() - STARTED

    def left(self) -> float:
        return self.deadline - time.time()

    def arm(self) -> None:
        """From now on the deadline interrupts whatever runs (DeadlineReached)."""
        def stop(signum, frame):
            raise DeadlineReached()

        signal.signal(signal.SIGALRM, stop)
        signal.setitimer(signal.ITIMER_REAL, max(self.left(), 0.001))

    @staticmethod
    def disarm() -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)

    def fits(self, section: str, estimate: float) -> bool:
        if estimate <= self.left():
            print(f"[{self.elapsed():6.0f}s] {section}: starting (estimate {estimate:.0f}s, {self.left():.0f}s left)",
                  file=sys.stderr, flush=True)
            return True
        self.add({"kind": "skipped", "section": section, "reason": "time", "estimate s": round(estimate, 1),
                  "left s": round(self.left(), 1)})
        return False

    def add(self, row: dict) -> dict:
        row = {"at s": round(self.elapsed(), 1), "section": self.section, **row}
        if row["kind"] != "machine":
            row["software"] = self.meta.get("software")
        self.rows.append(row)
        with open(self.out / "results.jsonl", "a") as f:
            f.write(json.dumps(row, default=str, ensure_ascii=False) + "\n")
        (self.out / "results.md").write_text(markdown(self.rows))
        if row["kind"] != "machine":
            shown = {k: v for k, v in row.items() if k != "software"}
            print(f"[{self.elapsed():6.0f}s] {json.dumps(shown, default=str, ensure_ascii=False)}", file=sys.stderr,
                  flush=True)
        return row


def markdown(rows: list[dict]) -> str:
    meta = rows[0]
    lines = [f"# script/benchmark gpu: {meta['model']}", "",
             f"{meta['device']}; {meta['software']}; {meta['size']}, {meta['steps']} steps, median of "
             f"{meta['repeats']} after one untimed call; deadline {meta['budget s']} s after the start", ""]
    if meta.get("note"):
        lines += [meta["note"], ""]
    lines += ["| contender | outputs | s per call | s per image | / bare diffusers | / diffusers-torchao | peak GPU GB "
              "| first call s | transformer | latents finite (std) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if r["kind"] == "timing"):
        ratios = []
        for peer in PEERS:
            ref = next((p for p in rows if p["kind"] == "timing" and p["name"] == peer
                        and p["outputs"] == r["outputs"]), None)
            ratios.append(f"{r['s'] / ref['s']:.3f}" if ref else "-")
        lines.append(f"| {r['name']} | {r['outputs']} | {r['s']:.3f} | {r['s'] / r['outputs']:.3f} | {ratios[0]} | "
                     f"{ratios[1]} | {r.get('peak GB', '-')} | {r['first s']:.1f} | {r.get('transformer', '-')} | "
                     f"{r['finite']} ({r['latent std']:.3g}) |")
    setups = [r for r in rows if r["kind"] == "setup"]
    if setups:
        lines += ["", "## Setup", "", "| engine | warmed | stage seconds | graphs compiled (kind: seconds each) |",
                  "|---|---|---|---|"]
        for r in setups:
            graphs = "; ".join(f"{k}: " + ", ".join(f"{s:.1f}" for s in v) for k, v in r["graphs"].items())
            lines.append(f"| {r['name']} | {r.get('warmed', '-')} | "
                         f"{', '.join(f'{k} {v:.1f}' for k, v in r['stages'].items())} | {graphs or 'none'} |")
    switches = [r for r in rows if r["kind"] == "lora"]
    if switches:
        lines += ["", "## LoRA switch (from the disk cache)", "",
                  "| path | rank | switch s | prediction right after s | recompiled |", "|---|---|---|---|---|"]
        lines += [f"| {r['path']} | {r['rank']} | {r['switch s']:.3f} | {r['prediction s']:.3f} | {r['recompiled']} |"
                  for r in switches]
    moves = [r for r in rows if r["kind"] == "offload"]
    if moves:
        lines += ["", "## Offloading (the memory plan's cost model)", "",
                  "| what | GB moved | s | s over resident | GB/s |", "|---|---|---|---|---|"]
        lines += [f"| {r['name']} | {r['GB']:.2f} | {r['s']:.3f} | {r.get('extra s', '-')} | {r.get('GB/s', '-')} |"
                  for r in moves]
    other = [r for r in rows if r["kind"] in ("boot", "skipped", "error", "not available", "stopped")]
    if other:
        lines += ["", "## Boot, skipped sections, errors, options not available here", ""]
        lines += ["- " + ", ".join(f"{k}: {v}" for k, v in r.items() if k not in ("at s", "software")) for r in other]
    done = [r for r in rows if r["kind"] == "done"]
    if done:
        lines += ["", f"Run ended {done[-1]['elapsed s']} s after the start."]
    return "\n".join(lines) + "\n"


# ----- measuring ---------------------------------------------------------------------------------------------------


class FiniteLatents:
    """A step hook: whether the latents stayed finite at every step, and their last spread."""

    def __init__(self):
        self.finite = True
        self.std = float("nan")

    def __call__(self, pipe, step, timestep, kwargs):
        import torch

        latents = kwargs["latents"]
        self.finite = self.finite and bool(torch.isfinite(latents).all())
        self.std = float(latents.float().std())
        return kwargs


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(ctx: "Ctx", name: str, outputs: int, call) -> dict:
    """One untimed call (with the finiteness check), then --repeats timed calls of the whole pipeline. Returns the
    row, for the caller to complete and add."""
    import torch

    cuda = ctx.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(ctx.device)
    check = FiniteLatents()
    _sync(ctx.device)
    started = time.perf_counter()
    call(outputs, check)
    _sync(ctx.device)
    first = time.perf_counter() - started
    runs = []
    for _ in range(ctx.args.repeats):
        started = time.perf_counter()
        call(outputs, None)
        _sync(ctx.device)
        runs.append(time.perf_counter() - started)
    row = {"kind": "timing", "name": name, "outputs": outputs, "s": statistics.median(runs),
           "runs": [round(r, 4) for r in runs], "first s": first, "finite": check.finite, "latent std": check.std,
           "peak GB": round(torch.cuda.max_memory_allocated(ctx.device) / 1024**3, 1) if cuda else None}
    ctx.known[(name, outputs)] = row["s"]
    return row


def gpu_state(device) -> dict:
    """What this process holds on the GPU now (GB of 2**30 bytes), for error and skip rows."""
    import torch

    if device.type != "cuda":
        return {}
    free, total = torch.cuda.mem_get_info(device)
    return {"GPU allocated GB": round(torch.cuda.memory_allocated(device) / 1024**3, 2),
            "GPU reserved GB": round(torch.cuda.memory_reserved(device) / 1024**3, 2),
            "GPU free GB": round(free / 1024**3, 2), "GPU total GB": round(total / 1024**3, 2)}


def gpu_available(device) -> int | None:
    """Bytes a section can still allocate: what the GPU has free, plus what torch's allocator holds unused."""
    import torch

    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def free() -> None:
    """Return what dropped references held (the caller drops its own first)."""
    from flux import memory

    memory.free()


def copy_to(module, device):
    """A deep copy of `module` whose parameters and buffers are made on `device` directly (no copy on the source's
    device first, so copying a transformer kept in CPU memory costs the GPU only the copy)."""
    import torch

    memo = {}
    for param in module.parameters():
        memo[id(param)] = torch.nn.Parameter(param.detach().to(device, copy=True), requires_grad=param.requires_grad)
    for buffer in module.buffers():
        memo[id(buffer)] = buffer.to(device, copy=True)
    return copy.deepcopy(module, memo)


def rowwise_fp8_runs(device) -> bool:
    """Whether torch's _scaled_mm takes per-row scales here (CUDA with fp8 tensor cores; on a CPU, torch 2.14 does
    and 2.11 does not: 'Now _scaled_mm only supports per-tensor scaling')."""
    import torch

    if device.type == "cuda":
        from flux.speed.fp8 import fp8_supported

        return fp8_supported(device)
    a = torch.ones(16, 16).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
        return True
    except RuntimeError:
        return False


# ----- what each section holds on the GPU (from the meta-device sizes) ----------------------------------------------


def memory_needs(sizes, transformer_config, width: int, height: int) -> dict[str, int]:
    """Bytes each kind of section adds on the GPU at its peak to what stays there all run (T5, CLIP and the shared
    VAE: `base`), computed from flux/memory.py's Sizes (the full-size model on the meta device, or the tiny one)."""
    from flux import memory
    from flux.speed import step_cache

    b = sizes.bytes

    def act(n: int) -> int:
        return memory.activation_bytes(width, height, n)

    def fora(n: int) -> int:
        return step_cache.holds_bytes(transformer_config, width, height, n, 512)

    engine = b["dev"] + b["dev-fp8"] + b["vae"]  # ours: its bf16 copy, the fp8 copy, its own VAE
    return {
        "base": b["text_encoder"] + b["text_encoder_2"] + b["vae"],
        "bare": b["dev"] + act(1),
        "ours setup": engine + sizes.block + act(1),
        "ours row": engine + act(1) + fora(1),
        "torchao": b["dev"] + b["vae"] + act(1),  # its bf16 copy before quantize_ shrinks it to fp8 in place
        "ours 4": engine + act(4) + fora(4),
        "bare 4": b["dev"] + act(4),
        "torchao 4": b["dev"] + b["vae"] + act(4),
        "offload": b["dev"] + b["dev-fp8"] + sizes.block,  # a bf16 source and the fp8 copy made from it
        "boot": engine + sizes.block + act(1),  # the child's own engine; the parent holds nothing then
    }


PLAN_ROWS = (  # (section, need key, whether the run's base stays on the GPU beside it)
    ("bare diffusers, 1 output", "bare", True), ("ours: setup", "ours setup", True),
    ("ours, 1 output (Juiced: FORA's cache)", "ours row", True), ("diffusers-torchao, 1 output", "torchao", True),
    ("LoRA switch", "ours row", True), ("4 outputs: ours (Juiced)", "ours 4", True),
    ("4 outputs: bare diffusers", "bare 4", True), ("4 outputs: diffusers-torchao", "torchao 4", True),
    ("other speed modes", "ours row", True), ("offload", "offload", True), ("switch: ...", "ours setup", True),
    ("boot (a fresh process; this one has released its memory)", "boot", False),
)


def plan_table(gpus_gib=(78, 139)) -> str:
    """What each section holds on the GPU at its peak (full-size FLUX.1-dev, 1024x1024), and whether it fits."""
    import torch

    from flux import memory
    from flux.fakes import fullsize

    sizes = fullsize.plan_sizes(torch.bfloat16)
    needs = memory_needs(sizes, fullsize.TRANSFORMER, 1024, 1024)
    gib = memory.GiB
    lines = [f"shared all run (T5, CLIP, VAE): {needs['base'] / gib:.2f} GiB; bf16 transformer "
             f"{sizes.bytes['dev'] / gib:.2f}, fp8 copy {sizes.bytes['dev-fp8'] / gib:.2f}, largest block "
             f"{sizes.block / gib:.2f} (GiB, the meta-device sizes of flux/fakes/fullsize.py)", "",
             "| section | holds at its peak (GiB) | " + " | ".join(f"{g} GiB" for g in gpus_gib) + " |",
             "|---|---|" + "---|" * len(gpus_gib)]
    for section, key, with_base in PLAN_ROWS:
        text_encoders = sizes.bytes["text_encoder"] + sizes.bytes["text_encoder_2"]
        held = needs[key] + (needs["base"] if with_base else text_encoders)
        lines.append(f"| {section} | {held / gib:.1f} | "
                     + " | ".join("fits" if held <= g * gib else "skipped (does not fit)" for g in gpus_gib) + " |")
    return "\n".join(lines) + "\n"


# ----- the context: the shared pipeline, our engine, the estimates ----------------------------------------------------


@dataclass
class Ctx:
    args: argparse.Namespace
    device: object
    dtype: object
    shared: object  # the FluxPipeline everything is built from: its modules are never changed
    run: Run
    work: Path
    sizes: object = None  # flux.memory.Sizes of the model
    needs: dict = field(default_factory=dict)  # memory_needs()
    rowwise: bool = True  # per-row fp8 runs on this device
    known: dict = field(default_factory=dict)  # (name, outputs) -> measured seconds per call
    measured: dict = field(default_factory=dict)  # kind of work -> measured seconds (replaces the guesses)
    engine: object = None
    engines_built: int = 0
    batch_warm: bool = False  # this process compiled ours' batch-2+ graphs (a rebuilt engine reuses them)
    shared_on_gpu: bool = True

    # ----- estimates

    def est(self, what: str) -> float:
        if what in self.measured:
            return self.measured[what]
        guesses = CPU if self.device.type != "cuda" else H100
        scale = 0.1 if self.device.type != "cuda" and self.args.backend == "eager" and what != "bare call" else 1.0
        return guesses[what] * scale

    def call_s(self, name: str, inputs: dict | None, outputs: int = 1) -> float:
        """A call's seconds: measured in this run, else derived from the bare call (measured or guessed)."""
        if (name, outputs) in self.known:
            return self.known[(name, outputs)]
        bare = self.known.get((BARE, outputs)) or self.known.get((BARE, 1), self.est("bare call")) * outputs
        if inputs is None:
            return bare
        from flux import speed

        mode = speed.mode(inputs.get("speed_mode", speed.OFF))
        share = mode.computed_steps(self.args.steps) / self.args.steps
        path = "dev-fp8" if inputs.get("go_fast") or mode.fp8 else "dev"
        return bare * (CALL_RATIO[path] * share * (1 - FIXED_SHARE) + FIXED_SHARE)

    def row_s(self, name: str, inputs: dict | None, outputs: int = 1) -> float:
        return (1 + self.args.repeats) * self.call_s(name, inputs, outputs)

    def engine_s(self) -> float:
        """What getting our engine costs now: nothing when it is built, a rebuild (graphs already compiled in this
        process) after the first build, else the first build."""
        if self.engine is not None:
            return 0.0
        return self.est("ours rebuild") if self.engines_built else self.est("ours setup")

    # ----- sections

    def wanted(self, section: str) -> bool:
        """Whether --only (if given) asks for this section."""
        return not self.args.only or section.startswith(tuple(self.args.only))

    def gate(self, section: str, seconds: float, need: int = 0) -> bool:
        """Whether a section starts: its estimated time fits in what is left, and the GPU memory it adds (bytes) fits
        in what is free; otherwise a row says why it was skipped."""
        if not self.wanted(section):
            return False  # not asked for: no row
        self.run.section = section
        return self.run.fits(section, seconds) and self.memory_fits(need)

    def memory_fits(self, need: int) -> bool:
        """Whether `need` bytes fit in what the GPU has free; else a row says so."""
        available = gpu_available(self.device)
        if available is not None and need > available:
            self.run.add({"kind": "skipped", "reason": "GPU memory", "needs GB": round(need / 1024**3, 2),
                          "available GB": round(available / 1024**3, 2), **gpu_state(self.device)})
            return False
        return True

    def section(self, name: str, seconds: float, need: int, fn) -> bool:
        """fn() as section `name` if it fits (gate); an exception becomes an error row (its message, the GPU memory
        in use then and after freeing) and the run goes on."""
        if not self.gate(name, seconds, need):
            return False
        self.run.running = name
        try:
            if os.environ.get(FAIL_ENV) == name:
                raise RuntimeError(f"injected failure ({FAIL_ENV}={name})")
            fn()
            self.run.running = None
            return True
        except Exception as exc:  # noqa: BLE001  one section failing leaves the others' numbers
            traceback.print_exc()
            row = {"kind": "error", "error": f"{type(exc).__name__}: {exc}"[:600],
                   "at the error": gpu_state(self.device)}
            traceback.clear_frames(exc.__traceback__)  # the section's locals (its models) go with its frames
            del exc
            self.run.running = None
            free()
            self.run.add({**row, "after freeing": gpu_state(self.device)})
            return False

    # ----- the shared transformer and our engine

    def place_shared(self, gpu: bool) -> None:
        """The shared pipeline's bf16 transformer on the GPU (for bare diffusers) or in CPU memory (while a contender
        holds its own copy)."""
        import torch

        if self.device.type == "cuda" and gpu != self.shared_on_gpu:
            self.shared.transformer.to(self.device if gpu else torch.device("cpu"))
            self.shared_on_gpu = gpu
            free()

    def transformer_copy(self):
        """A copy of the shared bf16 transformer on the GPU, the shared one in CPU memory after it."""
        available = gpu_available(self.device)
        from flux import memory

        if self.shared_on_gpu and available is not None and available < memory.module_bytes(self.shared.transformer) \
                + memory.BASE_RESERVE_BYTES:
            self.place_shared(False)  # no room for two: copy from CPU memory
        transformer = copy_to(self.shared.transformer, self.device)
        self.place_shared(False)
        return transformer

    def ours(self):
        """Our engine, built when it is not (a rebuild reuses the graphs this process compiled: its row says)."""
        if self.engine is None:
            started = time.perf_counter()
            name = "ours" if not self.engines_built else "ours (again)"
            self.engine = build_engine(self, {}, [(*self.args.size, 1)], name)
            self.measured["ours setup" if not self.engines_built else "ours rebuild"] = time.perf_counter() - started
            self.engines_built += 1
        return self.engine

    def drop_ours(self) -> None:
        """Our engine freed (its compile bundle exported first, for the boot section)."""
        if self.engine is not None:
            export_bundle(self)
            self.engine = None
            free()


def with_transformer(ctx: Ctx, transformer, vae=None):
    """The shared pipeline on another transformer (and VAE), its progress bar off."""
    from flux.engine import transformers

    pipe = transformers.with_transformer(ctx.shared, transformer, **({"vae": vae} if vae is not None else {}))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipe_call(pipe, ctx: Ctx):
    width, height = ctx.args.size

    def call(outputs: int, check):
        import torch

        with torch.inference_mode():
            pipe(prompt=PROMPT, width=width, height=height, num_inference_steps=ctx.args.steps, guidance_scale=3.0,
                 num_images_per_prompt=outputs, max_sequence_length=512,
                 generator=[torch.Generator("cpu").manual_seed(SEED + i) for i in range(outputs)],
                 callback_on_step_end=check)

    return call


# ----- the peers ---------------------------------------------------------------------------------------------------


def peer_bare(ctx: Ctx, outputs: int) -> None:
    ctx.drop_ours()
    ctx.place_shared(True)
    row = measure(ctx, BARE, outputs, pipe_call(ctx.shared, ctx))
    ctx.run.add({**row, "transformer": "eager (bare diffusers)"})


def torchao_mode(ctx: Ctx, outputs: int) -> tuple[str, str]:
    """The compile mode of the torchao peer, and why: the published recipe's max-autotune when its estimate fits in
    what is left (on a GPU, with inductor), else inductor's default mode."""
    asked = ctx.args.torchao_mode
    if ctx.args.backend != "inductor":
        return "n/a", f"backend {ctx.args.backend} (modes are inductor's)"
    if asked != "auto":
        return asked, "--torchao-mode"
    if ctx.device.type != "cuda":
        return "default", "on a CPU max-autotune tunes C++ GEMM templates for minutes; the recipe targets a GPU"
    needed = ctx.est("torchao max-autotune") + ctx.row_s(TORCHAO, {"go_fast": True}, outputs)
    if needed <= ctx.run.left():
        return "max-autotune", "the published recipe's mode"
    return "default", (f"max-autotune's estimate {needed:.0f} s did not fit in the {ctx.run.left():.0f} s left; "
                       "the recipe's inductor flags are on")


def torchao_s(ctx: Ctx, outputs: int) -> float:
    mode, _ = torchao_mode(ctx, outputs)
    compile_s = ctx.est("torchao max-autotune" if mode == "max-autotune" else "torchao default")
    return compile_s + ctx.row_s(TORCHAO, {"go_fast": True}, outputs)


def peer_torchao(ctx: Ctx, outputs: int) -> None:
    """diffusers-torchao's published FLUX recipe: fused QKV, dynamic float8 through torchao's quantize_ (per row;
    per tensor where this device's _scaled_mm takes no per-row scales), torch.compile of the transformer (fullgraph)
    and of the VAE decode, the recipe's inductor flags."""
    import torch
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor, quantize_

    from flux import compiler
    from flux.speed import fp8 as fp8_

    ctx.drop_ours()
    mode, why = torchao_mode(ctx, outputs)
    started = time.perf_counter()
    transformer = ctx.transformer_copy()
    vae = copy_to(ctx.shared.vae, ctx.device)
    transformer.fuse_qkv_projections()
    granularity = PerRow() if ctx.rowwise else PerTensor()
    with fp8_.hardware_check_skipped(ctx.device.type != "cuda"):
        quantize_(transformer, Float8DynamicActivationFloat8WeightConfig(granularity=granularity))
    compiler.configure(inductor_tuning=True)  # the recipe's flags
    options = {"mode": mode} if mode in ("max-autotune",) else {}
    transformer = torch.compile(transformer, backend=ctx.args.backend, fullgraph=True, **options)
    vae.decode = torch.compile(vae.decode, backend=ctx.args.backend, fullgraph=True, **options)
    pipe = with_transformer(ctx, transformer, vae)
    built = time.perf_counter() - started
    with compiler.CompileTimes() as times:
        row = measure(ctx, TORCHAO, outputs, pipe_call(pipe, ctx))
    compile_s = max(row["first s"] - row["s"], 0.0)
    ctx.measured["torchao max-autotune" if mode == "max-autotune" else "torchao default"] = built + compile_s
    del pipe, transformer, vae
    free()
    ctx.run.add({**row, "transformer": f"compiled ({ctx.args.backend}, mode {mode}: {why}): {len(times.graphs)} graphs "
                                      f"compiled in the first call",
                 "compile mode": mode, "graphs compiled": len(times.graphs), "build s": round(built, 2),
                 "fp8": f"dynamic float8, {'per-row' if ctx.rowwise else 'per-tensor (no per-row _scaled_mm here)'}",
                 "after freeing": gpu_state(ctx.device)})  # what the peer left behind (a cudagraph pool, a leak)


# ----- our engine ----------------------------------------------------------------------------------------------------


def engine_env(ctx_or_args, changes: dict | None = None, rowwise: bool = True) -> dict:
    """The speed settings an engine of this run is built with: the FLUX_ settings of the environment (every one at
    its default when none is set), the run's backend, then `changes`."""
    args = getattr(ctx_or_args, "args", ctx_or_args)
    rowwise = getattr(ctx_or_args, "rowwise", rowwise)
    env = {k: v for k, v in os.environ.items() if k.startswith("FLUX_")} | {"FLUX_COMPILE": args.backend}
    if args.tiny:  # the H100's fp8 path on the CPU, where this torch's _scaled_mm takes per-row scales
        env.setdefault("FLUX_FP8", "fp8dqrow" if rowwise else "fp8wo")
    return env | (changes or {})


def tiny_variants() -> dict[str, str]:
    """Every variant's weights for our engines: only the base runs here (on the shared model), the others never load."""
    from flux import variants, weights

    return {name: weights.TINY for name in variants.NAMES}


def build_engine(ctx: Ctx, changes: dict, warm: list[tuple[int, int, int]], name: str, settings=None):
    """This engine on a copy of the shared transformer and VAE, with the run's settings but `changes`; warmed up at
    `warm` only (the sizes this run measures)."""
    from flux import compiler, logs
    from flux.engine import Engine
    from flux.settings import Settings

    settings = settings or Settings.from_env(ctx.device, ctx.work / slug(name), engine_env(ctx, changes))
    stages = logs.Stages(f"setup {name}")
    with stages("copy"):
        transformer = ctx.transformer_copy()
        vae = copy_to(ctx.shared.vae, ctx.device)
    pipe = with_transformer(ctx, transformer, vae)
    del transformer, vae
    with compiler.CompileTimes() as times:
        engine = Engine(pipe, None, tiny_variants(), ctx.device, ctx.dtype, settings, stages, compile_bundle=None)
        if settings.compile:
            engine.warm_up(warm)
    stages.total()
    ctx.run.add({"kind": "setup", "name": name, "settings": settings.describe(),
                 "warmed": ", ".join(f"{w}x{h} x{b}" for w, h, b in warm) + " only (the sizes this run measures; "
                           "setup() warms every table size: the boot section)" if settings.compile else "-",
                 "stages": {k: round(v, 2) for k, v in stages.seconds.items()}, "graphs": graph_seconds(times),
                 "graphs held": engine.graphs(), "plan": engine.plan.summary() if engine.plan else None})
    return engine


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def size_inputs(width: int, height: int) -> dict:
    """The request inputs for a size: its aspect ratio and megapixels when it is a table size (go_fast runs fp8 at
    table sizes only), else a custom size."""
    from flux import sizes

    for megapixels in sizes.MEGAPIXELS:
        for ratio in sizes.ASPECT_RATIOS:
            if sizes.table_size(ratio, megapixels) == (width, height):
                return {"aspect_ratio": ratio, "megapixels": megapixels}
    return {"aspect_ratio": "custom", "width": width, "height": height}


def request(ctx: Ctx, inputs: dict, outputs: int = 1, **more):
    from flux.request import Request

    return Request.build(prompt=PROMPT, **size_inputs(*ctx.args.size), num_inference_steps=ctx.args.steps,
                         guidance_scale=3.0, seed=SEED, num_outputs=outputs, **inputs, **more)


def transformer_state(engine, path: str) -> str:
    """Whether a path's transformer (and the VAE decoder) ran compiled or eager, and the graphs dynamo holds."""
    settings = engine.settings
    if not settings.compile:
        return "eager (FLUX_COMPILE=off)"
    compiled = engine.copy(path).compiled  # [its blocks, the VAE decoder it shares]
    blocks = "compiled" if compiled and compiled[0].regions else "eager (its compile fell back: see the log)"
    vae = ("VAE compiled" if len(compiled) > 1 and compiled[1].regions else
           "VAE eager" if settings.compile_vae else "VAE not compiled (FLUX_COMPILE_VAE=0)")
    held = ", ".join(f"{k} {n}" for k, n in engine.graphs().items())
    return f"{blocks} ({settings.compile}); {vae}; graphs held: {held}"


def ours_row(ctx: Ctx, engine, name: str, inputs: dict, outputs: int) -> None:
    req = request(ctx, inputs, outputs)

    def call(n: int, check):
        engine.generate(request(ctx, inputs, n), step_hook=check)

    graphs = engine.graphs()
    row = measure(ctx, name, outputs, call)
    row["transformer"] = transformer_state(engine, req.transformer)
    if engine.graphs() != graphs:
        row["recompiled"] = f"{graphs} -> {engine.graphs()}"
    ctx.run.add(row)
    if "recompiled" in row:
        ctx.run.add({"kind": "error", "error": f"{name} compiled new graphs: {row['recompiled']}"})


def ours_rows(ctx: Ctx, group: str, rows, outputs: int) -> None:
    """Each row its own section: the engine (built if it is not), then the timed calls."""
    for name, inputs in rows:
        need = ours_need(ctx, request(ctx, inputs, outputs))
        suffix = f", {outputs} outputs" if group == "other speed modes" and outputs > 1 else ""
        ctx.section(f"{group}: {name}{suffix}", ctx.engine_s() + ctx.row_s(name, inputs, outputs), need,
                    lambda name=name, inputs=inputs: ours_row(ctx, ctx.ours(), name, inputs, outputs))


def ours_need(ctx: Ctx, req) -> int:
    """The GPU memory a request of ours adds: what the engine says it needs beside its transformer, or, with no
    engine yet, the engine and the request (memory_needs)."""
    if ctx.engine is not None:
        return ctx.engine.runner.working_bytes(req)
    return ctx.needs["ours 4" if req.num_outputs > 1 else "ours row"]


def graph_seconds(times) -> dict[str, list[float]]:
    """compiler.CompileTimes' graphs by region kind: {kind: [seconds of each graph]}."""
    graphs: dict[str, list[float]] = {}
    for kind, seconds in times.graphs:
        graphs.setdefault(kind, []).append(round(seconds, 2))
    return graphs


def batch_warm_up(ctx: Ctx) -> None:
    from flux import compiler

    engine = ctx.ours()
    started = time.perf_counter()
    with compiler.CompileTimes() as times:
        engine.warm_up([(*ctx.args.size, 2)])  # batches 2 to 4 share these graphs
    ctx.batch_warm = True
    ctx.measured["batch warm-up"] = time.perf_counter() - started
    width, height = ctx.args.size
    ctx.run.add({"kind": "setup", "name": "ours, batch 2+ warm-up", "warmed": f"{width}x{height} x2",
                 "stages": {"warm-up": round(time.perf_counter() - started, 2)},
                 "graphs": graph_seconds(times),
                 "graphs held": engine.graphs()})


def lora_switches(ctx: Ctx) -> None:
    """A switch between two LoRAs of each rank (both in the disk cache), timed, then the prediction right after it:
    rank 16 on go_fast first; each (rank, path) its own section."""
    import torch

    from tests.helpers import http, loras

    os.environ["FLUX_ALLOW_PRIVATE_URLS"] = "1"  # the LoRA files are served on 127.0.0.1
    urls: dict[tuple[int, int], str] = {}
    with http.FileServer() as server:
        def make(rank: int) -> None:
            transformer = ctx.shared.transformer  # the architecture; its weights are not read
            for which in (0, 1):
                update = loras.make_update(transformer, "BLOCKS", seed=100 * rank + which, strength=0.5, rank=rank)
                urls[rank, which] = server.add(f"/lora-r{rank}-{which}.safetensors",
                                               loras.lora_bytes(update, "diffusers", dtype=torch.bfloat16))
                del update
            for which in (0, 1):  # each into the disk cache, once
                ctx.engine.runner.loader.fetch(urls[rank, which], ctx.engine.runner.loader.tokens())

        def switch(rank: int, go_fast: bool) -> None:
            engine = ctx.ours()
            if not {(rank, 0), (rank, 1)} <= set(urls):
                started = time.perf_counter()
                make(rank)
                ctx.measured["lora files"] = time.perf_counter() - started
            engine.use_loras(request(ctx, {"go_fast": go_fast}, replicate_weights=urls[rank, 1]))  # the state before
            graphs = engine.graphs()
            _sync(ctx.device)
            started = time.perf_counter()
            engine.use_loras(request(ctx, {"go_fast": go_fast}, replicate_weights=urls[rank, 0]))
            _sync(ctx.device)
            switched = time.perf_counter() - started
            started = time.perf_counter()
            engine.generate(request(ctx, {"go_fast": go_fast}, replicate_weights=urls[rank, 0]))
            _sync(ctx.device)
            ctx.run.add({"kind": "lora", "path": "go_fast" if go_fast else "bf16", "rank": rank, "switch s": switched,
                         "prediction s": time.perf_counter() - started, "recompiled": engine.graphs() != graphs})
            engine.use_loras(request(ctx, {"go_fast": go_fast}))  # no LoRA again: the next section's state

        for rank, go_fast in LORA_STEPS:
            seconds = (ctx.engine_s() + (0 if (rank, 1) in urls else ctx.est("lora files")) + ctx.est("lora switch")
                       + ctx.call_s("go_fast" if go_fast else "bf16 compiled", {"go_fast": go_fast}))
            need = ours_need(ctx, request(ctx, {"go_fast": go_fast}))
            ctx.section(f"LoRA switch: rank {rank}, {'go_fast' if go_fast else 'bf16'}", seconds, need,
                        lambda rank=rank, go_fast=go_fast: switch(rank, go_fast))


def offload(ctx: Ctx) -> None:
    """What small GPUs pay, measured on this one: T5 streamed for a prompt against T5 resident, an fp8 transformer
    moved whole to the CPU and back, and go_fast's fp8 copy quantized a block at a time from bf16 on the GPU and from
    CPU memory. GB are 2**30 bytes; GB/s divides the bytes by the seconds the move added."""
    import torch

    from flux import memory, variants
    from flux.settings import Settings
    from flux.speed import fp8 as fp8_
    from flux.speed import projections

    ctx.drop_ours()
    cpu = torch.device("cpu")
    settings = Settings.from_env(ctx.device, ctx.work / "offload", engine_env(ctx))

    def timed(fn):
        _sync(ctx.device)
        started = time.perf_counter()
        result = fn()
        _sync(ctx.device)
        return time.perf_counter() - started, result

    def encode(pipe) -> float:
        with torch.inference_mode():
            return timed(lambda: pipe.encode_prompt(prompt=PROMPT, prompt_2=None, device=ctx.device,
                                                    num_images_per_prompt=1,
                                                    max_sequence_length=variants.BASE.max_sequence_length))[0]

    def row(name: str, nbytes: int, seconds: float, over: float = 0.0) -> None:
        extra = seconds - over
        ctx.run.add({"kind": "offload", "name": name, "GB": memory.gb(nbytes), "s": round(seconds, 4),
                     "extra s": round(extra, 4), "GB/s": round(memory.gb(nbytes) / extra, 1) if nbytes and extra > 0
                     else None})

    t5 = ctx.shared.text_encoder_2
    encode(ctx.shared)  # warm: kernels, allocator
    resident = statistics.median(encode(ctx.shared) for _ in range(3))
    row("T5 encode, resident", 0, resident)
    pipe = with_transformer(ctx, ctx.shared.transformer)
    pipe.text_encoder_2 = copy_to(t5, cpu)
    memory.stream(pipe.text_encoder_2, ctx.device)
    encode(pipe)  # the first call records the block order for prefetching
    streamed = statistics.median(encode(pipe) for _ in range(3))
    row("T5 encode, streamed from CPU memory (group offloading)", memory.module_bytes(t5), streamed, resident)
    del pipe
    free()
    source = ctx.transformer_copy()
    projections.fuse_projections(source)
    seconds, fp8 = timed(lambda: fp8_.fp8_transformer(source, settings.fp8, ctx.device, settings.fp8_forced))
    row("fp8 copy quantized a block at a time from bf16 on the GPU", 0, seconds)
    size = memory.module_bytes(fp8)
    row("fp8 transformer moved to the CPU (pageable memory)", size, timed(lambda: projections.move(fp8, cpu))[0])
    row("fp8 transformer moved back to the GPU", size, timed(lambda: projections.move(fp8, ctx.device))[0])
    fp8 = None
    projections.move(source, cpu)
    free()
    seconds, fp8 = timed(lambda: fp8_.fp8_transformer(source, settings.fp8, ctx.device, settings.fp8_forced))
    row("fp8 copy quantized a block at a time from bf16 in CPU memory (setup on a 24 GB GPU)",
        memory.module_bytes(source), seconds)
    del source, fp8
    free()


def fa3_missing() -> str | None:
    """Why FlashAttention-3 cannot run here without spending time on it, or None when it can."""
    import importlib.util

    from diffusers.utils import is_flash_attn_3_available

    if is_flash_attn_3_available():
        return None
    if importlib.util.find_spec("kernels") is None:
        return ("flash_attn_interface is not installed, and diffusers' kernel-hub build (_flash_3_hub) needs the "
                "`kernels` package, which is not installed (nor is the network reachable on the lent GPU machines)")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return "flash_attn_interface is not installed, and the kernel hub is offline (HF_HUB_OFFLINE)"
    return None


def switch_blocker(ctx: Ctx, changes: dict, settings, default) -> str | None:
    """Why a switch cannot be measured here (its settings refused on this device, FA3's kernel missing, or the same
    settings as the default), or None."""
    from flux import speed
    from flux.errors import SettingsError

    try:
        speed.attention_backend(settings.attention, ctx.device)
    except SettingsError as exc:
        return str(exc)
    if settings.attention == "fa3" and (why := fa3_missing()):
        return why
    plain = lambda s: {k: v for k, v in vars(s).items() if k != "cache_dir"}  # noqa: E731
    if plain(settings) == plain(default):
        return f"the same settings as the default here ({', '.join(f'{k}={v}' for k, v in changes.items())} is the " \
               f"default on this device and backend)"
    return None


def switch_rows() -> list[tuple[str, dict, bool]]:
    """(row name, the setting changed, whether it compiles afresh) for each value flux/speed's SWITCHES name to
    compare against the default; the switches dynamo does not guard on last (they reset dynamo)."""
    from flux import speed

    rows = [(f"{s.env}={value}", {s.env: value}, s.unguarded) for s in speed.SWITCHES for value in s.compare]
    return sorted(rows, key=lambda row: row[2])


def switches(ctx: Ctx) -> None:
    """Each optimization off (or changed) on go_fast, one engine each (flux/speed's SWITCHES, each value it names to
    compare). A switch dynamo does not guard on (the inductor flags) resets dynamo and compiles into its own inductor
    cache folder, so its graphs are compiled with its setting (not reused); it runs last."""
    from flux.settings import Settings

    default = Settings.from_env(ctx.device, ctx.work / "default", engine_env(ctx))
    for name, changes, fresh in switch_rows():
        section = f"switch: {name}"
        if not ctx.wanted(section):
            continue
        try:
            settings = Settings.from_env(ctx.device, ctx.work / slug(name), engine_env(ctx, changes))
            blocked = switch_blocker(ctx, changes, settings, default)
        except Exception as exc:  # noqa: BLE001  a setting this device refuses
            blocked = f"{type(exc).__name__}: {exc}"
        if blocked:
            ctx.run.section = section
            ctx.run.add({"kind": "not available", "reason": blocked})
            continue
        compile_s = 0.0 if not settings.compile else ctx.est("ours setup")
        ctx.section(section, compile_s + ctx.row_s("go_fast", {"go_fast": True}), ctx.needs["ours setup"],
                    lambda name=name, settings=settings, fresh=fresh: switch(ctx, name, settings, fresh))


def switch(ctx: Ctx, name: str, settings, fresh: bool) -> None:
    import torch

    ctx.drop_ours()
    previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if fresh:  # graphs compiled with these flags: none reused from this process or from its inductor cache
        torch._dynamo.reset()
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(ctx.work / slug(name) / "inductor")
    try:
        engine = build_engine(ctx, {}, [(*ctx.args.size, 1)], name, settings)
        ours_row(ctx, engine, f"go_fast, {name}", {"go_fast": True}, 1)
        del engine
    finally:
        if previous is not None:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous
    free()


# ----- boot from the compile bundle -----------------------------------------------------------------------------------


def export_bundle(ctx: Ctx) -> None:
    """Our engine's compile bundle, as `script/compile-cache export` writes it, for the boot section."""
    from flux import compile_cache

    working = ctx.engine.settings.cache_dir
    if working is None or not (working / compile_cache.MANIFEST).is_file():
        return  # nothing compiled into artifacts (compile off, or a backend that writes none, like eager)
    try:
        compile_cache.export(working, ctx.work / "bundle")
    except Exception as exc:  # noqa: BLE001
        ctx.run.add({"kind": "error", "error": f"export bundle: {type(exc).__name__}: {exc}"[:400]})


def release_gpu(ctx: Ctx) -> None:
    """Everything this process holds on the GPU moved to CPU memory (the boot child needs the room)."""
    import torch

    ctx.drop_ours()
    ctx.place_shared(False)
    for name in ("text_encoder", "text_encoder_2", "vae"):
        getattr(ctx.shared, name).to(torch.device("cpu"))
    free()


def boot(ctx: Ctx) -> None:
    """A fresh process: the same random model, this engine booted from our engine's compile bundle, with setup()'s
    full warm-up (every table size), this process's GPU memory released first."""
    ctx.drop_ours()
    from flux import compile_cache

    bundle = ctx.work / "bundle"
    if not (bundle / compile_cache.MANIFEST).is_file():
        ctx.run.add({"kind": "skipped", "reason": "our engine wrote no compile bundle (it was not built, or its "
                     "backend writes no artifacts, like eager)"})
        return
    release_gpu(ctx)
    if not ctx.memory_fits(ctx.needs["boot"] + ctx.needs["base"]):
        return
    cmd = [sys.executable, __file__, "--boot-child", str(bundle), "--backend", ctx.args.backend,
           "--size", "x".join(map(str, ctx.args.size))] + (["--tiny"] if ctx.args.tiny else [])
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    env["FLUX_WEIGHTS_DIR"] = str(ctx.work / "boot")  # empty inductor and triton folders, as in a new container
    env.pop(FAIL_ENV, None)
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=max(30.0, ctx.run.left()))
    sys.stderr.write(done.stderr[-4000:])
    if done.returncode != 0:
        raise RuntimeError(f"the boot process failed (rc {done.returncode}): {done.stderr[-600:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    ctx.run.add({"kind": "boot", "from": "compile bundle", "process s": round(time.perf_counter() - started, 1),
                 **report})


def boot_child(args) -> None:
    """The boot section's fresh process (FLUX_WEIGHTS_DIR: its own, empty compile-cache folders): build the same
    model, boot this engine from the bundle, warm it up as setup() does (every size), report what compiled."""
    import flux  # noqa: F401  (the compile-cache folders, before anything compiles)
    from torch._dynamo.utils import counters

    from flux import logs
    from flux.engine import Engine
    from flux.settings import Settings

    logs.configure()
    started = time.perf_counter()
    device, dtype, shared = build_shared(args)
    built = time.perf_counter() - started
    rowwise = rowwise_fp8_runs(device)
    settings = Settings.from_env(device, Path(os.environ["FLUX_WEIGHTS_DIR"]),
                                 engine_env(args, {"FLUX_COMPILE_CACHE": args.boot_child}, rowwise))
    stages = logs.Stages("boot")
    pipe = shared
    engine = Engine(pipe, None, tiny_variants(), device, dtype, settings, stages)
    engine.warm_up()  # setup()'s: every table size, both dev paths, the VAE decoder
    stages.total()
    print(json.dumps({"model built s": round(built, 1), "warmed": "every table size (setup()'s warm-up)",
                      "stages": {k: round(v, 2) for k, v in stages.seconds.items()},
                      "fx graphs compiled": counters["inductor"]["fxgraph_cache_miss"],
                      "fx graphs loaded": counters["inductor"]["fxgraph_cache_hit"]}))


# ----- the sequence -------------------------------------------------------------------------------------------------


def build_shared(args):
    """The pipeline every contender is built from: full-size random FLUX.1-dev on the GPU, or the tiny FLUX."""
    import torch

    from flux import weights
    from flux.fakes import fullsize
    from flux.engine import default_device

    device = default_device()
    dtype = torch.bfloat16  # FLUX's precision on a GPU; on a CPU the fp8 paths quantize bf16 weights
    if args.tiny:
        from diffusers import FluxPipeline

        pipe = FluxPipeline.from_pretrained(weights.locate(weights.TINY, "dev"), dtype=dtype).to(device)
    else:
        pipe = fullsize.build(device, dtype, seed=SEED)
    pipe.set_progress_bar_config(disable=True)
    return device, dtype, pipe


def versions() -> dict[str, str]:
    import diffusers
    import torch
    import torchao

    import pruna

    return {"torch": torch.__version__, "torchao": torchao.__version__, "diffusers": diffusers.__version__,
            "pruna": pruna.__version__, "python": platform.python_version()}


def pinned(name: str) -> str | None:
    """The version the container image pins for a package (script/image_pins.py)."""
    import image_pins

    return image_pins.versions(ROOT).get(image_pins.canonical(name))


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return f"{props.name}, {props.total_memory / 1024**3:.1f} GiB, CUDA {torch.version.cuda}"
    return f"{os.cpu_count()}-core {platform.machine()} CPU"


def sequence(ctx: Ctx) -> None:
    """Every section, key rows first (module docstring)."""
    needs = ctx.needs
    ctx.section(GROUPS[0], ctx.row_s(BARE, None), needs["bare"], lambda: peer_bare(ctx, 1))
    ctx.section(GROUPS[1], ctx.est("ours setup"), needs["ours setup"], ctx.ours)
    ours_rows(ctx, GROUPS[2], KEY, 1)
    ctx.section(GROUPS[3], torchao_s(ctx, 1), needs["torchao"], lambda: peer_torchao(ctx, 1))
    lora_switches(ctx)
    # 4 outputs: ours (its batch-2+ graphs compiled first), then the peers
    ctx.section("4 outputs: ours warm-up", ctx.engine_s() + ctx.est("batch warm-up"),
                needs["ours setup"] if ctx.engine is None else 0, lambda: batch_warm_up(ctx))
    if ctx.batch_warm:
        ours_rows(ctx, "4 outputs", KEY, 4)
    ctx.section(f"4 outputs: {BARE}", ctx.row_s(BARE, None, 4), needs["bare 4"], lambda: peer_bare(ctx, 4))
    ctx.section(f"4 outputs: {TORCHAO}", torchao_s(ctx, 4), needs["torchao 4"], lambda: peer_torchao(ctx, 4))
    ours_rows(ctx, "other speed modes", OTHER_MODES, 1)
    if ctx.batch_warm:
        ours_rows(ctx, "other speed modes", OTHER_MODES, 4)
    ctx.section(GROUPS[7], ctx.est("offload"), needs["offload"], lambda: offload(ctx))
    switches(ctx)
    ctx.section(GROUPS[9], ctx.est("boot"), 0, lambda: boot(ctx))  # its own memory check, once it has released


def run(args) -> Path:
    work = Path(tempfile.mkdtemp(prefix="flux-benchmark-"))
    # Before anything compiles: this run's own LoRA and compile caches, empty, so that compile times are cold.
    from flux.folders import compile_cache_dir  # (no third-party imports)

    os.environ["FLUX_WEIGHTS_DIR"] = str(work / "weights")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(compile_cache_dir(work / "weights") / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(compile_cache_dir(work / "weights") / "triton")
    deadline = args.deadline or STARTED + args.budget
    import torch

    import flux  # noqa: F401  (library environment first)
    from flux import logs, memory

    logs.configure()
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("script/benchmark gpu needs an NVIDIA GPU (the full-size model is built on it); "
                         "--tiny runs the same sequence on the tiny FLUX on this CPU.")
    out = args.out or work / "out"
    started = time.perf_counter()
    device, dtype, shared = build_shared(args)
    software = versions()
    product = pinned("torch")
    meta = {"model": "tiny FLUX (random weights)" if args.tiny else "FLUX.1-dev architecture, random weights",
            "device": device_name(), "software": ", ".join(f"{k} {v}" for k, v in software.items()),
            "versions": software, "container pins": f"torch {product} (requirements.txt)",
            "size": "x".join(map(str, args.size)), "steps": args.steps, "repeats": args.repeats,
            "budget s": round(deadline - STARTED), "backend": args.backend,
            "build s": round(time.perf_counter() - started, 1)}
    if product and not software["torch"].startswith(product):
        meta["note"] = (f"Measured with this machine's torch {software['torch']}; the container pins torch {product} "
                        "(requirements.txt, docs/benchmarks.md: the torch pin): every row here is of the torch above.")
    ctx = Ctx(args, device, dtype, shared, Run(out, deadline, meta), work)
    # the model's own sizes: those of the meta-device model (--plan) for the full-size one
    ctx.sizes = memory.Sizes.of(shared.transformer, shared.text_encoder, shared.text_encoder_2, shared.vae)
    ctx.needs = memory_needs(ctx.sizes, shared.transformer.config, *args.size)
    ctx.rowwise = rowwise_fp8_runs(device)
    ctx.run.arm()
    try:
        sequence(ctx)
    except DeadlineReached:
        Run.disarm()
        cut = ctx.run.running
        ctx.run.section = cut or ctx.run.section
        ctx.run.add({"kind": "stopped", "reason": f"the deadline ({round(deadline - STARTED)} s after the start) came "
                     + ("while this section ran: it was cut" if cut else "between sections")})
    finally:
        Run.disarm()
    ctx.run.section = "end"
    ctx.run.add({"kind": "done", "elapsed s": round(ctx.run.elapsed(), 1)})
    return out


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="script/benchmark gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tiny FLUX on this machine's CPU")
    parser.add_argument("--budget", type=float, default=450,
                        help="seconds from this process's start; no section starts that cannot finish by then, and "
                             "the one running then is cut (default 450)")
    parser.add_argument("--deadline", type=float, default=None,
                        help="the same as an absolute time (seconds since the epoch); wins over --budget")
    parser.add_argument("--out", type=Path, default=None, help="folder for results.jsonl and results.md")
    parser.add_argument("--size", type=lambda s: tuple(map(int, s.split("x"))), default=None)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--repeats", type=int, default=2, help="timed calls after the untimed one (default 2)")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend for every contender")
    parser.add_argument("--torchao-mode", choices=TORCHAO_MODES, default="auto",
                        help="the torchao peer's compile mode (auto: max-autotune when its estimate fits)")
    parser.add_argument("--only", type=lambda s: [g.strip() for g in s.split(",") if g.strip()], default=None,
                        help="run only the sections whose names start with these (comma-separated), e.g. "
                             "'ours: setup,boot' (a second try that measures what the first did not)")
    parser.add_argument("--plan", action="store_true", help="print what each section holds on the GPU and exit")
    parser.add_argument("--boot-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.size = args.size or ((512, 512) if args.tiny else (1024, 1024))
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    if args.plan:
        print(plan_table())
        return 0
    if args.boot_child:
        boot_child(args)
        return 0
    out = run(args)
    print((out / "results.md").read_text())
    print(f"results: {out}/results.jsonl, {out}/results.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
