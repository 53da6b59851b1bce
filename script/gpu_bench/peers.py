"""The peers: bare diffusers, and diffusers-torchao's published FLUX recipe."""

from __future__ import annotations

import time

from .measure import copy_to, free, gpu_state, measure, pipe_call, with_transformer
from .names import BARE, TORCHAO
from .ours import drop_ours
from .schedule import Ctx


def peer_bare(ctx: Ctx, outputs: int) -> None:
    drop_ours(ctx)
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

    drop_ours(ctx)
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
