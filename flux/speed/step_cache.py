"""Step caches: a speed mode reuses the transformer's work across denoising steps through one of these.

One interface, `StepCache`; one class per kind of cache, listed in `STEP_CACHES`. FORA (pruna's) is the first: it
recomputes the transformer blocks at the first `start_step` steps, then every `interval` steps, and reuses every
block's output in between. A TaylorSeer- or TeaCache-style cache is one more class: how it is installed on a
transformer copy when the copy is built (`install`), how one pipeline call runs with it (`run`, returning how many
steps it served from its cache), which steps compute (`computed_steps`) and the most it holds on the GPU
(`holds_bytes`, for the memory plan).

pruna installs its caches through `smash`, which composes the algorithms of every pruna cache listed here; every
call of every task's pipeline then goes through pruna's PrunaModel wrapper, where FORA resets its per-call state.

Why the blocks are compiled beneath the cache and not by pruna's "torch_compile": pruna compiles the transformer (or
each block) *around* FORA's per-block wrappers, so dynamo would trace FORA's Python step counter and recompile as
the step changes. Here the blocks' own forwards are compiled and FORA wraps the compiled functions: its schedule
stays plain Python, and no speed mode, interval, LoRA, scale or size change ever triggers a recompile.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Callable

import torch

from .. import memory

log = logging.getLogger(__name__)


class StepCache:
    """One kind of step cache on one transformer copy (a subclass per kind)."""

    name: str = ""
    algorithm: str | None = None  # pruna's algorithm name, smashed in by `smash`; None: installed by `install`
    defaults: dict = {}  # pruna's hyperparameters at smash time (a mode sets its own per call)

    def __init__(self, smashed):
        """Attach to a transformer copy smashed by `smash` (the cache off between calls)."""

    def run(self, call: Callable[[], object], pipeline, params: dict, passes_per_step: int) -> tuple[object, int]:
        """`call()` (one pipeline call) with the cache on at `params`; its output and the steps served from the cache.
        passes_per_step: transformer calls per denoising step (2 with true classifier-free guidance), cached apart."""
        raise NotImplementedError

    @staticmethod
    def computed_steps(params: dict, steps: int) -> int:
        """How many of `steps` denoising steps run the transformer blocks at `params`."""
        raise NotImplementedError

    @staticmethod
    def holds_bytes(config, width: int, height: int, batch: int, text_tokens: int, element_size: int) -> int:
        """The most it holds on the GPU during one call, per transformer pass of a step."""
        raise NotImplementedError


class Fora(StepCache):
    """pruna's FORA: every block's output recomputed at the first `start_step` steps and then every `interval`
    steps, reused in between."""

    name = "fora"
    algorithm = "fora"
    defaults = {"fora_interval": 2, "fora_start_step": 2}

    def __init__(self, smashed):
        self.helper = smashed.model.cache_helper
        self.helper.disable()  # enabled per call, only for the modes that cache

    def run(self, call, pipeline, params: dict, passes_per_step: int):
        helper = self.helper
        helper.pipe = pipeline  # FORA reads the step count from the pipeline it wraps
        helper.set_params(interval=params["interval"], start_step=params["start_step"],
                          backbone_calls_per_step=passes_per_step)
        helper.enable()  # wraps the blocks' (compiled) forwards and the pipeline's __call__, which resets it
        try:
            output = call()
            ran = helper.step  # FORA's schedule: 1 computes the step, 0 reuses the cached block outputs
            return output, ran - sum(helper.cache_schedule[:ran])
        finally:
            helper.disable()

    @staticmethod
    def computed_steps(params: dict, steps: int) -> int:
        from pruna.algorithms.fora import CacheHelper

        helper = CacheHelper.__new__(CacheHelper)  # only its schedule: pruna's own, not a copy of it
        helper.interval, helper.start_step = params["interval"], params["start_step"]
        return sum(helper.get_cache_schedule(steps))

    @staticmethod
    def holds_bytes(config, width, height, batch, text_tokens, element_size=2):
        """Every block's output, kept until the call returns (pruna's CacheHelper)."""
        return memory.block_outputs_bytes(config, width, height, batch, text_tokens, element_size)


STEP_CACHES: dict[str, type[StepCache]] = {cache.name: cache for cache in (Fora,)}


def holds_bytes(config, width: int, height: int, batch: int, text_tokens: int, element_size: int = 2) -> int:
    """The most any step cache holds in one call per pass (what the memory plan keeps room for)."""
    return max(cache.holds_bytes(config, width, height, batch, text_tokens, element_size)
               for cache in STEP_CACHES.values())


def smash(pipe, device: torch.device):
    """pruna's smash of a pipeline (its transformer already bf16 or fp8) with every pruna step cache; returns the
    PrunaModel and the caches attached to it, by name."""
    from pruna import SmashConfig
    from pruna import smash as pruna_smash

    caches = [cache for cache in STEP_CACHES.values() if cache.algorithm]
    config = SmashConfig([cache.algorithm for cache in caches], device=str(device.type))
    for cache in caches:
        config.add(cache.defaults)  # per call: each mode sets its own
    with _quiet_pruna():
        config.disable_saving()  # pruna would save the whole pipeline to disk first
        smashed = pruna_smash(pipe, config)
    return smashed, {cache.name: cache(smashed) for cache in STEP_CACHES.values()}


@contextmanager
def _quiet_pruna():
    """pruna logs each algorithm at INFO and warns about fp8 on CPUs and torchao versions while smashing (its
    context manager resets the level, so a filter): keep setup logs to our own lines, errors excepted."""
    logger = logging.getLogger("pruna_logger")
    errors_only = logging.Filter()
    errors_only.filter = lambda record: record.levelno >= logging.ERROR
    logger.addFilter(errors_only)
    try:
        yield
    finally:
        logger.removeFilter(errors_only)
