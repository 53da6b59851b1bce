"""The fast paths: an fp8 transformer (go_fast), regional torch.compile, Pruna's speed modes, compile caches.

Each optimization is a function applied to a transformer or a pipeline, in this order:

  smash(pipe, fp8=...)           pruna: "torchao" puts the transformer's linear layers in fp8 (go_fast path only;
                                 dynamic float8 with per-row scales on compute capability 8.9+, weight-only fp8
                                 elsewhere, CPU included), and "fora" installs FORA step caching; pruna's
                                 save-before-smash is off (it would write the whole pipeline to disk)
  compile_blocks(transformer)    torch.compile of each repeated block's forward (FLUX's 19 double-stream and 38
                                 single-stream blocks share two graphs), dynamic shapes, so one compilation serves
                                 every size from 256 to 1440 per side and 1 to 4 outputs
  FastPath.run(..., mode)        a speed mode sets FORA's interval and start step for one call, made through
                                 pruna's PrunaModel wrapper (FORA resets its per-request cache there)

Why the compile is ours and not pruna's "torch_compile": pruna compiles the transformer (or each block) *around*
FORA's per-block wrappers, so dynamo traces FORA's Python step counter and recompiles as the step changes. Here
the blocks' own forwards are compiled and FORA wraps the compiled functions: FORA's schedule stays plain Python, and no
speed mode, interval, LoRA, scale or size change ever triggers a recompile (tests/test_speed.py counts graphs).

The fp8 transformer is a copy of the bf16 one, sharing the text encoders and VAE. LoRAs are fused into the bf16
weights (flux/lora.py) and `Fp8Sync` re-quantizes just the linear layers a LoRA change touched, in place (same
tensors, so compiled graphs stay valid).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from . import sizes

log = logging.getLogger(__name__)

CACHE_VERSION = "1"  # bump when what is compiled changes in a way torch's own cache keys would not notice


@dataclass(frozen=True)
class Mode:
    """A Pruna speed mode: FORA recomputes the transformer blocks at the first `start_step` steps, then every
    `interval` steps, reusing their outputs in between. `fp8` runs it on the fp8 transformer."""

    name: str
    interval: int
    start_step: int
    fp8: bool = False

    @property
    def caches(self) -> bool:
        return self.interval > 1


OFF = "Off"
SPEED_MODES = (
    Mode(OFF, 1, 0),
    Mode("Lightly Juiced 🍊 (more consistent)", 2, 6),
    Mode("Juiced 🔥 (default)", 2, 2),
    Mode("Extra Juiced 🔥 (more speed)", 3, 2, fp8=True),
    Mode("Blink of an eye 👁️", 5, 1, fp8=True),
)
SPEED_MODE_NAMES = tuple(m.name for m in SPEED_MODES)


def mode(name: str) -> Mode:
    return next(m for m in SPEED_MODES if m.name == name)


def computed_steps(mode: Mode, steps: int) -> int:
    """How many of `steps` denoising steps run the transformer blocks under a mode (pruna's own schedule)."""
    from pruna.algorithms.fora import CacheHelper

    helper = CacheHelper.__new__(CacheHelper)
    helper.interval, helper.start_step = mode.interval, mode.start_step
    return sum(helper.get_cache_schedule(steps))


# ----- settings --------------------------------------------------------------------------------------------------


def fp8_kind(device: torch.device) -> str:
    """pruna's torchao quant type: dynamic float8 (per-row) where the GPU has fp8 tensor cores, else weight-only."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9):
        return "fp8dqrow"
    return "fp8wo"


@dataclass(frozen=True)
class Settings:
    """How the fast paths are built. From the environment:

    FLUX_COMPILE   torch.compile backend for the transformer blocks ("inductor", "eager", ...) or "off".
                   Default: inductor on a GPU; off on a CPU (the tiny model gains nothing from it).
    FLUX_WARMUP    "1": run every schema size through each compiled path in setup (default when compiling).
    FLUX_COMPILE_CACHE  where compiled artifacts persist across boots. Default: weights/compile-cache.
    """

    compile: str | None
    fp8: str
    warmup: bool
    cache_dir: Path | None

    @classmethod
    def from_env(cls, device: torch.device, weights_dir: Path, env: dict | None = None) -> "Settings":
        env = os.environ if env is None else env
        backend = env.get("FLUX_COMPILE") or ("inductor" if device.type == "cuda" else "off")
        backend = None if backend.lower() in ("off", "0", "false", "none") else backend
        warmup = env.get("FLUX_WARMUP", "1" if backend else "0") not in ("0", "false", "off")
        cache = env.get("FLUX_COMPILE_CACHE") or str(weights_dir / "compile-cache")
        return cls(compile=backend, fp8=fp8_kind(device), warmup=warmup and backend is not None,
                   cache_dir=Path(cache) if backend else None)


# ----- compile -----------------------------------------------------------------------------------------------


def blocks(transformer) -> list[torch.nn.Module]:
    return [*transformer.transformer_blocks, *transformer.single_transformer_blocks]


def compile_blocks(transformer, backend: str) -> None:
    """Regional compilation: each block's forward compiled with dynamic shapes (all blocks of a kind share one
    graph; their weights are graph inputs, so in-place LoRA fusing and fp8 re-quantization need no recompile).
    Applied after smash, while FORA is off: FORA's next enable() wraps the compiled forwards."""
    for block in blocks(transformer):
        block.forward = torch.compile(block.forward, backend=backend, dynamic=True, fullgraph=True)


class CompileCache:
    """torch's compile artifacts (inductor's FX graph and autotune caches, triton kernels) kept under weights/, so
    a second boot on the same GPU type and software skips most compile time. One file per key."""

    def __init__(self, folder: Path, key: dict):
        self.folder = folder
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.file = folder / f"artifacts-{digest}.bin"

    @classmethod
    def for_setup(cls, settings: Settings, transformer, device: torch.device) -> "CompileCache":
        folder = settings.cache_dir
        folder.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(folder / "inductor"))
        os.environ.setdefault("TRITON_CACHE_DIR", str(folder / "triton"))
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        key = dict(version=CACHE_VERSION, torch=torch.__version__, gpu=gpu, backend=settings.compile,
                   fp8=settings.fp8, config=dict(transformer.config))
        return cls(folder, key)

    def load(self) -> bool:
        if not self.file.is_file():
            return False
        try:
            torch.compiler.load_cache_artifacts(self.file.read_bytes())
            return True
        except Exception as exc:  # a stale or corrupt cache costs a recompile, never a failed setup
            log.warning("compile cache %s unusable (%s); compiling from scratch", self.file.name, exc)
            self.file.unlink(missing_ok=True)
            return False

    def save(self) -> None:
        saved = torch.compiler.save_cache_artifacts()
        if not saved:
            return
        tmp = self.file.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_bytes(saved[0])
        os.replace(tmp, self.file)


# ----- fp8 -------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def quant_config(kind: str):
    """The torchao config pruna uses for a quant type (one definition for smash and for re-quantization)."""
    from pruna.algorithms import AlgorithmRegistry

    with warnings.catch_warnings():  # pruna builds every config it knows; torchao deprecates some of them
        warnings.simplefilter("ignore")
        return AlgorithmRegistry["torchao"].import_algorithm_packages()[kind]


class Fp8Sync:
    """Keeps the fp8 transformer equal to a quantization of the bf16 one, layer by layer, in place (a layer the
    quantizer left in bf16 is copied)."""

    def __init__(self, bf16, fp8, kind: str):
        self.kind = kind
        self.pairs: dict[int, tuple[torch.nn.Linear, torch.nn.Linear]] = {}
        fp8_modules = dict(fp8.named_modules())
        for name, module in bf16.named_modules():
            twin = fp8_modules.get(name)
            if isinstance(module, torch.nn.Linear) and isinstance(twin, torch.nn.Linear):
                self.pairs[id(module.weight)] = (module, twin)

    def sync(self, weight_ids: Iterable[int]) -> int:
        """Bring the twins of these bf16 weights up to date (ids of the parameters a LoRA change touched)."""
        from torchao.quantization import quantize_

        done = 0
        for key in set(weight_ids):
            pair = self.pairs.get(key)
            if pair is None:
                continue
            source, twin = pair
            with torch.no_grad():
                if hasattr(twin.weight, "qdata"):
                    fresh = torch.nn.Linear(source.in_features, source.out_features, bias=False, device="meta")
                    fresh.weight = torch.nn.Parameter(
                        source.weight.detach().to(twin.weight.qdata.device, copy=True), requires_grad=False
                    )
                    quantize_(fresh, quant_config(self.kind))
                    twin.weight.qdata.copy_(fresh.weight.qdata)
                    twin.weight.scale.copy_(fresh.weight.scale)
                else:
                    twin.weight.copy_(source.weight)
                if source.bias is not None:
                    twin.bias.copy_(source.bias)
            done += 1
        return done


def fp8_copy(transformer) -> torch.nn.Module:
    """A copy of the transformer to be quantized by smash(fp8=True); it shares nothing with the original."""
    twin = copy.deepcopy(transformer)
    twin.requires_grad_(False)
    return twin


# ----- pruna ----------------------------------------------------------------------------------------------------


def smash(pipe, device: torch.device, fp8: str | None):
    """pruna's smash: FORA (and the fp8 quantization when asked) on a pipeline. Returns the PrunaModel."""
    from pruna import SmashConfig
    from pruna import smash as pruna_smash

    algorithms = {"fora": {"fora_interval": 2, "fora_start_step": 2}}
    if fp8:
        algorithms["torchao"] = {"torchao_quant_type": fp8}
    config = SmashConfig(list(algorithms), device=str(device.type))
    for values in algorithms.values():
        config.add(values)
    config._prepare_saving = False  # pruna would save the whole pipeline to disk before quantizing
    with _quiet_pruna():
        smashed = pruna_smash(pipe, config)
    smashed.model.cache_helper.disable()  # enabled per call, only for the modes that cache
    return smashed


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


class FastPath:
    """One transformer (bf16 or fp8) in pipelines for each task, smashed by pruna, run with a speed mode."""

    def __init__(self, smashed, pipelines: dict[str, object]):
        from pruna import PrunaModel

        self.helper = smashed.model.cache_helper
        self.transformer = smashed.model.transformer
        # Every task's pipeline called through pruna's wrapper, like the smashed one.
        self.models = {task: smashed if pipe is smashed.model else PrunaModel(pipe, smashed.smash_config)
                       for task, pipe in pipelines.items()}

    def run(self, task: str, mode: Mode, **kwargs):
        model = self.models[task]
        if not mode.caches:
            return model(**kwargs)
        helper = self.helper
        helper.pipe = model.model  # FORA reads the step count from the pipeline it wraps
        helper.set_params(interval=mode.interval, start_step=mode.start_step)
        helper.enable()  # wraps the blocks' (compiled) forwards and the pipeline's __call__, which resets it
        try:
            return model(**kwargs)
        finally:
            helper.disable()


# ----- warm-up ----------------------------------------------------------------------------------------------------


def warm_sizes() -> list[tuple[int, int, int]]:
    """(width, height, batch) for every table size at both megapixels, batch 1, and a batch of 2 (dynamo
    specializes batch 1 apart from larger batches; one larger batch covers 2 to 4)."""
    shapes = [(*sizes.table_size(ratio, mp), 1) for mp in sizes.MEGAPIXELS for ratio in sizes.ASPECT_RATIOS]
    smallest = min(shapes, key=lambda s: s[0] * s[1])
    return [*shapes, (smallest[0], smallest[1], 2)]


def warm_up(path: FastPath, max_sequence_length: int, shapes: list[tuple[int, int, int]] | None = None) -> float:
    """One denoising step at every size through a compiled path (latents only: the VAE is not compiled)."""
    started = time.monotonic()
    off = mode(OFF)
    for width, height, batch in shapes or warm_sizes():
        with torch.inference_mode():
            path.run("txt2img", off, prompt="warm-up", width=width, height=height, num_inference_steps=1,
                     num_images_per_prompt=batch, max_sequence_length=max_sequence_length, output_type="latent",
                     generator=torch.Generator("cpu").manual_seed(0))
    return time.monotonic() - started
