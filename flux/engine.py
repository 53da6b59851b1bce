"""The engine: loads FLUX once, then turns a Request into images. It knows nothing of cog.

One set of components (text encoders, VAE, transformer) serves text-to-image,
img2img and inpainting: diffusers' three Flux pipelines built on the same module objects.
FLUX.1-schnell loads on first use and shares the text encoders and VAE.
Each transformer is a path (flux/speed.py): "dev" (bf16), "dev-fp8" (go_fast: an fp8 copy of
dev), "schnell" and "schnell-fp8" (both built on first use), each compiled per block and smashed by pruna for the
speed modes. flux/memory.py plans where each component lives for the GPU's memory: T5 may be streamed from CPU
memory, and where bf16 dev (or schnell) does not fit beside its fp8 copy it stays in CPU memory, as the source its
fp8 copy is quantized from, and its requests run the fp8 path (`route`).
LoRAs (lora_loader.py fetches and normalizes them, flux/lora.py fuses them) are made
to match each request on the bf16 transformer it uses and the CLIP text encoder; the fp8 copy
is re-quantized from the bf16 weights a LoRA change touched.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

import lora_loader  # top level beside predict.py, as the design lays it out

from . import compile_cache, compiler, logs, memory, progress, speed, weights
from . import images as image_io
from .errors import UserError
from .lora import TEXT_ENCODER, TRANSFORMER, Adapter, LoraManager
from .memory import Residency, activation_bytes
from .request import Request
from .safety import NsfwClassifier, SafetyChecker
from .settings import Settings, fp8_kind

log = logging.getLogger(__name__)

MAX_SEQUENCE_LENGTH = {"dev": 512, "schnell": 256}


class NonFiniteOutput(UserError):
    """The latents of a request came out NaN or infinite (its LoRAs, at their scales, broke the model)."""


@dataclass
class Result:
    images: list[Image.Image]
    seeds: list[int]
    flagged: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    steps: int = 0  # denoising steps each output ran
    passes: int = 0  # transformer passes that computed (FORA's cached steps do not), over every pipeline call
    loras: list[lora_loader.Fetched] = field(default_factory=list)
    moves: list[memory.Move] = field(default_factory=list)  # transfers between CPU and GPU memory

    @property
    def moved_bytes(self) -> int:
        return sum(m.bytes for m in self.moves)


@dataclass
class Fp8Twin:
    """An fp8 path's link to its bf16 model: the re-quantizer, the LoRA state quantized into it (None: unknown,
    resync) and the bf16 weights whose LoRA change it carries."""

    sync: speed.Fp8Sync
    lora: tuple | None = ()
    touched: set[int] = field(default_factory=set)


@dataclass
class Prediction:
    """What a prediction returns: its files, and its facts for the response's metrics (README, "Response")."""

    paths: list[Path]
    metrics: dict[str, object]


def _free_memory() -> None:
    """Give cached GPU memory back after an out-of-memory error, so the next prediction starts clean."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _release_host_memory() -> None:
    """Return freed heap pages to the OS after a prediction (glibc keeps them otherwise), so the resident size
    of a container that runs for days stays flat instead of wandering with the sizes it has seen."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None


_LIBC = _load_libc()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device, settings: Settings | None = None) -> torch.dtype:
    # bf16 is FLUX's native precision on GPUs; CPUs run fp32 (bf16 matmuls there are slow and rarely exact), except
    # for the fp8dqrow path, whose per-row float8 quantizes bf16 weights only.
    if device.type == "cuda":
        return torch.bfloat16
    return settings.dtype_on_cpu if settings is not None else torch.float32


class Engine:
    def __init__(
        self,
        pipe,
        safety: SafetyChecker | None,
        schnell_source: str,
        device: torch.device,
        dtype: torch.dtype,
        settings: Settings | None = None,
        stages: logs.Stages | None = None,
        compile_bundle: Path | None | bool = True,
        second_safety: NsfwClassifier | None = None,
    ):
        """The engine on a loaded pipeline: every path built (and compiled, if the settings say so). compile_bundle:
        the compile bundle's local folder (fetched in setup), None for none, True to fetch it here."""
        self.device = device
        self.dtype = dtype
        self.safety = safety
        self.second_safety = second_safety  # re-checks what `safety` flags; None: its flags stand
        self.schnell_source = schnell_source
        self.settings = settings or Settings(fp8=fp8_kind(device))
        self.stages = stages or logs.Stages()
        self._base = pipe
        self._paths: dict[str, speed.FastPath] = {}
        self._lock = threading.Lock()
        pipe.set_progress_bar_config(disable=True)
        settings = self.settings
        self._attention = speed.attention_backend(settings.attention, device)  # refuses what cannot run here
        self._cache_key = None
        if settings.compile:
            compiler.configure(settings.inductor_tuning)
            self._cache_key = compile_cache.key(settings, pipe.transformer, dtype, device)
            with self.stages("compile cache"):
                folder = compile_cache.fetch(settings) if compile_bundle is True else compile_bundle
                compile_cache.load(folder, self._cache_key, weights.shown(settings.compile_cache or str(settings.cache_dir)),
                                   settings.cache_dir)
        self._prepare_transformer(pipe.transformer)
        self.plan = self._plan(pipe)
        self._place_shared(pipe)
        if settings.channels_last:
            speed.vae_channels_last(pipe.vae)
        self._vae_compiled = (compiler.compile_vae_decoder(pipe.vae, settings.compile)
                              if settings.compile and settings.compile_vae else None)
        self.loras = LoraManager()  # LoRA targets: each model's bf16 transformer (by model name), the shared CLIP
        self.loras.register("dev", pipe.transformer, TRANSFORMER)
        self.loras.register(TEXT_ENCODER, pipe.text_encoder, TEXT_ENCODER)
        self.lora_loader = lora_loader.LoraLoader()
        self.memory = Residency.for_plan(device, self.plan, mover=speed.move)
        self._schnell = None  # FLUX.1-schnell's bf16 pipeline, loaded on first use
        # Each fp8 path follows its bf16 model's LoRA state: model name -> its twin.
        self._fp8: dict[str, Fp8Twin] = {}
        if self.placed("dev"):  # on the GPU first: its fp8 copy is then quantized from it without crossing PCIe
            self.memory.add("dev", pipe.transformer, resident=False)
            self.memory.use("dev")
        else:  # in CPU memory, where the plan keeps it (a pipeline given on the GPU is moved there)
            speed.move(pipe.transformer, torch.device("cpu"))
        self._add_fp8_path("dev", pipe)  # before dev's blocks are compiled or wrapped: the fp8 copy copies them
        if self.placed("dev"):
            self._add_path("dev", pipe)

    def _plan(self, pipe) -> memory.Plan | None:
        """The memory plan for this GPU (or the budget FLUX_GPU_MEMORY_GB simulates on a CPU), logged as a table;
        None on a CPU without one (everything stays on the CPU). A plan that does not fit is a setup error."""
        budget = memory.budget(self.device, self.settings.gpu_memory)
        if budget is None:
            log.info("memory: no GPU, no plan: every component stays on the CPU (FLUX_GPU_MEMORY_GB simulates a GPU)")
            return None
        safety = [m.model for m in (self.safety, self.second_safety) if m is not None]
        sizes = memory.Sizes.of(pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, pipe.vae, safety,
                                streams=self.device.type == "cuda")
        plan = memory.plan(budget, sizes, floor=memory.MIN_GPU_BYTES if self.device.type == "cuda" else 0)
        log.info("memory plan for %.1f GB of GPU memory%s:\n%s", memory.gb(budget),
                 " (FLUX_GPU_MEMORY_GB)" if self.settings.gpu_memory else "", plan.table())
        memory.refuse(plan, self.device)
        memory.check_host(plan)
        return plan

    @property
    def _t5_streamed(self) -> bool:
        return self.plan is not None and self.plan.where(memory.T5) == memory.STREAMED

    def placed(self, model: str) -> bool:
        """Whether a model's bf16 transformer runs on this GPU (the plan may keep it in CPU memory only)."""
        return self.plan is None or self.plan.where(model) != memory.CPU

    def _place_shared(self, pipe) -> None:
        """CLIP and the VAE on the GPU; T5 too, or streamed from CPU memory where the plan says so."""
        pipe.text_encoder.to(self.device)
        pipe.vae.to(self.device)
        if self._t5_streamed:
            memory.stream(pipe.text_encoder_2, self.device)
        else:
            pipe.text_encoder_2.to(self.device)

    def _add_fp8_path(self, model: str, pipe, source=None) -> speed.FastPath:
        """A model's fp8 path: its transformer quantized a block at a time onto the GPU (from `source`, else the
        model's bf16 transformer in `pipe`), with room made for it first; it then follows the bf16 model's LoRAs."""
        bf16 = pipe.transformer
        source = bf16 if source is None else source
        on_gpu = model in self.memory.resident and self.memory.modules.get(model) is source
        self.memory.make_room(memory.fp8_bytes(source) + memory.block_bytes(source))
        started = time.monotonic()
        with self.stages("fp8 quantize", f"{model}, {self.settings.fp8}"):
            fp8 = speed.fp8_transformer(source, self.settings.fp8, self.device, self.settings.fp8_forced)
        if not on_gpu and self.memory.budget is not None:  # its bf16 blocks crossed to the GPU to be quantized there
            self.memory.moves.append(memory.Move(f"{model}-fp8", "gpu", memory.module_bytes(source),
                                                 time.monotonic() - started))
        path = self._add_path(f"{model}-fp8", _with_transformer(pipe, fp8), self.settings.fp8, on_gpu=True)
        self._fp8[model] = Fp8Twin(speed.Fp8Sync(bf16, fp8, self.settings.fp8, self.settings.fp8_forced))
        return path

    def _prepare_transformer(self, transformer) -> None:
        """What every bf16 transformer gets before it is copied, smashed or compiled: the attention backend and the
        fused projections."""
        speed.set_attention(transformer, self._attention)
        if self.settings.fused_projections:
            speed.fuse_projections(transformer)

    def _add_path(self, name: str, pipe, fp8: str | None = None, on_gpu: bool = False) -> speed.FastPath:
        """A transformer's path: on the GPU (moved there unless on_gpu), smashed by pruna, compiled."""
        started = time.monotonic()
        settings = self.settings
        if self.memory.modules.get(name) is not pipe.transformer:
            self.memory.add(name, pipe.transformer, resident=on_gpu)
        self.memory.use(name)  # on the GPU before pruna smashes it (least recently used transformers out if needed)
        path = speed.FastPath(name, speed.smash(pipe, self.device), _task_pipelines(pipe))
        if settings.compile:  # beneath FORA's wrappers, which are off between calls
            compiler.configure(settings.inductor_tuning)  # torchao's quantization sets inductor flags of its own
            # torchao's dynamic float8 asks whether the batch is 1 (flux/compiler.py): that path keeps batch 1 apart
            batch = "backed" if fp8 == "fp8dqrow" else "unbacked"
            path.compiled.append(compiler.compile_blocks(pipe.transformer, settings.compile, batch))
            if self._vae_compiled is not None:
                path.compiled.append(self._vae_compiled)
        self._paths[name] = path
        log.info("setup: %s path ready (%s%s) in %.2fs", name, f"fp8 {fp8}, " if fp8 else "",
                 f"compiled with {settings.compile}" if settings.compile else "eager", time.monotonic() - started)
        return path

    def warm_up(self, shapes: list[tuple[int, int, int]] | None = None) -> None:
        """Compile both dev paths for every schema size (or these shapes), and the VAE decoder, now, so that no
        request pays for it; log the graphs each compiled and keep the artifacts."""
        shapes = shapes or speed.warm_sizes()
        for name in (n for n in ("dev", "dev-fp8") if n in self._paths):
            self.memory.use(name)
            path = self._paths[name]
            with compiler.CompileTimes() as times, self.stages(f"warm-up {name}", f"{len(shapes)} sizes"):
                speed.warm_up(path, MAX_SEQUENCE_LENGTH["dev"], shapes)
            log.info("setup: compile %s: %s; graphs now held: %s", name, times.summary(),
                     ", ".join(f"{k} {n}" for k, n in compiler.graph_counts(path.transformer).items()))
        if self._vae_compiled is not None and self._vae_compiled.regions:
            self._warm_up_vae()
        if self._cache_key is not None:
            with self.stages("compile cache save"):
                compile_cache.save(self.settings.cache_dir, self._cache_key)

    def _warm_up_vae(self) -> None:
        vae_shapes = speed.vae_warm_sizes()
        with compiler.CompileTimes() as times, self.stages("warm-up vae", f"{len(vae_shapes)} shapes"):
            try:
                speed.warm_up_vae(self._base.vae, vae_shapes, self.device, self.dtype)
            except Exception as exc:
                if not next(iter(self._paths.values())).fall_back(exc):
                    raise
        log.info("setup: compile VAE decoder: %s; graphs now held: %s", times.summary(),
                 compiler.graph_counts(vae=self._base.vae)[compiler.VAE_DECODER])

    # ----- setup -------------------------------------------------------------------------------

    @classmethod
    def load(cls, srcs: weights.Sources, device: torch.device | None = None, dtype: torch.dtype | None = None) -> "Engine":
        import diffusers
        import transformers
        from diffusers import FluxPipeline

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()

        stages = logs.Stages()
        device = device or default_device()
        settings = Settings.from_env(device, weights.weights_dir())
        log.info("setup: speed settings: %s", settings.describe())
        if settings.fp8_forced:
            log.warning("FLUX_FP8=fp8dqrow on a machine torchao's hardware check refuses (%s): the check is skipped and "
                        "fp8 matmuls run through torch's own _scaled_mm, in bf16", device)
        dtype = dtype or default_dtype(device, settings)
        if srcs.tiny:
            log.warning(
                "=" * 78 + "\nUSING THE TINY RANDOM-WEIGHT FLUX: its images are noise. Set FLUX_WEIGHTS (or run on a "
                "GPU) for FLUX.1-dev.\n" + "=" * 78
            )
        # Each component fetched, then loaded (a broken download is reported before the next one is fetched); the
        # stages add up: "fetch" and "load" are each logged twice and totalled once.
        with stages("fetch", "FLUX.1-dev and the compile bundle"):
            dev_path = weights.locate(srcs.dev, "dev")
            bundle = compile_cache.fetch(settings) if settings.compile else None
        with stages("load", f"FLUX.1-dev, {dtype}"), weights.loading("dev", dev_path):
            pipe = FluxPipeline.from_pretrained(dev_path, dtype=dtype, use_safetensors=True)  # placed by the plan
        def checker(source: str, kind: str, what: str, model):
            with stages("fetch", what):
                path = weights.locate(source, kind)
            with stages("load", what), weights.loading(kind, path):
                return model.load(path, device, dtype)

        safety = checker(srcs.safety, "safety", "safety checker", SafetyChecker)
        second = None
        if srcs.safety_second is not None:
            second = checker(srcs.safety_second, weights.SAFETY_SECOND, "second safety checker", NsfwClassifier)
        else:
            log.info("setup: second safety checker off (FLUX_SAFETY_SECOND=off): CompVis' flags stand alone")
        engine = cls(pipe, safety, srcs.schnell, device, dtype, settings, stages, compile_bundle=bundle,
                     second_safety=second)
        if settings.warmup:
            engine.warm_up()
        stages.total()
        return engine

    def _schnell_transformer(self):
        """schnell's transformer read from its weights (fetched once) into CPU memory, prepared like every bf16
        transformer; and the folder it came from."""
        from diffusers import FluxTransformer2DModel

        path = weights.locate(self.schnell_source, "schnell")
        with weights.loading("schnell", path):
            transformer = FluxTransformer2DModel.from_pretrained(
                path, subfolder="transformer", dtype=self.dtype, use_safetensors=True
            )
        self._prepare_transformer(transformer)
        return transformer, path

    def _load_schnell(self):
        """FLUX.1-schnell's bf16 pipeline (sharing the text encoders and VAE), its transformer in CPU memory until a
        path places it; a LoRA target from now on."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        started = time.monotonic()
        transformer, path = self._schnell_transformer()
        with weights.loading("schnell", path):
            scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
        pipe = _with_transformer(self._base, transformer, scheduler=scheduler)
        self.loras.register("schnell", transformer, TRANSFORMER)
        log.info("schnell: loaded on first use in %.2fs (shares text encoders and VAE)", time.monotonic() - started)
        return pipe

    def _build_schnell(self, name: str) -> None:
        """A schnell path on first use: "schnell" places the bf16 transformer on the GPU; "schnell-fp8" quantizes it
        a block at a time, from the bf16 one while that is untouched (never compiled, no LoRA fused), else from a
        second copy read from the disk."""
        started = time.monotonic()
        if self._schnell is None:
            self._schnell = self._load_schnell()
        if name == "schnell":
            self._add_path("schnell", self._schnell)
        else:
            untouched = "schnell" not in self._paths and not self.loras.touched("schnell")
            self._add_fp8_path("schnell", self._schnell, None if untouched else self._schnell_transformer()[0])
        log.info("%s: built on first use in %.2fs", name, time.monotonic() - started)

    def path(self, name: str) -> speed.FastPath:
        """A transformer's path ("dev", "dev-fp8", "schnell", "schnell-fp8"), the schnell ones built on first use
        (a failure caches nothing)."""
        with self._lock:
            if name not in self._paths:
                if not self.placed(name) or not name.startswith("schnell"):
                    raise ValueError(f"the {name} path does not run on this GPU (memory plan): route the request")
                self._build_schnell(name)
            return self._paths[name]

    def route(self, req: Request) -> Request:
        """The request as this GPU runs it: where the plan keeps a model's bf16 transformer off the GPU, its fp8 copy
        runs, and a note says so."""
        if req.fp8 or self.placed(req.model):
            return req
        note = (f"this GPU ({memory.gb(self.plan.budget):.0f} GB) keeps FLUX.1-{req.model} in fp8 only: it ran as with "
                "go_fast (the memory plan in the setup log; a GPU of 40 GB or more runs bf16)")
        return req.replace(fp8=True, notes=(*req.notes, note))

    def pipeline(self, model: str, task: str):
        """The plain diffusers pipeline of a model's bf16 transformer for a task (all share components)."""
        return self.path(model).models[task].model

    # ----- one prediction ----------------------------------------------------------------------

    def graphs(self) -> dict[str, int]:
        """The compiled graphs dynamo holds, by region kind (empty when not compiling)."""
        if not self.settings.compile:
            return {}
        return compiler.graph_counts(self._base.transformer, self._base.vae if self._vae_compiled else None)

    def working_bytes(self, req: Request) -> int:
        """The GPU memory a request needs beside its transformer: activations and the VAE decode, plus what FORA
        holds in a speed mode that caches."""
        working = activation_bytes(req.width, req.height, req.num_outputs)
        if speed.mode(req.speed_mode).caches:
            transformer = self._paths[req.path].transformer if req.path in self._paths else self._base.transformer
            working += passes_per_step(req) * speed.fora_bytes(  # FORA caches each pass of a step apart
                transformer.config, req.width, req.height, req.num_outputs, MAX_SEQUENCE_LENGTH[req.model],
                torch.finfo(self.dtype).bits // 8)
        return working

    def check_prompt(self, req: Request) -> None:
        limit = MAX_SEQUENCE_LENGTH[req.model]
        for name, text in (("prompt", req.prompt), ("negative_prompt", req.negative_prompt if req.true_cfg else None)):
            if text is None:
                continue
            tokens = len(self._base.tokenizer_2(text, truncation=False).input_ids)
            if tokens > limit:
                raise UserError(
                    f"{name} is {tokens} tokens long; FLUX.1-{req.model} reads at most {limit}. Shorten the {name}."
                )

    def use_loras(self, req: Request) -> list[lora_loader.Fetched]:
        """Fetch the request's LoRAs (cached) and fuse them into the modules it uses; the same again costs nothing.
        Returns what was fetched, for the metrics."""
        loader = self.lora_loader
        tokens = lora_loader.Tokens.of(req.hf_api_token, req.civitai_api_token)
        targets = [req.model, TEXT_ENCODER]
        fetched: dict[str, tuple[lora_loader.Fetched, float]] = {}
        for reference, scale in req.loras:
            got = loader.fetch(reference, tokens)
            _, before = fetched.get(got.key, (got, 0.0))
            fetched[got.key] = (got, before + scale)  # two references to one file: one LoRA, scales added
        in_use = {a.weights.key: a.weights for name in targets for a in self.loras.adapters(name)}
        try:
            adapters = [
                Adapter(in_use.get(key) or loader.load(got), scale)
                for key, (got, scale) in fetched.items() if scale != 0  # scale 0: the model without that LoRA
            ]
            self.loras.use(adapters, targets)  # refuses what does not fit before any weight changes
        except UserError:
            for key, (got, _) in fetched.items():  # no file stays cached for a LoRA the model refused
                if key not in in_use:
                    loader.forget(got)
            raise
        if req.fp8:
            self._sync_fp8(req.model)
        return [got for got, _ in fetched.values()]

    def _drop_loras(self, req: Request) -> None:
        """Back to no LoRA on the modules a request used (after its LoRAs broke its output)."""
        self.loras.use([], [req.model, TEXT_ENCODER])
        if req.model in self._fp8:
            self._sync_fp8(req.model)

    def _sync_fp8(self, model: str) -> None:
        """Bring a model's fp8 path to its bf16 LoRA state: re-quantize the layers that either state touches."""
        twin = self._fp8[model]
        state = self.loras.state(model)
        if state == twin.lora:
            return
        started = time.monotonic()
        touched = self.loras.touched(model)
        twin.lora = None  # until the sync completes
        count = twin.sync.sync(twin.touched | touched)
        twin.touched, twin.lora = touched, state
        log.info("lora: %d fp8 layers of %s-fp8 re-quantized in %.2fs", count, model, time.monotonic() - started)

    def generate(self, req: Request, step_hook=None) -> Result:
        """Run the pipeline for a request: images in output order, before the safety check. step_hook: called after
        each denoising step as diffusers' `callback_on_step_end` (pipe, step, timestep, {"latents": ...}), for tools
        that watch the latents (script/benchmark gpu)."""
        req = self.route(req)
        try:
            return self._generate(req, step_hook)
        except NonFiniteOutput:  # the request's LoRAs broke the output: the next request starts without them
            self._drop_loras(req)
            raise
        except torch.OutOfMemoryError:  # in the pipeline or while fusing a LoRA (which rolls itself back)
            _free_memory()
            raise UserError(
                f"Out of GPU memory generating {req.width}x{req.height}: try a smaller size (megapixels 0.25) or "
                "fewer outputs, or run again."
            ) from None

    def _generate(self, req: Request, step_hook=None) -> Result:
        self.check_prompt(req)
        path = self.path(req.path)
        self.memory.use(req.path, self.working_bytes(req))
        started = time.monotonic()
        fetched = self.use_loras(req)
        timings = {"lora": time.monotonic() - started}
        kwargs = dict(
            width=req.width,
            height=req.height,
            num_inference_steps=req.num_inference_steps,
            guidance_scale=req.guidance_scale,
            output_type="pil",
        )
        if req.image is not None:
            kwargs.update(image=req.image, strength=req.prompt_strength)
        if req.mask is not None:
            kwargs.update(mask_image=req.mask)
        if req.true_cfg:  # otherwise the call is exactly the one without these inputs
            kwargs.update(true_cfg_scale=req.true_cfg_scale)
        result = self._run(path, req, speed.mode(req.speed_mode), kwargs, timings, step_hook)
        if req.mask is not None:  # unmasked pixels come back exactly as they were
            started = time.monotonic()
            processor = self._base.image_processor
            result.images = [processor.apply_overlay(req.mask, req.image, img) for img in result.images]
            timings["decode"] += time.monotonic() - started
        result.loras = fetched
        return result

    def encode_prompt(self, req: Request, outputs: int) -> dict[str, torch.Tensor]:
        """The prompt through CLIP and T5 (diffusers' encode_prompt, shared by every pipeline), repeated per output:
        the embeddings the pipeline is then given, so that text encoding is timed apart."""
        embeds = {}
        for prefix, text in (("", req.prompt), ("negative_", req.negative_prompt if req.true_cfg else None)):
            if text is None:
                continue
            started = time.monotonic()
            prompt_embeds, pooled, _ = self._base.encode_prompt(
                prompt=text, prompt_2=None, device=self.device, num_images_per_prompt=outputs,
                max_sequence_length=MAX_SEQUENCE_LENGTH[req.model])
            embeds.update({f"{prefix}prompt_embeds": prompt_embeds, f"{prefix}pooled_prompt_embeds": pooled})
            if self._t5_streamed:  # every T5 block crossed to the GPU once for this prompt
                self.memory.moves.append(memory.Move(memory.T5, "streamed", self.plan.sizes.bytes[memory.T5],
                                                     time.monotonic() - started))
        return embeds

    def _run(self, path: speed.FastPath, req: Request, mode: speed.Mode, kwargs: dict,
             timings: dict[str, float], step_hook=None) -> Result:
        """All outputs in one batch through the transformer; one at a time if that runs out of memory. One
        progress bar over every call; the time of each stage and the transformer passes added up over them."""
        steps = progress.Steps(calls=1)
        timings.update(text_encode=0.0, denoise=0.0, decode=0.0)
        passes = [0]

        def step_end(pipe, step: int, timestep, callback_kwargs: dict) -> dict:
            steps(pipe, step, timestep, callback_kwargs)
            if step == pipe.num_timesteps - 1:  # the latents the VAE decodes: checked once per call
                self._check_finite(callback_kwargs.get("latents"), req)
            return callback_kwargs if step_hook is None else step_hook(pipe, step, timestep, callback_kwargs)

        def call(batch_seeds: list[int]) -> list[Image.Image]:
            # CPU generators: the same seed gives the same noise on any device.
            generators = [torch.Generator("cpu").manual_seed(s) for s in batch_seeds]
            with torch.inference_mode():
                started = time.monotonic()
                embeds = self.encode_prompt(req, len(batch_seeds))
                denoising = time.monotonic()
                timings["text_encode"] += denoising - started
                output, cached = path.run(req.task, mode, passes_per_step(req), generator=generators,
                                          callback_on_step_end=step_end, **embeds, **kwargs)
            ended = time.monotonic()
            timings["denoise"] += (steps.last_step_at or ended) - denoising
            timings["decode"] += ended - (steps.last_step_at or ended)
            passes[0] += (steps.steps_per_call - cached) * passes_per_step(req)
            return output.images

        seeds = req.seeds
        try:
            images = call(seeds)
        except torch.OutOfMemoryError:
            if len(seeds) == 1:
                raise
            _free_memory()
            log.warning("out of GPU memory for %d outputs in one batch; generating them one at a time", len(seeds))
            steps.expect(len(seeds))
            images = [img for s in seeds for img in call([s])]
        return Result(images=images, seeds=seeds, timings=timings, steps=steps.steps_per_call, passes=passes[0])

    def _check_finite(self, latents: torch.Tensor | None, req: Request) -> None:
        """Latents with a NaN or an infinity decode to black pixels: fail instead, naming the likely cause."""
        if latents is None or bool(torch.isfinite(latents).all()):
            return
        loras = [a for name in (req.model, TEXT_ENCODER) for a in self.loras.adapters(name)]
        if not loras:
            raise RuntimeError(f"the {req.path} transformer produced non-finite latents without a LoRA")
        named = " and ".join(dict.fromkeys(f"{a.weights.shown} at scale {a.scale:g}" for a in loras))
        raise NonFiniteOutput(
            f"The image came out as numbers that are not finite (NaN or infinity) with the LoRA {named}: it pushes "
            "the model beyond what it can compute. Lower lora_scale (or extra_lora_scale), or use another LoRA."
        )

    def check_safety(self, req: Request, result: Result) -> Result:
        """Drop the images both checkers flag (CompVis', then the second opinion on what it flagged); fail if none is
        left."""
        if req.disable_safety_checker or self.safety is None:
            return result
        started = time.monotonic()
        flags = self.safety.flags(result.images)
        first = [i for i, flag in enumerate(flags) if flag]
        if first and self.second_safety is not None:
            confirmed = self.second_safety.flags([result.images[i] for i in first])
            for i, flag in zip(first, confirmed):
                flags[i] = flag
            log.info("safety checker: CompVis flagged %d of %d outputs; the second opinion (NSFW classifier) "
                     "confirmed %d", len(first), len(flags), sum(confirmed))
        kept = [(img, s) for img, s, flag in zip(result.images, result.seeds, flags) if not flag]
        flagged = len(flags) - len(kept)
        result.timings["safety"] = time.monotonic() - started
        if flagged:
            log.warning("safety checker: removed %d of %d outputs as NSFW", flagged, len(flags))
        if not kept:
            raise UserError(
                f"All {len(flags)} generated images were flagged as NSFW by the safety checker. "
                "Try a different prompt or seed."
            )
        result.images, result.seeds, result.flagged = [i for i, _ in kept], [s for _, s in kept], flagged
        return result

    def run(self, req: Request, out_dir: Path) -> Prediction:
        """Generate, check, write files: the whole prediction after validation."""
        started = time.monotonic()
        req = self.route(req)
        self.memory.moves.clear()  # from here on: this prediction's moves between CPU and GPU
        graphs = self.graphs()
        log.info("Using seed: %d", req.seed)
        for note in req.notes:
            log.info("note: %s", note)
        try:
            result = self.check_safety(req, self.generate(req))
            t = time.monotonic()
            paths = image_io.save(result.images, out_dir, req.output_format, req.output_quality)
            result.timings["encode"] = time.monotonic() - t
            result.moves = list(self.memory.moves)
        finally:
            _release_host_memory()
            if self.graphs() != graphs:  # setup's warm-up should have compiled everything a request needs
                log.warning("compile: this prediction compiled new graphs (%s, now %s)", graphs, self.graphs())
        log.info(
            "prediction: path=%s speed_mode=%s task=%s size=%dx%d steps=%d outputs=%d seeds=%s %s total=%.2fs",
            req.path, req.speed_mode, req.task, req.width, req.height, result.steps, len(paths), result.seeds,
            " ".join(f"{k}={v:.2f}s" for k, v in result.timings.items()), time.monotonic() - started,
        )
        if result.moves:
            log.info("memory: this prediction moved %.2f GB between CPU and GPU: %s", memory.gb(result.moved_bytes),
                     ", ".join(f"{m} ({memory.gb(m.bytes):.2f} GB, {m.seconds:.2f}s)" for m in result.moves))
        return Prediction(paths, metrics(req, result, len(paths)))


def passes_per_step(req: Request) -> int:
    """Transformer passes per denoising step: two with true classifier-free guidance (the prompt and the negative
    prompt, one after the other, as diffusers runs them), else one."""
    return 2 if req.true_cfg else 1


def metrics(req: Request, result: Result, image_count: int) -> dict[str, object]:
    """The prediction's facts under the names callers key on (README, "Response"). Never a token: LoRAs appear as
    the logs show them, without query strings."""
    facts: dict[str, object] = {
        "seed": result.seeds[0],
        "seeds": list(result.seeds),
        "image_count": image_count,
        "nsfw_count": result.flagged,
        "width": req.width,
        "height": req.height,
        "num_inference_steps": result.steps,
        "transformer_passes": result.passes,
        "path": req.path,
        "speed_mode": req.speed_mode,
        "true_cfg": req.true_cfg,
        "memory.moves": [str(m) for m in result.moves],
        "memory.moved_gb": round(memory.gb(result.moved_bytes), 3),
    }
    if result.loras:
        facts["lora"] = [got.shown for got in result.loras]
        facts["lora_cached"] = all(got.cached for got in result.loras)
    facts.update({f"timing.{stage}": round(seconds, 4) for stage, seconds in result.timings.items()})
    return facts


def _with_transformer(pipe, transformer, **changes):
    """A FluxPipeline on another transformer, sharing every other component (no copy, no cast)."""
    from diffusers import FluxPipeline

    return FluxPipeline(**{**pipe.components, "transformer": transformer, **changes})


def _task_pipelines(pipe) -> dict[str, object]:
    """txt2img, img2img and inpainting pipelines on the same module objects (from_pipe would .to() them)."""
    from diffusers import FluxImg2ImgPipeline, FluxInpaintPipeline

    pipes = {"txt2img": pipe, "img2img": FluxImg2ImgPipeline(**pipe.components),
             "inpaint": FluxInpaintPipeline(**pipe.components)}
    for p in pipes.values():
        p.set_progress_bar_config(disable=True)
    return pipes
