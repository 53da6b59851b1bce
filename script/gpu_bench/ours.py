"""Our engine in the run: built with the run's settings on a copy of the shared model, its rows, its compile bundle."""

from __future__ import annotations

import os
import time

from .measure import copy_to, free, measure, with_transformer
from .names import PROMPT, SEED
from .schedule import Ctx


def ours(ctx: Ctx):
    """Our engine, built when it is not (a rebuild reuses the graphs this process compiled: its row says)."""
    if ctx.engine is None:
        started = time.perf_counter()
        name = "ours" if not ctx.engines_built else "ours (again)"
        ctx.engine = build_engine(ctx, {}, [(*ctx.args.size, 1)], name)
        ctx.measured["ours setup" if not ctx.engines_built else "ours rebuild"] = time.perf_counter() - started
        ctx.engines_built += 1
    return ctx.engine


def drop_ours(ctx: Ctx) -> None:
    """Our engine freed (its compile bundle exported first, for the boot section)."""
    if ctx.engine is not None:
        export_bundle(ctx)
        ctx.engine = None
        free()


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
                    lambda name=name, inputs=inputs: ours_row(ctx, ours(ctx), name, inputs, outputs))


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

    engine = ours(ctx)
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
