"""script/benchmark gpu: this container against its peers on one GPU, in one run, within a time budget.

  script/benchmark gpu [--budget 540] [--out DIR]          on an H100 or H200: the full-size FLUX.1-dev
  script/benchmark gpu --tiny [--size 256x256 --steps 4]   the same sequence on the tiny FLUX, on a CPU

The model is the full-size FLUX.1-dev architecture with random weights built on the GPU (flux/fullsize.py: no
download, deterministic, seeded). Every timing is the whole pipeline call (text encoders, 28 denoising steps, VAE
decode, PIL images) at 1024x1024, the median of --repeats calls after one untimed call; that first call also checks
that the latents stay finite at every step (no NaN, no inf) and records their spread.

Sections, in priority order; one whose estimated time does not fit in what is left of --budget is skipped (and says
so), so the run ends in time; every result is written as soon as it is measured (DIR/results.jsonl, and
DIR/results.md rewritten after each), so a run cut short still leaves its numbers:

  peers      bare diffusers FluxPipeline in bf16, eager; the diffusers-torchao recipe (torchao's dynamic per-row
             float8 quantize_, fuse_qkv_projections, torch.compile of the transformer and of the VAE decode, with
             the recipe's inductor flags), 1 output
  ours       this engine as setup() builds it (every setting at its default): setup stage times, compile time per
             graph; then bf16 compiled, go_fast, Lightly Juiced and Juiced on bf16 and on go_fast, Extra Juiced,
             Blink of an eye, 1 output, each with its ratio to each peer
  lora       a switch to a rank-16 and to a rank-64 LoRA on every attention and MLP linear (already in the disk
             cache: read, restore, inject, fuse, fp8 re-quantize), on bf16 and on go_fast, and the prediction right
             after the switch (checked: no recompile)
  batch 4    the peers and ours at 4 outputs
  offload    the cost model of small GPUs measured (flux/memory.py, docs/benchmarks.md): T5 encoding a prompt resident
             and streamed from CPU memory through diffusers' group offloading (the bytes that crossed over the extra
             seconds: GB/s), the fp8 transformer moved whole to the CPU and back (GB/s each way), and go_fast's fp8
             copy quantized a block at a time from bf16 on the GPU and from CPU memory (setup on a 24 GB card)
  switches   each optimization off (or changed) on go_fast, one engine each: compile, FLUX_ATTENTION=cudnn and fa3,
             FLUX_FUSED_PROJECTIONS, FLUX_COMPILE_VAE, FLUX_CHANNELS_LAST, FLUX_INDUCTOR_TUNING_FLAGS
  boot       a fresh process booting this engine from the compile bundle the first engine wrote

Peak GPU memory is recorded for each timing. Ratios are always between numbers of this run.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT = "a knitted purple prune on a wooden table, studio light, 85mm"
SEED = 1
PEERS = ("diffusers bf16 eager", "diffusers-torchao fp8 compiled")
OURS = (  # (row name, request inputs)
    ("bf16 compiled", {}),
    ("go_fast", {"go_fast": True}),
    ("Lightly Juiced, bf16", {"speed_mode": "Lightly Juiced 🍊 (more consistent)"}),
    ("Juiced, bf16", {"speed_mode": "Juiced 🔥 (default)"}),
    ("Lightly Juiced, go_fast", {"speed_mode": "Lightly Juiced 🍊 (more consistent)", "go_fast": True}),
    ("Juiced, go_fast", {"speed_mode": "Juiced 🔥 (default)", "go_fast": True}),
    ("Extra Juiced", {"speed_mode": "Extra Juiced 🔥 (more speed)"}),
    ("Blink of an eye", {"speed_mode": "Blink of an eye 👁️"}),
)
SWITCHES = (  # (row name, settings changed from the defaults) measured on go_fast
    ("compile off", {"FLUX_COMPILE": "off"}),
    ("FLUX_ATTENTION=cudnn", {"FLUX_ATTENTION": "cudnn"}),
    ("FLUX_ATTENTION=fa3", {"FLUX_ATTENTION": "fa3"}),
    ("fused projections off", {"FLUX_FUSED_PROJECTIONS": "0"}),
    ("VAE compile off", {"FLUX_COMPILE_VAE": "0"}),
    ("channels_last off", {"FLUX_CHANNELS_LAST": "0"}),
    ("inductor tuning flags off", {"FLUX_INDUCTOR_TUNING_FLAGS": "0"}),
)
# Seconds, before anything is measured: what each kind of work is expected to take on an H100 (used only to decide
# whether a section fits; every estimate after the first measurements uses measured numbers).
H100_GUESS = {"call": 6.5, "torchao compile": 200.0, "engine compile": 240.0, "engine build": 40.0, "boot": 150.0,
              "lora": 20.0, "offload": 60.0}


# ----- the run: budget, results -------------------------------------------------------------------------------------


class Run:
    """The budget and the results: each row written to results.jsonl and results.md as soon as it exists."""

    def __init__(self, out: Path, budget: float, meta: dict):
        self.started = time.monotonic()
        self.budget = budget
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = []
        self.meta = meta
        (out / "results.jsonl").write_text("")
        self.add({"kind": "machine", **meta})

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def left(self) -> float:
        return self.budget - self.elapsed()

    def fits(self, section: str, estimate: float) -> bool:
        if estimate <= self.left():
            print(f"[{self.elapsed():6.0f}s] {section}: starting (estimate {estimate:.0f}s, {self.left():.0f}s left)",
                  file=sys.stderr, flush=True)
            return True
        self.add({"kind": "skipped", "section": section, "estimate s": round(estimate, 1),
                  "left s": round(self.left(), 1)})
        return False

    def add(self, row: dict) -> dict:
        row = {"at s": round(self.elapsed(), 1), **row}
        self.rows.append(row)
        with open(self.out / "results.jsonl", "a") as f:
            f.write(json.dumps(row, default=str, ensure_ascii=False) + "\n")
        (self.out / "results.md").write_text(markdown(self.rows))
        if row["kind"] not in ("machine",):
            print(f"[{self.elapsed():6.0f}s] {json.dumps(row, default=str, ensure_ascii=False)}", file=sys.stderr,
                  flush=True)
        return row

    def timing(self, name: str, outputs: int) -> dict | None:
        return next((r for r in self.rows if r["kind"] == "timing" and r["name"] == name and r["outputs"] == outputs),
                    None)


def markdown(rows: list[dict]) -> str:
    meta = rows[0]
    lines = [f"# script/benchmark gpu: {meta['model']}", "",
             f"{meta['device']}; {meta['software']}; {meta['size']}, {meta['steps']} steps, median of "
             f"{meta['repeats']} after one untimed call; budget {meta['budget s']} s", "",
             "| contender | outputs | s per call | s per image | / bare diffusers | / diffusers-torchao | peak GPU GB "
             "| first call s | latents finite (std) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if r["kind"] == "timing"):
        ratios = []
        for peer in PEERS:
            ref = next((p for p in rows if p["kind"] == "timing" and p["name"] == peer and p["outputs"] == r["outputs"]),
                       None)
            ratios.append(f"{r['s'] / ref['s']:.3f}" if ref else "-")
        lines.append(f"| {r['name']} | {r['outputs']} | {r['s']:.3f} | {r['s'] / r['outputs']:.3f} | {ratios[0]} | "
                     f"{ratios[1]} | {r.get('peak GB', '-')} | {r['first s']:.1f} | {r['finite']} "
                     f"({r['latent std']:.3g}) |")
    setups = [r for r in rows if r["kind"] == "setup"]
    if setups:
        lines += ["", "## Setup", "", "| engine | stage seconds | compiled graphs (kind: seconds each) |",
                  "|---|---|---|"]
        lines += [f"| {r['name']} | {', '.join(f'{k} {v:.1f}' for k, v in r['stages'].items())} | "
                  f"{'; '.join(f'{k}: ' + ', '.join(f'{s:.1f}' for s in v) for k, v in r['graphs'].items())} |"
                  for r in setups]
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
    other = [r for r in rows if r["kind"] in ("boot", "skipped", "error")]
    if other:
        lines += ["", "## Boot, skipped sections, errors", ""]
        lines += ["- " + ", ".join(f"{k}: {v}" for k, v in r.items() if k != "at s") for r in other]
    return "\n".join(lines) + "\n"


# ----- measuring ---------------------------------------------------------------------------------------------------


class FiniteLatents:
    """diffusers' callback_on_step_end: whether the latents stayed finite at every step, and their last spread."""

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


def measure(ctx: "Ctx", name: str, outputs: int, call, first_call=None, **extra) -> dict:
    """One untimed call (first_call, with the finiteness check), then --repeats timed calls of the whole pipeline."""
    import torch

    cuda = ctx.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(ctx.device)
    check = FiniteLatents()
    _sync(ctx.device)
    started = time.perf_counter()
    (first_call or call)(outputs, check)
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
           "peak GB": round(torch.cuda.max_memory_allocated(ctx.device) / 1024**3, 1) if cuda else None, **extra}
    ctx.known[(name, outputs)] = row["s"]
    return ctx.run.add(row)


# ----- the contenders ------------------------------------------------------------------------------------------------


@dataclass
class Ctx:
    args: argparse.Namespace
    device: object
    dtype: object
    shared: object  # the FluxPipeline everything is built from: its transformer is never changed
    run: Run
    work: Path
    known: dict = field(default_factory=dict)  # (name, outputs) -> measured seconds per call
    engine: object = None
    engine_compile_s: float | None = None

    def call_s(self, outputs: int = 1) -> float:
        """A bf16 eager call's seconds: measured, or the H100 guess."""
        measured = self.known.get((PEERS[0], outputs)) or self.known.get((PEERS[0], 1))
        if measured:
            return measured * (outputs if (PEERS[0], outputs) not in self.known else 1)
        return H100_GUESS["call"] * outputs

    def guess(self, what: str) -> float:
        if self.args.tiny:  # a CPU: compile times scale with the backend, not with the GPU guesses
            return {"torchao compile": 60.0, "engine compile": 150.0, "engine build": 20.0, "boot": 150.0,
                    "lora": 10.0, "offload": 10.0}.get(what, 10.0) * (0.1 if self.args.backend == "eager" else 1.0)
        return H100_GUESS[what]


def pipe_call(pipe, ctx: Ctx):
    width, height = ctx.args.size

    def call(outputs: int, check):
        import torch

        with torch.inference_mode():
            pipe(prompt=PROMPT, width=width, height=height, num_inference_steps=ctx.args.steps, guidance_scale=3.0,
                 num_images_per_prompt=outputs, max_sequence_length=512,
                 generator=[torch.Generator("cpu").manual_seed(SEED + i) for i in range(outputs)],
                 callback_on_step_end=check, callback_on_step_end_tensor_inputs=["latents"])

    return call


def with_transformer(ctx: Ctx, transformer, vae=None):
    from diffusers import FluxPipeline

    components = {**ctx.shared.components, "transformer": transformer}
    if vae is not None:
        components["vae"] = vae
    pipe = FluxPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def free() -> None:
    """Return what dropped references held (the caller deletes its own first)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def peer_bare(ctx: Ctx, outputs: int) -> None:
    measure(ctx, PEERS[0], outputs, pipe_call(ctx.shared, ctx))


def peer_torchao(ctx: Ctx, outputs: int) -> None:
    """diffusers-torchao's published FLUX recipe: fused QKV, dynamic per-row float8 through torchao's quantize_,
    torch.compile of the transformer (fullgraph) and of the VAE decode, the recipe's inductor flags."""
    import torch
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    from flux import compiler, speed

    started = time.perf_counter()
    transformer = copy.deepcopy(ctx.shared.transformer)
    vae = copy.deepcopy(ctx.shared.vae)
    transformer.fuse_qkv_projections()
    with speed.hardware_check_skipped(ctx.device.type != "cuda"):
        quantize_(transformer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    compiler.configure(inductor_tuning=True)  # the recipe's flags
    transformer = torch.compile(transformer, backend=ctx.args.backend, fullgraph=True)
    vae.decode = torch.compile(vae.decode, backend=ctx.args.backend, fullgraph=True)
    pipe = with_transformer(ctx, transformer, vae)
    measure(ctx, PEERS[1], outputs, pipe_call(pipe, ctx), setup_s=round(time.perf_counter() - started, 2))
    del pipe, transformer, vae
    free()


def engine_env(args, changes: dict | None = None) -> dict:
    """The speed settings an engine of this run is built with: the FLUX_ settings of the environment (every one at
    its default when none is set), the run's backend, then `changes`."""
    env = {k: v for k, v in os.environ.items() if k.startswith("FLUX_")} | {"FLUX_COMPILE": args.backend}
    if args.tiny:
        env.setdefault("FLUX_FP8", "fp8dqrow")  # the H100's fp8 path, on the CPU
    return env | (changes or {})


def build_engine(ctx: Ctx, changes: dict, warm: list[tuple[int, int, int]], name: str):
    """This engine on a copy of the shared transformer, with the run's settings but `changes`."""
    from flux import compiler, logs
    from flux.engine import Engine
    from flux.settings import Settings

    env = engine_env(ctx.args, changes)
    settings = Settings.from_env(ctx.device, ctx.work / name.replace(" ", "_").replace("=", "-"), env)
    stages = logs.Stages(f"setup {name}")
    with stages("copy"):
        transformer = copy.deepcopy(ctx.shared.transformer)
        vae = copy.deepcopy(ctx.shared.vae)
    pipe = with_transformer(ctx, transformer, vae)
    engine = Engine(pipe, None, "tiny", ctx.device, ctx.dtype, settings, stages, compile_bundle=None)
    graphs: dict[str, list[float]] = {}
    if settings.compile:
        with compiler.CompileTimes() as times:
            engine.warm_up(warm)
        for kind, seconds in times.graphs:
            graphs.setdefault(kind, []).append(round(seconds, 2))
    stages.total()
    ctx.run.add({"kind": "setup", "name": name, "settings": settings.describe(),
                 "stages": {k: round(v, 2) for k, v in stages.seconds.items()}, "graphs": graphs})
    return engine


def size_inputs(width: int, height: int) -> dict:
    """The request inputs for a size: its aspect ratio and megapixels when it is a table size (go_fast runs fp8 at
    table sizes only), else a custom size."""
    from flux import sizes

    for megapixels in sizes.MEGAPIXELS:
        for ratio in sizes.ASPECT_RATIOS:
            if sizes.table_size(ratio, megapixels) == (width, height):
                return {"aspect_ratio": ratio, "megapixels": megapixels}
    return {"aspect_ratio": "custom", "width": width, "height": height}


def engine_call(engine, ctx: Ctx, inputs: dict):
    from flux import speed
    from flux.engine import MAX_SEQUENCE_LENGTH
    from flux.request import Request

    width, height = ctx.args.size

    def request(outputs: int) -> Request:
        return Request.build(prompt=PROMPT, **size_inputs(width, height), num_inference_steps=ctx.args.steps,
                             guidance_scale=3.0, seed=SEED, num_outputs=outputs, **inputs)

    def call(outputs: int, check):
        engine.generate(request(outputs))

    def first_call(outputs: int, check):
        """The same request through the same path, with the latents checked at every step."""
        import torch

        req = request(outputs)
        engine.memory.use(req.path, engine.working_bytes(req))
        engine.use_loras(req)
        with torch.inference_mode():
            engine.path(req.path).run(
                "txt2img", speed.mode(req.speed_mode), prompt=PROMPT, width=width, height=height,
                num_inference_steps=req.num_inference_steps, guidance_scale=req.guidance_scale,
                max_sequence_length=MAX_SEQUENCE_LENGTH["dev"], num_images_per_prompt=outputs,
                generator=[torch.Generator("cpu").manual_seed(s) for s in req.seeds],
                callback_on_step_end=check, callback_on_step_end_tensor_inputs=["latents"])

    return call, first_call


def ours(ctx: Ctx, outputs: int) -> None:
    for name, inputs in OURS:
        estimate = (1 + ctx.args.repeats) * ctx.call_s(outputs) * (0.6 if inputs.get("go_fast") else 0.8)
        if not ctx.run.fits(f"ours: {name}, {outputs} output(s)", estimate):
            continue
        call, first_call = engine_call(ctx.engine, ctx, inputs)
        graphs = ctx.engine.graphs()
        row = measure(ctx, name, outputs, call, first_call)
        if ctx.engine.graphs() != graphs:
            ctx.run.add({"kind": "error", "section": name, "error": f"recompiled: {graphs} -> {ctx.engine.graphs()}"})
        del row


def lora_switch(ctx: Ctx) -> None:
    """A switch between two LoRAs of each rank (both in the disk cache), on bf16 and on go_fast, timed, then the
    prediction right after it."""
    import torch

    import lora_loader
    from flux.request import Request
    from tests.helpers import http, loras

    engine = ctx.engine
    transformer = engine.pipeline("dev", "txt2img").transformer
    os.environ["FLUX_ALLOW_PRIVATE_URLS"] = "1"  # the LoRA files are served on 127.0.0.1
    with http.FileServer() as server:
        urls = {}
        for rank in (16, 64):
            for which in (0, 1):
                update = loras.make_update(transformer, "BLOCKS", seed=100 * rank + which, strength=0.5, rank=rank)
                urls[rank, which] = server.add(f"/lora-r{rank}-{which}.safetensors",
                                               loras.lora_bytes(update, "diffusers", dtype=torch.bfloat16))
                del update
        width, height = ctx.args.size

        def request(url, go_fast):
            return Request.build(prompt=PROMPT, **size_inputs(width, height), num_inference_steps=ctx.args.steps,
                                 seed=SEED, replicate_weights=url, go_fast=go_fast)

        for url in urls.values():  # each into the disk cache, once
            engine.lora_loader.fetch(url, lora_loader.Tokens())
        for go_fast in (False, True):
            for rank in (16, 64):
                if not ctx.run.fits(f"lora: rank {rank}, {'go_fast' if go_fast else 'bf16'}",
                                    ctx.guess("lora") + 2 * ctx.call_s()):
                    continue
                engine.use_loras(request(urls[rank, 1], go_fast))  # the state a switch starts from
                graphs = engine.graphs()
                _sync(ctx.device)
                started = time.perf_counter()
                engine.use_loras(request(urls[rank, 0], go_fast))
                _sync(ctx.device)
                switch = time.perf_counter() - started
                started = time.perf_counter()
                engine.generate(request(urls[rank, 0], go_fast))
                _sync(ctx.device)
                ctx.run.add({"kind": "lora", "path": "go_fast" if go_fast else "bf16", "rank": rank,
                             "switch s": switch, "prediction s": time.perf_counter() - started,
                             "recompiled": engine.graphs() != graphs})
        engine.use_loras(request(None, False))
        engine.use_loras(request(None, True))


def offload(ctx: Ctx) -> None:
    """What small GPUs pay, measured on this one: T5 streamed for a prompt against T5 resident, an fp8 transformer
    moved whole to the CPU and back, and go_fast's fp8 copy quantized a block at a time from bf16 on the GPU and from
    CPU memory. GB are 2**30 bytes; GB/s divides the bytes by the seconds the move added."""
    import torch

    from flux import memory, speed
    from flux.engine import MAX_SEQUENCE_LENGTH
    from flux.settings import Settings

    cpu = torch.device("cpu")
    settings = Settings.from_env(ctx.device, ctx.work / "offload", engine_env(ctx.args))

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
                                                    max_sequence_length=MAX_SEQUENCE_LENGTH["dev"]))[0]

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
    pipe.text_encoder_2 = copy.deepcopy(t5).to(cpu)
    memory.stream(pipe.text_encoder_2, ctx.device)
    encode(pipe)  # the first call records the block order for prefetching
    streamed = statistics.median(encode(pipe) for _ in range(3))
    row("T5 encode, streamed from CPU memory (group offloading)", memory.module_bytes(t5), streamed, resident)
    del pipe
    free()
    source = copy.deepcopy(ctx.shared.transformer)
    speed.fuse_projections(source)
    seconds, fp8 = timed(lambda: speed.fp8_transformer(source, settings.fp8, ctx.device, settings.fp8_forced))
    row("fp8 copy quantized a block at a time from bf16 on the GPU", 0, seconds)
    size = memory.module_bytes(fp8)
    row("fp8 transformer moved to the CPU (pageable memory)", size, timed(lambda: speed.move(fp8, cpu))[0])
    row("fp8 transformer moved back to the GPU", size, timed(lambda: speed.move(fp8, ctx.device))[0])
    fp8 = None
    speed.move(source, cpu)
    free()
    seconds, _ = timed(lambda: speed.fp8_transformer(source, settings.fp8, ctx.device, settings.fp8_forced))
    row("fp8 copy quantized a block at a time from bf16 in CPU memory (setup on a 24 GB GPU)",
        memory.module_bytes(source), seconds)
    source = None
    free()


def switches(ctx: Ctx) -> None:
    width, height = ctx.args.size
    for name, changes in SWITCHES:
        compile_s = 0.0 if changes.get("FLUX_COMPILE") == "off" else (ctx.engine_compile_s or ctx.guess("engine compile"))
        estimate = ctx.guess("engine build") + compile_s + (1 + ctx.args.repeats) * ctx.call_s()
        if not ctx.run.fits(f"switch: {name}", estimate):
            continue
        engine = None
        try:
            engine = build_engine(ctx, changes, [(width, height, 1)], name)
            call, first_call = engine_call(engine, ctx, {"go_fast": True})
            measure(ctx, f"go_fast, {name}", 1, call, first_call)
        except Exception as exc:  # noqa: BLE001  (FA3 missing here, say): recorded, and the run goes on
            ctx.run.add({"kind": "error", "section": f"switch: {name}", "error": f"{type(exc).__name__}: {exc}"[:400]})
        del engine
        free()


def boot(ctx: Ctx) -> None:
    """A fresh process: the same random model, this engine booted from the first engine's compile bundle."""
    bundle = ctx.work / "bundle"
    if not (bundle / "manifest.json").is_file():
        ctx.run.add({"kind": "skipped", "section": "boot", "reason": "the first engine wrote no compile bundle "
                     "(its backend writes no artifacts)"})
        return
    cmd = [sys.executable, __file__, "--boot-child", str(bundle), "--backend", ctx.args.backend,
           "--size", "x".join(map(str, ctx.args.size))] + (["--tiny"] if ctx.args.tiny else [])
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    env["FLUX_WEIGHTS_DIR"] = str(ctx.work / "boot")  # empty inductor and triton folders, as in a new container
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=max(60, ctx.run.left()))
    if done.returncode != 0:
        ctx.run.add({"kind": "error", "section": "boot", "error": done.stderr[-600:]})
        return
    report = json.loads(done.stdout.strip().splitlines()[-1])
    ctx.run.add({"kind": "boot", "from": "compile bundle", "process s": round(time.perf_counter() - started, 1),
                 **report})


def export_bundle(ctx: Ctx) -> None:
    """The first engine's compile bundle, as `script/compile-cache export` writes it, for the boot section."""
    from flux import compile_cache

    working = ctx.engine.settings.cache_dir
    if working is None or not (working / compile_cache.MANIFEST).is_file():
        return  # nothing compiled into artifacts (compile off, or a backend that writes none, like eager)
    try:
        compile_cache.export(working, ctx.work / "bundle")
    except Exception as exc:  # noqa: BLE001
        ctx.run.add({"kind": "error", "section": "export bundle", "error": f"{type(exc).__name__}: {exc}"[:400]})


def boot_child(args) -> None:
    """The boot section's fresh process (FLUX_WEIGHTS_DIR: its own, empty compile-cache folders): build the same
    model, boot this engine from the bundle, warm it up at the benchmark's size, report what compiled."""
    import flux  # noqa: F401  (the compile-cache folders, before anything compiles)
    from torch._dynamo.utils import counters

    from flux import logs
    from flux.engine import Engine
    from flux.settings import Settings

    logs.configure()
    started = time.perf_counter()
    device, dtype, shared = build_shared(args)
    built = time.perf_counter() - started
    ctx = Ctx(args, device, dtype, shared, None, Path(os.environ.get("FLUX_WEIGHTS_DIR") or tempfile.mkdtemp()))
    settings = Settings.from_env(device, ctx.work, engine_env(args, {"FLUX_COMPILE_CACHE": args.boot_child}))
    stages = logs.Stages("boot")
    engine = Engine(with_transformer(ctx, shared.transformer), None, "tiny", device, dtype, settings, stages)
    engine.warm_up([(*args.size, 1)])
    stages.total()
    print(json.dumps({"model built s": round(built, 1), "stages": {k: round(v, 2) for k, v in stages.seconds.items()},
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
    if args.tiny:
        from diffusers import FluxPipeline

        dtype = torch.bfloat16  # the fp8dqrow path (per-row float8 quantizes bf16 weights)
        pipe = FluxPipeline.from_pretrained(weights.locate(weights.TINY, "dev"), dtype=dtype).to(device)
    else:
        dtype = torch.bfloat16
        pipe = fullsize.build(device, dtype, seed=SEED)
    pipe.set_progress_bar_config(disable=True)
    return device, dtype, pipe


def software() -> str:
    import diffusers
    import torch
    import torchao

    import pruna

    return (f"torch {torch.__version__}, diffusers {diffusers.__version__}, torchao {torchao.__version__}, "
            f"pruna {pruna.__version__}, Python {platform.python_version()}")


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return f"{props.name}, {props.total_memory / 1024**3:.0f} GiB, driver CUDA {torch.version.cuda}"
    return f"{os.cpu_count()}-core {platform.machine()} CPU"


def run(args) -> Path:
    work = Path(tempfile.mkdtemp(prefix="flux-benchmark-"))
    # Before anything compiles: this run's own LoRA and compile caches, empty, so that compile times are cold.
    os.environ["FLUX_WEIGHTS_DIR"] = str(work / "weights")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(work / "weights" / "compile-cache" / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(work / "weights" / "compile-cache" / "triton")
    import torch

    import flux  # noqa: F401  (library environment first)
    from flux import logs

    logs.configure()
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("script/benchmark gpu needs an NVIDIA GPU (the full-size model is built on it); "
                         "--tiny runs the same sequence on the tiny FLUX on this CPU.")
    out = args.out or work / "out"
    started = time.perf_counter()
    device, dtype, shared = build_shared(args)
    meta = {"model": "tiny FLUX (random weights)" if args.tiny else "FLUX.1-dev architecture, random weights",
            "device": device_name(), "software": software(), "size": "x".join(map(str, args.size)),
            "steps": args.steps, "repeats": args.repeats, "budget s": args.budget, "backend": args.backend,
            "build s": round(time.perf_counter() - started, 1)}
    ctx = Ctx(args, device, dtype, shared, Run(out, args.budget, meta), work)
    width, height = args.size
    calls = lambda n: (1 + args.repeats) * ctx.call_s(n)  # noqa: E731

    # peers, 1 output
    if ctx.run.fits(f"peer: {PEERS[0]}", calls(1)):
        peer_bare(ctx, 1)
    if ctx.run.fits(f"peer: {PEERS[1]}", ctx.guess("torchao compile") + calls(1) * 0.6):
        _guarded(ctx, PEERS[1], lambda: peer_torchao(ctx, 1))
    # ours, 1 output
    if ctx.run.fits("ours: setup", ctx.guess("engine build") + ctx.guess("engine compile")):
        started = time.perf_counter()
        ctx.engine = build_engine(ctx, {}, [(width, height, 1)], "ours")
        ctx.engine_compile_s = time.perf_counter() - started
        ours(ctx, 1)
        _guarded(ctx, "lora", lambda: lora_switch(ctx))
        # 4 outputs: ours compiles its batch-2+ graphs first
        if ctx.run.fits("ours: 4 outputs warm-up", 0.5 * ctx.engine_compile_s + calls(1)):
            ctx.engine.warm_up([(width, height, 2)])
            ours(ctx, 4)
    if ctx.run.fits(f"peer: {PEERS[0]}, 4 outputs", calls(4)):
        peer_bare(ctx, 4)
    if ctx.run.fits(f"peer: {PEERS[1]}, 4 outputs", ctx.guess("torchao compile") + calls(4) * 0.6):
        _guarded(ctx, PEERS[1], lambda: peer_torchao(ctx, 4))
    if ctx.engine is not None:
        export_bundle(ctx)
        ctx.engine = None
        free()
        if ctx.run.fits("offload", ctx.guess("offload")):
            _guarded(ctx, "offload", lambda: offload(ctx))
        switches(ctx)
        if ctx.run.fits("boot", ctx.guess("boot")):
            boot(ctx)
    ctx.run.add({"kind": "done", "elapsed s": round(ctx.run.elapsed(), 1)})
    return out


def _guarded(ctx: Ctx, section: str, fn) -> None:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001  one section failing leaves the others' numbers
        import traceback

        traceback.print_exc()
        ctx.run.add({"kind": "error", "section": section, "error": f"{type(exc).__name__}: {exc}"[:400]})


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="script/benchmark gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tiny FLUX on this machine's CPU")
    parser.add_argument("--budget", type=float, default=540, help="seconds; no section starts that cannot finish")
    parser.add_argument("--out", type=Path, default=None, help="folder for results.jsonl and results.md")
    parser.add_argument("--size", type=lambda s: tuple(map(int, s.split("x"))), default=None)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend for every contender")
    parser.add_argument("--boot-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.size = args.size or ((512, 512) if args.tiny else (1024, 1024))
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    if args.boot_child:
        boot_child(args)
        return 0
    out = run(args)
    print((out / "results.md").read_text())
    print(f"results: {out}/results.jsonl, {out}/results.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
