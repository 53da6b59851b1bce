"""Timing a whole pipeline call, and what the GPU holds: the tools every section uses."""

from __future__ import annotations

import copy
import statistics
import time

from .names import PROMPT, SEED


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


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(ctx, name: str, outputs: int, call) -> dict:
    """One untimed call (with the finiteness check), then --repeats timed calls of the whole pipeline. Returns the
    row, for the caller to complete and add."""
    import torch

    cuda = ctx.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(ctx.device)
    check = FiniteLatents()
    sync(ctx.device)
    started = time.perf_counter()
    call(outputs, check)
    sync(ctx.device)
    first = time.perf_counter() - started
    runs = []
    for _ in range(ctx.args.repeats):
        started = time.perf_counter()
        call(outputs, None)
        sync(ctx.device)
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


def with_transformer(ctx, transformer, vae=None):
    """The shared pipeline on another transformer (and VAE), its progress bar off."""
    from flux.engine import transformers

    pipe = transformers.with_transformer(ctx.shared, transformer, **({"vae": vae} if vae is not None else {}))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipe_call(pipe, ctx):
    width, height = ctx.args.size

    def call(outputs: int, check):
        import torch

        with torch.inference_mode():
            pipe(prompt=PROMPT, width=width, height=height, num_inference_steps=ctx.args.steps, guidance_scale=3.0,
                 num_images_per_prompt=outputs, max_sequence_length=512,
                 generator=[torch.Generator("cpu").manual_seed(SEED + i) for i in range(outputs)],
                 callback_on_step_end=check)

    return call
