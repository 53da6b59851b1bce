"""The boot section: a fresh process booting this engine from the compile bundle ours wrote, with setup()'s full warm-up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .machine import ROOT, build_shared, rowwise_fp8_runs
from .measure import free
from .names import FAIL_ENV
from .ours import drop_ours, engine_env, tiny_variants
from .schedule import Ctx


def release_gpu(ctx: Ctx) -> None:
    """Everything this process holds on the GPU moved to CPU memory (the boot child needs the room)."""
    import torch

    drop_ours(ctx)
    ctx.place_shared(False)
    for name in ("text_encoder", "text_encoder_2", "vae"):
        getattr(ctx.shared, name).to(torch.device("cpu"))
    free()


def boot(ctx: Ctx) -> None:
    """A fresh process: the same random model, this engine booted from our engine's compile bundle, with setup()'s
    full warm-up (every table size), this process's GPU memory released first."""
    drop_ours(ctx)
    from flux import compile_cache

    bundle = ctx.work / "bundle"
    if not (bundle / compile_cache.MANIFEST).is_file():
        ctx.run.add({"kind": "skipped", "reason": "our engine wrote no compile bundle (it was not built, or its "
                     "backend writes no artifacts, like eager)"})
        return
    release_gpu(ctx)
    if not ctx.memory_fits(ctx.needs["boot"] + ctx.needs["base"]):
        return
    cmd = [sys.executable, str(ROOT / "script" / "benchmark_gpu.py"), "--boot-child", str(bundle), "--backend", ctx.args.backend,
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
