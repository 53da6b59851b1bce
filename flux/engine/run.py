"""One request, read top to bottom in numbered stages (`Runner.run`), like diffusers' `__call__`:

  1. route          the request as this GPU runs it (the fp8 copy where the plan keeps the bf16 one off the GPU)
  2. prompt         within the variant's token limit
  3. place          its transformer on the GPU, with the room the request needs beside it
  4. LoRAs          fetched and fused (the same again costs nothing)
  5. generate       text encoding, denoising and decoding, every output in one batch (one at a time if that runs out
                    of memory), with the progress bar and the caller's step hook
  6. overlay        inpainting's unmasked pixels exactly as they were
  7. safety         the safety checkers

A `Trace` (flux/prediction.py), made for the prediction and passed down, collects what each stage took, the
transformer passes and the moves between CPU and GPU memory; it becomes the `Generated` the output stage writes
(flux/output.py)."""

from __future__ import annotations

import ctypes
import logging
import time
from typing import Callable

import torch
from PIL import Image

from .. import memory, progress, variants
from ..errors import UserError
from ..lora.formats import TEXT_ENCODER
from ..lora.fuse import Adapter, LoraManager
from ..lora.sources import Fetched, LoraLoader
from ..prediction import Generated, Trace
from ..request import Request
from ..safety import NsfwClassifier, SafetyChecker
from ..residency import Move
from . import guidance
from .transformers import Transformers

log = logging.getLogger(__name__)

# diffusers' callback_on_step_end: (pipeline, step index, timestep, the tensors asked for) -> those tensors.
StepHook = Callable[[object, int, object, dict], dict]


class NonFiniteOutput(UserError):
    """The latents of a request came out NaN or infinite (its LoRAs, at their scales, broke the model)."""


def pipeline_inputs(req: Request) -> dict:
    """The diffusers pipeline's inputs for a request, beside the prompt embeddings and the generators."""
    reads = req.reads
    kwargs = dict(width=req.width, height=req.height, num_inference_steps=req.num_inference_steps,
                  guidance_scale=req.guidance_scale, output_type="pil")
    if req.image is not None:
        kwargs.update(image=req.image)
        if reads.strength:
            kwargs.update(strength=req.prompt_strength)
    if req.mask is not None:
        kwargs.update(mask_image=req.mask)
    if reads.max_area:  # Kontext rescales the output to this area: the output's own keeps its size
        kwargs.update(max_area=req.width * req.height)
    if reads.keep_size and req.image is not None:  # the image at the output size, for the exact overlay
        kwargs.update(_auto_resize=False)  # diffusers' name for it (a call argument, not an attribute)
    if req.true_cfg and reads.true_cfg:  # otherwise the call is exactly the one without these inputs
        kwargs.update(true_cfg_scale=req.true_cfg_scale)
    return kwargs


def passes_per_step(req: Request) -> int:
    """Transformer passes per denoising step: two with true classifier-free guidance (the prompt and the negative
    prompt, one after the other, as diffusers runs them), else one."""
    return 2 if req.true_cfg else 1


class Runner:
    """Runs requests on the engine's transformers; shared state (the LoRAs fused, where each transformer lives) is
    made to match each request before it runs."""

    def __init__(self, transformers: Transformers, loras: LoraManager, loader: LoraLoader,
                 safety: SafetyChecker | None, second_safety: NsfwClassifier | None, t5_streamed: bool):
        self.transformers = transformers
        self.base = transformers.base  # the shared components: text encoders, tokenizers, VAE, image processor
        self.device, self.dtype = transformers.device, transformers.dtype
        self.loras = loras
        self.loader = loader
        self.safety = safety
        self.second_safety = second_safety  # re-checks what `safety` flags; None: its flags stand
        self.t5_streamed = t5_streamed

    def run(self, req: Request, step_hook: StepHook | None = None, checked: bool = True) -> Generated:
        """The whole prediction after validation but the files, in stages. step_hook: called at every denoising step
        of every call, after the progress bar, with the latents (the benchmark's); checked False: the images
        as generated (the benchmark's and the tests' `generate`)."""
        trace = Trace()
        # 1. Route: the request as this GPU runs it (the fp8 copy where the plan keeps the bf16 one off the GPU).
        req = self.transformers.route(req)
        log.info("Using seed: %d", req.seed)
        for note in req.notes:
            log.info("note: %s", note)
        graphs = self.transformers.graphs()
        try:
            with self.transformers.residency.recording(trace.moves):
                generated = self._generate(req, trace, step_hook)
                # 7. The safety checkers.
                if checked:
                    generated = self.check_safety(generated)
        finally:
            _release_host_memory()
            if self.transformers.graphs() != graphs:  # setup's warm-up should have compiled everything a request needs
                log.warning("compile: this prediction compiled new graphs (%s, now %s)", graphs,
                            self.transformers.graphs())
        if generated.moves:
            log.info("memory: this prediction moved %.2f GB between CPU and GPU: %s", memory.gb(generated.moved_bytes),
                     ", ".join(f"{m} ({memory.gb(m.bytes):.2f} GB, {m.seconds:.2f}s)" for m in generated.moves))
        return generated

    def _generate(self, req: Request, trace: Trace, step_hook: StepHook | None) -> Generated:
        """Stages 2 to 6: the images in output order, before the safety check. A request whose LoRAs broke its output
        leaves none fused; one that ran out of GPU memory leaves it free."""
        try:
            # 2. The prompt within the variant's token limit.
            self.check_prompt(req)
            # 3. Its transformer on the GPU, with the room it needs beside it.
            copy = self.transformers.get(req.transformer)
            self.transformers.use(req.transformer, self.working_bytes(req))
            # 4. Its LoRAs fused (the same again costs nothing).
            with trace.timed("lora"):
                fetched = self.use_loras(req)
            # 5. Text encoding, denoising and decoding: every output in one batch, or one at a time.
            generated = self._calls(copy, req, trace, step_hook)
            # 6. Inpainting: the unmasked pixels exactly as they were.
            if req.mask is not None:
                with trace.timed("decode"):
                    processor = self.base.image_processor
                    generated.images = [processor.apply_overlay(req.mask, req.image, img) for img in generated.images]
        except NonFiniteOutput:  # the request's LoRAs broke the output: the next request starts without them
            self._drop_loras(req)
            raise
        except torch.OutOfMemoryError:  # in the pipeline or while fusing a LoRA (which rolls itself back)
            memory.free()  # the next prediction starts clean
            raise UserError(
                f"Out of GPU memory generating {req.width}x{req.height}: try a smaller size (megapixels 0.25) or "
                "fewer outputs, or run again."
            ) from None
        generated.loras = fetched
        generated.lora_unapplied = sum(a.weights.unapplied for a in self.loras.adapters(req.model))
        return generated

    def _calls(self, copy, req: Request, trace: Trace, step_hook: StepHook | None) -> Generated:
        """All outputs in one batch through the transformer; one at a time if that runs out of memory. One
        progress bar over every call; the time of each stage and the transformer passes added up in the trace."""
        steps = progress.Steps(calls=1)
        trace.timings.update(text_encode=0.0, denoise=0.0, decode=0.0)
        kwargs = pipeline_inputs(req)

        def hook(pipe, step, timestep, tensors):
            tensors = steps(pipe, step, timestep, tensors)
            if step == pipe.num_timesteps - 1:  # the latents the VAE decodes: checked once per call
                self._check_finite(tensors.get("latents"), req)
            return step_hook(pipe, step, timestep, tensors) if step_hook is not None else tensors

        def call(batch_seeds: list[int]) -> list[Image.Image]:
            # CPU generators: the same seed gives the same noise on any device.
            generators = [torch.Generator("cpu").manual_seed(s) for s in batch_seeds]
            with torch.inference_mode():
                with trace.timed("text_encode"):
                    embeds = self.encode_prompt(req, len(batch_seeds), trace)
                around = None
                if req.true_cfg and not req.reads.true_cfg:  # a pipeline without true CFG of its own gets ours
                    around = guidance.true_cfg(req.true_cfg_scale, guidance.negative_embeds(embeds))
                denoising = time.monotonic()
                output, cached = copy.run(req.task, req.mode, passes_per_step(req), around, generator=generators,
                                          callback_on_step_end=hook, callback_on_step_end_tensor_inputs=["latents"],
                                          **embeds, **kwargs)
            ended = time.monotonic()
            trace.add("denoise", (steps.last_step_at or ended) - denoising)
            trace.add("decode", ended - (steps.last_step_at or ended))
            trace.passes += (steps.steps_per_call - cached) * passes_per_step(req)
            return output.images

        seeds = req.seeds
        try:
            images = call(seeds)
        except torch.OutOfMemoryError:
            if len(seeds) == 1:
                raise
            memory.free()  # room for one at a time
            log.warning("out of GPU memory for %d outputs in one batch; generating them one at a time", len(seeds))
            steps.expect(len(seeds))
            images = [img for s in seeds for img in call([s])]
        return Generated(req=req, images=images, seeds=seeds, trace=trace, steps=steps.steps_per_call)

    # ----- the parts of a request ----------------------------------------------------------------------------------

    def working_bytes(self, req: Request) -> int:
        """The GPU memory a request needs beside its transformer: activations and the VAE decode, plus what its
        speed mode's step cache holds."""
        height = -(-req.pixels // req.width)  # the image's tokens beside the output's (Kontext), as more rows
        working = memory.activation_bytes(req.width, height, req.num_outputs)
        if req.mode.caches:
            copy = self.transformers.copies.get(req.transformer)
            config = (copy.transformer if copy is not None else self.base.transformer).config
            working += passes_per_step(req) * req.mode.step_cache.holds_bytes(  # each pass of a step cached apart
                config, req.width, height, req.num_outputs, variants.get(req.model).max_sequence_length,
                torch.finfo(self.dtype).bits // 8)
        return working

    def check_prompt(self, req: Request) -> None:
        variant = variants.get(req.model)
        limit = variant.max_sequence_length
        for name, text in (("prompt", req.prompt), ("negative_prompt", req.negative_prompt if req.true_cfg else None)):
            if text is None:
                continue
            tokens = len(self.base.tokenizer_2(text, truncation=False).input_ids)
            if tokens > limit:
                raise UserError(
                    f"{name} is {tokens} tokens long; {variant.title} reads at most {limit}. Shorten the {name}."
                )

    def prepare_loras(self, req: Request) -> list[Fetched]:
        """Stages 1 and 4 alone: the LoRA state made to match a request as this GPU runs it, without running it (the
        benchmark's LoRA switch). Routing happens here and in `run`, nowhere else."""
        return self.use_loras(self.transformers.route(req))

    def use_loras(self, req: Request) -> list[Fetched]:
        """Stage 4 of a routed request: fetch its LoRAs (cached) and fuse them into the modules it uses; the same
        again costs nothing. Returns what was fetched, for the metrics."""
        tokens = self.loader.tokens(req.hf_api_token, req.civitai_api_token)
        targets = [req.model, TEXT_ENCODER]
        fetched: dict[str, tuple[Fetched, float]] = {}
        for reference, scale in req.loras:
            got = self.loader.fetch(reference, tokens)
            _, before = fetched.get(got.key, (got, 0.0))
            fetched[got.key] = (got, before + scale)  # two references to one file: one LoRA, scales added
        in_use = {a.weights.key: a.weights for name in targets for a in self.loras.adapters(name)}
        try:
            adapters = [
                Adapter(in_use.get(key) or self.loader.load(got), scale)
                for key, (got, scale) in fetched.items() if scale != 0  # scale 0: the model without that LoRA
            ]
            self.loras.use(adapters, targets)  # refuses what does not fit before any weight changes
        except UserError:
            for key, (got, _) in fetched.items():  # no file stays cached for a LoRA the model refused
                if key not in in_use:
                    self.loader.forget(got)
            raise
        if req.fp8:
            self.transformers.sync_fp8(req.model)
        return [got for got, _ in fetched.values()]

    def _drop_loras(self, req: Request) -> None:
        """Back to no LoRA on the modules a request used (after its LoRAs broke its output)."""
        self.loras.use([], [req.model, TEXT_ENCODER])
        if req.model in self.transformers.twins:
            self.transformers.sync_fp8(req.model)

    def _check_finite(self, latents: torch.Tensor | None, req: Request) -> None:
        """Latents with a NaN or an infinity decode to black pixels: fail instead, naming the likely cause."""
        if latents is None or bool(torch.isfinite(latents).all()):
            return
        loras = [a for name in (req.model, TEXT_ENCODER) for a in self.loras.adapters(name)]
        if not loras:
            raise RuntimeError(f"the {req.transformer} transformer produced non-finite latents without a LoRA")
        named = " and ".join(dict.fromkeys(f"{a.weights.shown} at scale {a.scale:g}" for a in loras))
        raise NonFiniteOutput(
            f"The image came out as numbers that are not finite (NaN or infinity) with the LoRA {named}: it pushes "
            "the model beyond what it can compute. Lower lora_scale (or extra_lora_scale), or use another LoRA."
        )

    def encode_prompt(self, req: Request, outputs: int, trace: Trace) -> dict[str, torch.Tensor]:
        """The prompt through CLIP and T5 (diffusers' encode_prompt, shared by every pipeline), repeated per output:
        the embeddings the pipeline is then given, so that text encoding is timed apart."""
        embeds = {}
        for prefix, text in (("", req.prompt), ("negative_", req.negative_prompt if req.true_cfg else None)):
            if text is None:
                continue
            started = time.monotonic()
            prompt_embeds, pooled, _ = self.base.encode_prompt(
                prompt=text, prompt_2=None, device=self.device, num_images_per_prompt=outputs,
                max_sequence_length=variants.get(req.model).max_sequence_length)
            embeds.update({f"{prefix}prompt_embeds": prompt_embeds, f"{prefix}pooled_prompt_embeds": pooled})
            if self.t5_streamed:  # every T5 block crossed to the GPU once for this prompt
                trace.moves.append(Move(
                    memory.T5, "streamed", self.transformers.plan.sizes.bytes[memory.T5], time.monotonic() - started))
        return embeds

    def check_safety(self, generated: Generated) -> Generated:
        """Drop the images both checkers flag (CompVis', then the second opinion on what it flagged); fail if none is
        left."""
        if generated.req.disable_safety_checker or self.safety is None:
            return generated
        started = time.monotonic()
        flags = self.safety.flags(generated.images)
        first = [i for i, flag in enumerate(flags) if flag]
        if first and self.second_safety is not None:
            confirmed = self.second_safety.flags([generated.images[i] for i in first])
            for i, flag in zip(first, confirmed):
                flags[i] = flag
            log.info("safety checker: CompVis flagged %d of %d outputs; the second opinion (NSFW classifier) "
                     "confirmed %d", len(first), len(flags), sum(confirmed))
        kept = [(img, s) for img, s, flag in zip(generated.images, generated.seeds, flags) if not flag]
        flagged = len(flags) - len(kept)
        generated.timings["safety"] = time.monotonic() - started
        if flagged:
            log.warning("safety checker: removed %d of %d outputs as NSFW", flagged, len(flags))
        if not kept:
            raise UserError(
                f"All {len(flags)} generated images were flagged as NSFW by the safety checker. "
                "Try a different prompt or seed."
            )
        generated.images, generated.seeds, generated.flagged = [i for i, _ in kept], [s for _, s in kept], flagged
        return generated


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
