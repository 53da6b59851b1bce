"""The sections after the key rows that are neither peers nor boot: LoRA switches, offloading, each switch off."""

from __future__ import annotations

import os
import statistics
import time

from .measure import copy_to, free, sync, with_transformer
from .names import LORA_STEPS, PROMPT
from .ours import build_engine, drop_ours, engine_env, ours, ours_need, ours_row, request, slug
from .schedule import Ctx


def lora_switches(ctx: Ctx) -> None:
    """A switch between two LoRAs of each rank (both in the disk cache), timed, then the prediction right after it:
    rank 16 on go_fast first; each (rank, path) its own section."""
    import torch

    from fileserver import FileServer

    from flux.fakes import loras

    os.environ["FLUX_ALLOW_PRIVATE_URLS"] = "1"  # the LoRA files are served on 127.0.0.1
    urls: dict[tuple[int, int], str] = {}
    with FileServer() as server:
        def make(rank: int) -> None:
            transformer = ctx.shared.transformer  # the architecture; its weights are not read
            for which in (0, 1):
                update = loras.make_update(transformer, "BLOCKS", seed=100 * rank + which, strength=0.5, rank=rank)
                urls[rank, which] = server.add(f"/lora-r{rank}-{which}.safetensors",
                                               loras.diffusers_bytes(update, dtype=torch.bfloat16))
                del update
            for which in (0, 1):  # each into the disk cache, once
                ctx.engine.runner.loader.fetch(urls[rank, which], ctx.engine.runner.loader.tokens())

        def switch(rank: int, go_fast: bool) -> None:
            engine = ours(ctx)
            if not {(rank, 0), (rank, 1)} <= set(urls):
                started = time.perf_counter()
                make(rank)
                ctx.measured["lora files"] = time.perf_counter() - started
            engine.use_loras(request(ctx, {"go_fast": go_fast}, replicate_weights=urls[rank, 1]))  # the state before
            graphs = engine.graphs()
            sync(ctx.device)
            started = time.perf_counter()
            engine.use_loras(request(ctx, {"go_fast": go_fast}, replicate_weights=urls[rank, 0]))
            sync(ctx.device)
            switched = time.perf_counter() - started
            started = time.perf_counter()
            engine.generate(request(ctx, {"go_fast": go_fast}, replicate_weights=urls[rank, 0]))
            sync(ctx.device)
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

    drop_ours(ctx)
    cpu = torch.device("cpu")
    settings = Settings.from_env(ctx.device, ctx.work / "offload", engine_env(ctx))

    def timed(fn):
        sync(ctx.device)
        started = time.perf_counter()
        result = fn()
        sync(ctx.device)
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
    """(row name, the setting changed, whether it compiles afresh) for each value flux/switches.py's SETTINGS name to
    compare against the default; the switches dynamo does not guard on last (they reset dynamo)."""
    from flux import switches

    rows = [(f"{s.env}={value}", {s.env: value}, s.unguarded) for s in switches.SETTINGS for value in s.compare]
    return sorted(rows, key=lambda row: row[2])


def switches(ctx: Ctx) -> None:
    """Each optimization off (or changed) on go_fast, one engine each (flux/switches.py's SETTINGS, each value it names
    to compare). A switch dynamo does not guard on (the inductor flags) resets dynamo and compiles into its own inductor
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

    drop_ours(ctx)
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
