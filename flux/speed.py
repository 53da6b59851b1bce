"""The fast paths: an fp8 transformer (go_fast), Pruna's speed modes, and the optimizations that serve every path.

Each optimization is a function applied to a transformer, a VAE or a pipeline, with its own switch in
flux/settings.py, in this order (flux/engine.py):

  set_attention(transformer, name)   FLUX_ATTENTION: diffusers' attention backend (SDPA, cuDNN, FlashAttention-3)
  fuse_projections(transformer)      FLUX_FUSED_PROJECTIONS: q, k, v (and the added q, k, v) in one matmul each;
                                     the separate layers stay, as views into the fused weights, so a LoRA fused
                                     into them lands in the fused matmul too, exactly
  vae_channels_last(vae)             FLUX_CHANNELS_LAST: the VAE in channels_last memory format
  fp8_transformer(transformer, ...)  go_fast's transformer: a copy of the bf16 one sharing nothing, its linear layers
                                     in fp8 with the torchao config pruna's "torchao" algorithm uses (FLUX_FP8:
                                     dynamic float8 with per-row scales, or weight-only fp8), built a block at a time
  smash(pipe, ...)                   pruna: "fora" installs FORA step caching
  compiler.compile_blocks(...)       FLUX_COMPILE: each transformer block compiled (flux/compiler.py)
  compiler.compile_vae_decoder(...)  FLUX_COMPILE_VAE
  FastPath.run(..., mode)            a speed mode sets FORA's interval and start step for one call, made through
                                     pruna's PrunaModel wrapper (FORA resets its per-request cache there)

Why the compile is ours and not pruna's "torch_compile": pruna compiles the transformer (or each block) *around*
FORA's per-block wrappers, so dynamo traces FORA's Python step counter and recompiles as the step changes. Here
the blocks' own forwards are compiled and FORA wraps the compiled functions: FORA's schedule stays plain Python, and no
speed mode, interval, LoRA, scale or size change ever triggers a recompile (tests/test_speed.py counts graphs).

LoRAs are fused into the bf16 weights (flux/lora.py) and `Fp8Sync` re-quantizes just the fp8 layers a LoRA change
touched, in place (same tensors, so compiled graphs stay valid).
"""

from __future__ import annotations

import copy
import functools
import logging
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable

import torch

from . import compiler, progress, sizes

log = logging.getLogger(__name__)


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


# ----- attention, fused projections, VAE layout -------------------------------------------------------------------

ATTENTION = {"sdpa": "native", "cudnn": "_native_cudnn"}  # FLUX_ATTENTION -> diffusers' backend name (fa3 below)


def attention_backend(name: str, device: torch.device) -> str:
    """diffusers' attention backend for a FLUX_ATTENTION value, or a SettingsError saying why it cannot run here."""
    from diffusers.utils import is_flash_attn_3_available, is_kernels_available

    from .settings import SettingsError

    if name == "sdpa":
        return ATTENTION[name]
    if device.type != "cuda":
        raise SettingsError(f"FLUX_ATTENTION={name} needs an NVIDIA GPU; on this machine use FLUX_ATTENTION=sdpa.")
    if name == "cudnn":
        if not torch.backends.cudnn.is_available():
            raise SettingsError("FLUX_ATTENTION=cudnn: this torch has no cuDNN. Use FLUX_ATTENTION=sdpa.")
        return ATTENTION[name]
    if torch.cuda.get_device_capability(device)[0] != 9:
        raise SettingsError("FLUX_ATTENTION=fa3: FlashAttention-3 runs on Hopper GPUs (H100, H200) only. "
                            "Use FLUX_ATTENTION=cudnn or sdpa.")
    # The flash_attn_interface package where it is installed, else the kernel hub's build (fetched in setup). The
    # image has neither (requirements.txt: the `kernels` package and FlashAttention-3 are not in it).
    if is_flash_attn_3_available():
        return "_flash_3"
    if not is_kernels_available():
        raise SettingsError("FLUX_ATTENTION=fa3: FlashAttention-3 is not installed in this image (it needs the "
                            "flash_attn_interface package, or the `kernels` package for the kernel hub's build). "
                            "Use FLUX_ATTENTION=cudnn or sdpa.")
    return "_flash_3_hub"


def set_attention(transformer, backend: str) -> None:
    """diffusers' attention dispatch for every attention processor of the transformer."""
    if backend == "native":
        return  # diffusers' default: torch's scaled_dot_product_attention
    from .settings import SettingsError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            transformer.set_attention_backend(backend)
    except Exception as exc:  # the hub kernel cannot be fetched, or a package is missing
        raise SettingsError(f"FLUX_ATTENTION: the {backend} attention backend cannot be used here ({exc}). "
                            "Use FLUX_ATTENTION=sdpa or cudnn.") from None


FUSED = {"to_qkv": ("to_q", "to_k", "to_v"), "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj")}


def _fused_attentions(transformer):
    return [m for m in transformer.modules() if getattr(m, "fused_projections", False)]


def fuse_projections(transformer) -> None:
    """diffusers' fuse_qkv_projections (one matmul for q, k and v), keeping the separate layers as views into the
    fused weights: no second copy in memory, and a LoRA fused into to_q (flux/lora.py) is in to_qkv at once."""
    transformer.fuse_qkv_projections()
    tie_projections(transformer)


def tie_projections(transformer) -> None:
    """Point each separate q, k, v layer's weight and bias at its rows of the fused layer, in place (the parameters
    stay the same objects). Needed again after .to() moves the transformer: it moves each parameter on its own."""
    with torch.no_grad():
        for attn in _fused_attentions(transformer):
            for fused_name, part_names in FUSED.items():
                fused = getattr(attn, fused_name, None)
                if fused is None:
                    continue
                row = 0
                for part in (getattr(attn, n, None) for n in part_names):
                    if part is None:
                        continue
                    rows = slice(row, row + part.out_features)
                    part.weight.data = fused.weight.data[rows]
                    if part.bias is not None:
                        part.bias.data = fused.bias.data[rows]
                    row += part.out_features


def move(transformer, device: torch.device) -> None:
    """transformer.to(device), keeping the fused projections' views (their separate layers are emptied first, so
    the move carries no second copy of q, k and v, and tied again after)."""
    attentions = _fused_attentions(transformer)
    with torch.no_grad():
        for attn in attentions:
            for part in (getattr(attn, n, None) for names in FUSED.values() for n in names):
                if part is not None:
                    part.weight.data = part.weight.data.new_empty(0)
                    if part.bias is not None:
                        part.bias.data = part.bias.data.new_empty(0)
    try:
        transformer.to(device)
    finally:
        tie_projections(transformer)


def drop_unfused(transformer) -> None:
    """Remove the separate q, k, v layers where fused ones compute (the fp8 copy: only the fused ones are
    quantized, and Fp8Sync maps a bf16 layer to its fused twin)."""
    for attn in _fused_attentions(transformer):
        for fused_name, part_names in FUSED.items():
            if hasattr(attn, fused_name):
                for name in part_names:
                    if hasattr(attn, name):
                        delattr(attn, name)


def vae_channels_last(vae) -> None:
    vae.to(memory_format=torch.channels_last)


# ----- fp8 -------------------------------------------------------------------------------------------------------


@contextmanager
def hardware_check_skipped(skip: bool):
    """torchao refuses dynamic float8 below compute capability 8.9, a CPU included (`_check_hardware_support`,
    imported into torchao.quantization.quant_api), although the same Float8Tensor code runs there through torch's
    own _scaled_mm. Asked for explicitly (FLUX_FP8=fp8dqrow), the check is skipped; torchao has no switch for it."""
    if not skip:
        yield
        return
    import torchao.quantization.quant_api as quant_api

    original = quant_api._check_hardware_support
    quant_api._check_hardware_support = lambda *args, **kwargs: None
    try:
        yield
    finally:
        quant_api._check_hardware_support = original


@functools.lru_cache(maxsize=None)
def quant_config(kind: str):
    """The torchao config pruna uses for a quant type (one definition for smash and for re-quantization)."""
    from pruna.algorithms import AlgorithmRegistry

    with warnings.catch_warnings():  # pruna builds every config it knows; torchao deprecates some of them
        warnings.simplefilter("ignore")
        return AlgorithmRegistry["torchao"].import_algorithm_packages()[kind]


def _fused_name(name: str) -> str | None:
    """transformer_blocks.0.attn.to_q -> transformer_blocks.0.attn.to_qkv (None for a layer that is not q, k, v)."""
    parent, _, leaf = name.rpartition(".")
    for fused, parts in FUSED.items():
        if leaf in parts:
            return f"{parent}.{fused}"
    return None


class Fp8Sync:
    """Keeps the fp8 transformer equal to a quantization of the bf16 one, layer by layer, in place. A bf16 q, k or v
    layer maps to the fp8 copy's fused layer, re-quantized whole from the bf16 fused layer (which holds q, k and v:
    fuse_projections); a layer the quantizer left in bf16 is copied."""

    def __init__(self, bf16, fp8, kind: str, skip_hardware_check: bool = False):
        self.kind = kind
        self.skip_hardware_check = skip_hardware_check
        self.pairs: dict[int, tuple[torch.nn.Linear, torch.nn.Linear]] = {}  # id(bf16 weight) -> (source, twin)
        bf16_modules, fp8_modules = dict(bf16.named_modules()), dict(fp8.named_modules())
        for name, module in bf16_modules.items():
            if not isinstance(module, torch.nn.Linear):
                continue
            source, twin = module, fp8_modules.get(name)
            if twin is None and (fused := _fused_name(name)) in fp8_modules:
                source, twin = bf16_modules[fused], fp8_modules[fused]
            if isinstance(twin, torch.nn.Linear):
                self.pairs[id(module.weight)] = (source, twin)

    def sync(self, weight_ids: Iterable[int]) -> int:
        """Bring the twins of these bf16 weights up to date (ids of the parameters a LoRA change touched)."""
        twins = {id(pair[1]): pair for key in set(weight_ids) if (pair := self.pairs.get(key)) is not None}
        for source, twin in twins.values():
            self._requantize(source, twin)
        return len(twins)

    def _requantize(self, source: torch.nn.Linear, twin: torch.nn.Linear) -> None:
        from torchao.quantization import quantize_

        with torch.no_grad():
            if hasattr(twin.weight, "qdata"):
                fresh = torch.nn.Linear(source.in_features, source.out_features, bias=False, device="meta")
                fresh.weight = torch.nn.Parameter(
                    source.weight.detach().to(twin.weight.qdata.device, copy=True), requires_grad=False
                )
                with hardware_check_skipped(self.skip_hardware_check):
                    quantize_(fresh, quant_config(self.kind))
                twin.weight.qdata.copy_(fresh.weight.qdata)
                twin.weight.scale.copy_(fresh.weight.scale)
            else:
                twin.weight.copy_(source.weight)
            if source.bias is not None:
                twin.bias.copy_(source.bias)


BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")


def fp8_transformer(source, kind: str, device: torch.device, skip_hardware_check: bool = False) -> torch.nn.Module:
    """go_fast's transformer: a copy of `source` (a bf16 transformer already prepared: attention backend, fused
    projections) sharing nothing with it, its linear layers quantized with the config pruna's torchao algorithm
    uses (`quant_config`), on `device`.

    It is built one block at a time: each block is copied from the source wherever that lives (on the GPU, or in
    CPU memory on a GPU too small to keep bf16 dev), and torchao's quantize_ moves it to `device` layer by layer and
    quantizes it there. So the GPU holds what it held before, the fp8 blocks made so far and at most one bf16
    block: never a second bf16 transformer. The result is bit for bit what pruna's smash with torchao makes of a
    whole copy (tests/test_offload.py); smash cannot make it a block at a time, from a model not on the GPU."""
    from torchao.quantization import quantize_

    config = quant_config(kind)
    blocks = {name: list(getattr(source, name)) for name in BLOCK_LISTS}
    skip_blocks = {id(block): None for listed in blocks.values() for block in listed}
    twin = copy.deepcopy(source, skip_blocks)  # everything but the blocks (their places left empty): embedders, norms
    twin.requires_grad_(False)
    with hardware_check_skipped(skip_hardware_check):
        quantize_(twin, config, device=device)
        for name, listed in blocks.items():
            for i, block in enumerate(listed):
                part = copy.deepcopy(block)
                drop_unfused(part)  # only the fused q, k, v are quantized: Fp8Sync maps each bf16 q, k, v layer to them
                part.requires_grad_(False)
                quantize_(part, config, device=device)
                getattr(twin, name)[i] = part
    return twin


# ----- pruna ----------------------------------------------------------------------------------------------------


def smash(pipe, device: torch.device):
    """pruna's smash: FORA on a pipeline (its transformer already bf16 or fp8). Returns the PrunaModel."""
    from pruna import SmashConfig
    from pruna import smash as pruna_smash

    config = SmashConfig(["fora"], device=str(device.type))
    config.add({"fora_interval": 2, "fora_start_step": 2})  # per call: FastPath.run sets each mode's
    with _quiet_pruna():
        config.disable_saving()  # pruna would save the whole pipeline to disk first
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
    """One transformer (bf16 or fp8) in pipelines for each task, smashed by pruna, run with a speed mode; its
    compiled regions fall back to eager on a compile error."""

    def __init__(self, name: str, smashed, pipelines: dict[str, object]):
        from pruna import PrunaModel

        self.name = name
        self.helper = smashed.model.cache_helper
        self.transformer = smashed.model.transformer
        # Every task's pipeline called through pruna's wrapper, like the smashed one.
        self.models = {task: smashed if pipe is smashed.model else PrunaModel(pipe, smashed.smash_config)
                       for task, pipe in pipelines.items()}
        self.compiled: list[compiler.Compiled] = []  # its blocks, and the VAE decoder it shares with other paths

    def run(self, task: str, mode: Mode, passes_per_step: int = 1, **kwargs) -> tuple[object, int]:
        """The pipeline's output, and how many denoising steps FORA served from its cache (0 with mode Off).
        passes_per_step: transformer calls per denoising step (2 with true classifier-free guidance), which FORA
        caches apart."""
        try:
            return self._run(task, mode, passes_per_step, **kwargs)
        except Exception as exc:
            if not self.fall_back(exc):
                raise
            return self._run(task, mode, passes_per_step, **kwargs)

    def fall_back(self, exc: BaseException) -> bool:
        """After a compile error: make the failing compiled region eager again, loudly. False: not a compile error."""
        region = getattr(exc, "flux_region", None)
        failing = [c for c in self.compiled if c.regions and (region is None or region in c.kinds)]
        if not failing or not compiler.is_compile_error(exc):
            return False
        for compiled in failing:
            compiled.revert()
        cause = getattr(exc, "inner_exception", None) or exc  # dynamo wraps a backend's error
        detail = str(cause).strip().splitlines()[0][:300] if str(cause).strip() else ""
        log.error("=" * 78 + "\nCOMPILE FAILED on the %s path (%s): %s: %s\nIt runs eager from now on: slower, same "
                  "results.\n" + "=" * 78, self.name, region or "compiled regions", type(cause).__name__, detail)
        return True

    def _run(self, task: str, mode: Mode, passes_per_step: int, **kwargs):
        model = self.models[task]
        if not mode.caches:
            return model(**kwargs), 0
        helper = self.helper
        helper.pipe = model.model  # FORA reads the step count from the pipeline it wraps
        helper.set_params(interval=mode.interval, start_step=mode.start_step, backbone_calls_per_step=passes_per_step)
        helper.enable()  # wraps the blocks' (compiled) forwards and the pipeline's __call__, which resets it
        try:
            output = model(**kwargs)
            ran = helper.step  # FORA's schedule: 1 computes the step, 0 reuses the cached block outputs
            return output, ran - sum(helper.cache_schedule[:ran])
        finally:
            helper.disable()


# ----- memory ----------------------------------------------------------------------------------------------------


def fora_bytes(transformer_config, width: int, height: int, batch: int, text_tokens: int, element_size: int = 2) -> int:
    """What FORA holds during a speed-mode call: every block's output, kept until the call returns (pruna's
    CacheHelper): per block, the text and image tokens at the inner width (the single-stream blocks return slices
    of one such tensor, which keep all of it alive)."""
    config = dict(transformer_config)
    blocks = config["num_layers"] + config["num_single_layers"]
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    image_tokens = (width // 16) * (height // 16)
    return blocks * batch * (text_tokens + image_tokens) * inner * element_size


# ----- warm-up ----------------------------------------------------------------------------------------------------


def warm_sizes() -> list[tuple[int, int, int]]:
    """(width, height, batch) for every table size at both megapixels, batch 1, and a batch of 2 (the fp8dqrow
    path compiles batch 1 apart from larger batches; one larger batch covers 2 to 4)."""
    shapes = [(*sizes.table_size(ratio, mp), 1) for mp in sizes.MEGAPIXELS for ratio in sizes.ASPECT_RATIOS]
    smallest = min(shapes, key=lambda s: s[0] * s[1])
    return [*shapes, (smallest[0], smallest[1], 2)]


def vae_warm_sizes() -> list[tuple[int, int, int]]:
    """(width, height, batch) that compile the VAE decoder for every request: dynamo keeps batch 1 apart, and a
    non-square size keeps height and width apart (a square one would make them one symbol, "duck sizing")."""
    width, height = sizes.table_size("21:9", "0.25")
    return [(width, height, 1), (width, height, 2)]


def warm_up(path: FastPath, max_sequence_length: int, shapes: list[tuple[int, int, int]] | None = None) -> float:
    """One denoising step at every size through a compiled path (latents only: the VAE decoder is warmed apart)."""
    started = time.monotonic()
    off = mode(OFF)
    shapes = shapes or warm_sizes()
    meter = progress.Meter(f"setup: warm-up {path.name}", len(shapes), unit="sizes", every_percent=25)
    for width, height, batch in shapes:
        with torch.inference_mode():
            path.run("txt2img", off, prompt="warm-up", width=width, height=height, num_inference_steps=1,
                     num_images_per_prompt=batch, max_sequence_length=max_sequence_length, output_type="latent",
                     generator=torch.Generator("cpu").manual_seed(0))
        meter.advance(1, f"{width}x{height} x{batch}")
    return time.monotonic() - started


def warm_up_vae(vae, shapes: list[tuple[int, int, int]], device: torch.device, dtype: torch.dtype) -> float:
    """A decode at each (width, height, batch): what a compiled VAE decoder needs before the first request."""
    started = time.monotonic()
    channels = vae.config.latent_channels
    for width, height, batch in shapes:
        with torch.inference_mode():  # as in a request: inference tensors (dynamo guards on the dispatch keys)
            latents = torch.randn(batch, channels, height // 8, width // 8, generator=torch.Generator().manual_seed(0))
            vae.decode(latents.to(device, dtype), return_dict=False)
    return time.monotonic() - started
