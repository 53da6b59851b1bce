"""Setup: everything the flow of a prediction needs, made once.

Weights located or downloaded (flux/weights.py), the base variant's pipeline and both safety checkers loaded, the
compile bundle loaded, the memory plan made (flux/memory.py), the shared components placed and the switches that
apply to them applied (flux/speed), the base variant's transformers built (flux/engine/transformers.py), then every
schema size compiled (the warm-up), so that a prediction does no setup work except what its request really needs
(a new LoRA, a variant loaded on first use). Within setup's time budget (flux/budget.py: FLUX_SETUP_BUDGET_S): once
it runs short, the warm-up beyond the default size, the base variant's fp8 copy and the prefetch are left to the
requests that need them, and the log says so.
"""

from __future__ import annotations

import logging
import time

import torch

from .. import compile_cache, compiler, logs, memory, progress, sizes, speed, variants, weights
from ..budget import SetupBudget
from ..lora.formats import TEXT_ENCODER
from ..lora.fuse import LoraManager
from ..lora.sources import LoraLoader
from ..request import SPEC
from ..safety import NsfwClassifier, SafetyChecker
from ..settings import LoraSettings, Settings
from ..prediction import Generated
from ..residency import Residency
from .run import Runner, StepHook
from .transformers import Copy, Transformers, prepare

log = logging.getLogger(__name__)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def serving_dtype(device: torch.device, settings: Settings | None = None) -> torch.dtype:
    """The dtype FLUX is served in: bf16, its native precision, on GPUs; CPUs run fp32 (bf16 matmuls there are slow
    and rarely exact), except for the fp8dqrow path, whose per-row float8 quantizes bf16 weights only."""
    if device.type == "cuda":
        return torch.bfloat16
    return settings.dtype_on_cpu if settings is not None else torch.float32


class Engine:
    """A loaded FLUX: the shared components, every variant's transformers (`transformers`) and the runner of requests
    (`runner`). `load` builds it in setup; tests and benchmarks build it on a pipeline they loaded."""

    def __init__(self, pipe, safety: SafetyChecker | None, sources: dict[str, str], device: torch.device,
                 dtype: torch.dtype, settings: Settings | None = None, stages: logs.Stages | None = None,
                 compile_bundle=True, second_safety: NsfwClassifier | None = None,
                 lora_settings: LoraSettings | None = None, budget: SetupBudget | None = None):
        """pipe: the base variant's pipeline; sources: every variant's weights (the others load from them on first
        use). compile_bundle: the compile bundle's local folder (fetched in setup), None for none, True to fetch it
        here. lora_settings: the LoRA loader's (read from the environment when not given). budget: setup's time
        budget (`load` gives the server's; None: unbounded, for an engine a tool or a test builds)."""
        self.device, self.dtype = device, dtype
        self.settings = settings = settings or Settings.for_device(device)
        self.budget = budget or SetupBudget()
        self.stages = stages or logs.Stages()
        self.base = pipe
        pipe.set_progress_bar_config(disable=True)
        speed.check(settings, device)  # refuses what cannot run here, before any work
        self._cache_key = None
        if settings.cache_dir is not None:  # compiling: the compile bundle's graphs, made for this key
            self._cache_key = compile_cache.key(settings, pipe.transformer, dtype, device)
            with self.stages("compile cache"):
                folder = compile_cache.fetch(settings) if compile_bundle is True else compile_bundle
                compile_cache.load(folder, self._cache_key,
                                   weights.shown(settings.compile_cache or str(settings.cache_dir)), settings.cache_dir)
        prepare(pipe.transformer, settings)
        self.plan = self._plan(pipe, safety, second_safety)
        t5_streamed = self.plan is not None and self.plan.where(memory.T5) == memory.STREAMED
        self._place_shared(pipe, t5_streamed)
        vae_compiled = next(iter(speed.optimize("vae", pipe.vae, settings)), None)
        self.loras = LoraManager()  # LoRA targets: each variant's bf16 transformer (by name), the shared CLIP
        self.loras.register(TEXT_ENCODER, pipe.text_encoder, TEXT_ENCODER)
        self.transformers = Transformers(pipe, settings, device, dtype, self.plan, self.loras, sources, self.stages,
                                         vae_compiled, self.budget)
        self.runner = Runner(self.transformers, self.loras, LoraLoader(lora_settings), safety, second_safety,
                             t5_streamed)

    # ----- what the rest of the program uses -------------------------------------------------------------------------

    def run(self, req) -> Generated:
        """A validated request, generated and checked: what the output stage writes (flux/output.py)."""
        return self.runner.run(req)

    def generate(self, req, step_hook: StepHook | None = None) -> Generated:
        """A request run as `run` runs it but without the safety check, with a step hook (the benchmark's)."""
        return self.runner.run(req, step_hook, checked=False)

    def use_loras(self, req):
        """Make the LoRA state match a request without running it (the benchmark's LoRA switch)."""
        return self.runner.prepare_loras(req)

    def copy(self, name: str) -> Copy:
        """A transformer copy by name ("dev", "dev-fp8", ...), built if its variant loads on first use."""
        return self.transformers.get(name)

    def pipeline(self, variant: str, task: str):
        """The plain diffusers pipeline of a variant's bf16 transformer for a task (all share components)."""
        return self.copy(variant).pipeline(task)

    def graphs(self) -> dict[str, int]:
        return self.transformers.graphs()

    @property
    def residency(self) -> Residency:
        return self.transformers.residency

    @property
    def safety(self) -> SafetyChecker | None:
        return self.runner.safety

    @property
    def second_safety(self) -> NsfwClassifier | None:
        return self.runner.second_safety

    def start_prefetch(self) -> weights.Prefetch:
        """Fetch the weights of the variants loaded on first use in the background (those that must be downloaded),
        each after a disk check for its bf16 transformer's size; their first request waits for what is missing."""
        def need(name: str) -> int:  # its bf16 transformer on disk
            return 2 * sum(p.numel() for p in memory.like(self.base.transformer, variants.get(name)).parameters())

        self.transformers.prefetch = weights.Prefetch(self.transformers.sources,
                                                      [v.name for v in variants.ON_FIRST_USE], need).start()
        return self.transformers.prefetch

    # ----- building --------------------------------------------------------------------------------------------------

    def _plan(self, pipe, safety, second_safety) -> memory.Plan | None:
        """The memory plan for this GPU (or the budget FLUX_GPU_MEMORY_GB simulates on a CPU), logged as a table;
        None on a CPU without one (everything stays on the CPU). A plan that does not fit is a setup error."""
        budget = memory.budget(self.device, self.settings.gpu_memory)
        if budget is None:
            log.info("memory: no GPU, no plan: every component stays on the CPU (FLUX_GPU_MEMORY_GB simulates a GPU)")
            return None
        checkers = [m.model for m in (safety, second_safety) if m is not None]
        plan_sizes = memory.Sizes.of(pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, pipe.vae, checkers,
                                     streams=self.device.type == "cuda")
        plan = memory.plan(budget, plan_sizes, floor=memory.MIN_GPU_BYTES if self.device.type == "cuda" else 0)
        log.info("memory plan for %.1f GB of GPU memory%s:\n%s", memory.gb(budget),
                 " (FLUX_GPU_MEMORY_GB)" if self.settings.gpu_memory else "", plan.table())
        memory.refuse(plan, self.device)
        if self.settings.host_memory is not None:
            memory.check_host(plan, self.settings.host_memory)
        return plan

    def _place_shared(self, pipe, t5_streamed: bool) -> None:
        """CLIP and the VAE on the GPU; T5 too, or streamed from CPU memory where the plan says so."""
        pipe.text_encoder.to(self.device)
        pipe.vae.to(self.device)
        if t5_streamed:
            memory.stream(pipe.text_encoder_2, self.device)
        else:
            pipe.text_encoder_2.to(self.device)

    # ----- the warm-up -----------------------------------------------------------------------------------------------

    def warm_up(self, shapes: list[tuple[int, int, int]] | None = None) -> None:
        """Compile the base variant's copies for every schema size (or these shapes), and the VAE decoder, now, so
        that no request pays for it; log the graphs each compiled and keep the artifacts. The sizes after the first
        (the default size) wait for their first request when setup's budget runs short."""
        shapes = shapes or warm_sizes()
        base = variants.BASE
        for name in (n for n in (base.name, base.fp8) if n in self.transformers.copies):
            self.transformers.use(name)
            copy = self.transformers.copies[name]
            with compiler.CompileTimes() as times, self.stages(f"warm-up {name}", f"{len(shapes)} sizes"):
                warm(copy, base.max_sequence_length, shapes, self.budget)
            log.info("setup: compile %s: %s; graphs now held: %s", name, times.summary(),
                     ", ".join(f"{k} {n}" for k, n in compiler.graph_counts(copy.transformer).items()))
        if self.transformers.vae_compiled is not None and self.transformers.vae_compiled.regions:
            self._warm_up_vae()
        if self._cache_key is not None:
            with self.stages("compile cache save"):
                compile_cache.save(self.settings.cache_dir, self._cache_key)

    def _warm_up_vae(self) -> None:
        vae_shapes = vae_warm_sizes()
        with compiler.CompileTimes() as times, self.stages("warm-up vae", f"{len(vae_shapes)} shapes"):
            try:
                warm_vae(self.base.vae, vae_shapes, self.device, self.dtype)
            except Exception as exc:
                if not next(iter(self.transformers.copies.values())).fall_back(exc):
                    raise
        log.info("setup: compile VAE decoder: %s; graphs now held: %s", times.summary(),
                 compiler.graph_counts(vae=self.base.vae)[compiler.VAE_DECODER])


def load(srcs: weights.Sources, device: torch.device | None = None, dtype: torch.dtype | None = None) -> Engine:
    """The engine as setup() builds it: every component fetched and loaded, the transformers built and warmed."""
    import diffusers
    import transformers
    from diffusers import FluxPipeline

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()

    stages = logs.Stages()
    device = device or default_device()
    settings = Settings.from_env(device, weights.weights_dir())
    lora_settings = LoraSettings.from_env()
    log.info("setup: speed settings: %s; LoRA settings: %s", settings.describe(), lora_settings)
    if settings.fp8_forced:
        log.warning("FLUX_FP8=fp8dqrow on a machine torchao's hardware check refuses (%s): the check is skipped and "
                    "fp8 matmuls run through torch's own _scaled_mm, in bf16", device)
    dtype = dtype or serving_dtype(device, settings)
    base = variants.BASE
    if srcs.tiny:
        log.warning("=" * 78 + f"\nUSING THE TINY RANDOM-WEIGHT FLUX: its images are noise. Set {base.setting} (or run "
                    f"on a GPU) for {base.title}.\n" + "=" * 78)
    # Each component fetched, then loaded (a broken download is reported before the next one is fetched); the
    # stages add up: "fetch" and "load" are each logged twice and totalled once.
    with stages("fetch", f"{base.title} and the compile bundle"):
        base_folder = weights.locate(srcs.base, base.name)
        bundle = compile_cache.fetch(settings) if settings.cache_dir is not None else None
    with stages("load", f"{base.title}, {dtype}"), weights.loading(base.name, base_folder):
        pipe = FluxPipeline.from_pretrained(base_folder, dtype=dtype, use_safetensors=True)  # placed by the plan

    def checker(source: str, kind: str, what: str, model):
        with stages("fetch", what):
            folder = weights.locate(source, kind, srcs.endpoints.get(kind))
        with stages("load", what), weights.loading(kind, folder):
            return model.load(folder, device, dtype)

    safety = checker(srcs.safety, weights.SAFETY, "safety checker", SafetyChecker)
    second = None
    if srcs.safety_second is not None:
        second = checker(srcs.safety_second, weights.SAFETY_SECOND, "second safety checker", NsfwClassifier)
    else:
        log.info("setup: second safety checker off (FLUX_SAFETY_SECOND=off): CompVis' flags stand alone")
    engine = Engine(pipe, safety, srcs.variants, device, dtype, settings, stages, compile_bundle=bundle,
                    second_safety=second, lora_settings=lora_settings, budget=SetupBudget(settings.setup_budget_s))
    speed.optimize("setup", engine, settings)  # the warm-up
    stages.total()
    if settings.prefetch and engine.budget.allows("the background prefetch",
                                                  instead="each variant's first request fetches its weights"):
        engine.start_prefetch()
    engine.budget.report()
    return engine


# ----- warm-up shapes ------------------------------------------------------------------------------------------------


def warm_sizes() -> list[tuple[int, int, int]]:
    """(width, height, batch) for every table size at both megapixels, batch 1, and a batch of 2 (the fp8dqrow
    copy compiles batch 1 apart from larger batches; one larger batch covers 2 to 4)."""
    shapes = [(*sizes.table_size(ratio, mp), 1) for mp in sizes.MEGAPIXELS for ratio in sizes.ASPECT_RATIOS]
    smallest = min(shapes, key=lambda s: s[0] * s[1])
    default = (*sizes.table_size(SPEC["aspect_ratio"].default, SPEC["megapixels"].default), 1)
    return [default, *(s for s in shapes if s != default), (smallest[0], smallest[1], 2)]  # the default first


def vae_warm_sizes() -> list[tuple[int, int, int]]:
    """(width, height, batch) that compile the VAE decoder for every request: dynamo keeps batch 1 apart, and a
    non-square size keeps height and width apart (a square one would make them one symbol, "duck sizing")."""
    width, height = sizes.table_size("21:9", "0.25")
    return [(width, height, 1), (width, height, 2)]


def warm(copy: Copy, max_sequence_length: int, shapes: list[tuple[int, int, int]],
         budget: SetupBudget | None = None) -> None:
    """One denoising step at every size through a compiled copy (latents only: the VAE decoder is warmed apart);
    the sizes after the first stop where the budget has no room for twice the last size's time."""
    off = speed.mode(speed.OFF)
    meter = progress.Meter(f"setup: warm-up {copy.name}", len(shapes), unit="sizes", every_percent=25)
    took = 0.0
    for i, (width, height, batch) in enumerate(shapes):
        if i and budget is not None and not budget.allows(
                f"the warm-up of {copy.name} at {len(shapes) - i} more sizes", 2 * took,
                instead="the first request at each size compiles it"):
            return
        started = time.monotonic()
        with torch.inference_mode():
            copy.run("txt2img", off, prompt="warm-up", width=width, height=height, num_inference_steps=1,
                     num_images_per_prompt=batch, max_sequence_length=max_sequence_length, output_type="latent",
                     generator=torch.Generator("cpu").manual_seed(0))
        took = time.monotonic() - started
        meter.advance(1, f"{width}x{height} x{batch}")


def warm_vae(vae, shapes: list[tuple[int, int, int]], device: torch.device, dtype: torch.dtype) -> None:
    """A decode at each (width, height, batch): what a compiled VAE decoder needs before the first request."""
    channels = vae.config.latent_channels
    for width, height, batch in shapes:
        with torch.inference_mode():  # as in a request: inference tensors (dynamo guards on the dispatch keys)
            latents = torch.randn(batch, channels, height // 8, width // 8, generator=torch.Generator().manual_seed(0))
            vae.decode(latents.to(device, dtype), return_dict=False)
