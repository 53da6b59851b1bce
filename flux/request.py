"""The request: every input of a prediction, validated once, frozen.

`SPEC` holds the defaults, bounds and choices of each input. predict.py must
repeat them as literals (cog's static schema parser reads only literals), and
tests/test_schema.py checks that the two agree, so this table stays the one
place where a default or a bound is decided.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from . import images, sizes, speed
from .errors import UserError

log = logging.getLogger(__name__)

MODELS = ("dev", "schnell")
OUTPUT_FORMATS = ("webp", "jpg", "png")
SCHNELL_MAX_STEPS = 4
MAX_SEED = 2**63 - 1 - 4  # seed + i must stay a valid 64-bit generator seed


@dataclass(frozen=True)
class InputSpec:
    default: Any = None
    ge: float | None = None
    le: float | None = None
    choices: tuple | None = None
    required: bool = False


SPEC: dict[str, InputSpec] = {
    "prompt": InputSpec(required=True),
    "image": InputSpec(),
    "mask": InputSpec(),
    "aspect_ratio": InputSpec(default="1:1", choices=(*sizes.ASPECT_RATIOS, sizes.CUSTOM)),
    "width": InputSpec(ge=sizes.MIN_SIDE, le=sizes.MAX_SIDE),
    "height": InputSpec(ge=sizes.MIN_SIDE, le=sizes.MAX_SIDE),
    "megapixels": InputSpec(default="1", choices=sizes.MEGAPIXELS),
    "prompt_strength": InputSpec(default=0.8, ge=0, le=1),
    "model": InputSpec(default="dev", choices=MODELS),
    "num_outputs": InputSpec(default=1, ge=1, le=4),
    "num_inference_steps": InputSpec(default=28, ge=1, le=50),
    "guidance_scale": InputSpec(default=3, ge=0, le=10),
    "seed": InputSpec(),
    "output_format": InputSpec(default="webp", choices=OUTPUT_FORMATS),
    "output_quality": InputSpec(default=80, ge=0, le=100),
    "disable_safety_checker": InputSpec(default=False),
    "replicate_weights": InputSpec(),
    "lora_scale": InputSpec(default=1, ge=-1, le=3),
    "extra_lora": InputSpec(),
    "extra_lora_scale": InputSpec(default=1, ge=-1, le=3),
    "hf_api_token": InputSpec(),
    "civitai_api_token": InputSpec(),
    "go_fast": InputSpec(default=False),
    "speed_mode": InputSpec(default=speed.OFF, choices=speed.SPEED_MODE_NAMES),
}


def random_seed() -> int:
    return int.from_bytes(os.urandom(4), "big")


@dataclass(frozen=True)
class Request:
    """A validated prediction request. Build it with `Request.build(**inputs)`."""

    prompt: str
    width: int
    height: int
    num_outputs: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    model: str = "dev"
    image: Image.Image | None = field(default=None, repr=False)  # RGB, already at width x height
    mask: Image.Image | None = field(default=None, repr=False)  # L, white = repaint, at width x height
    prompt_strength: float = 0.8
    output_format: str = "webp"
    output_quality: int = 80
    disable_safety_checker: bool = False
    loras: tuple[tuple[str, float], ...] = ()  # (reference, scale): the main LoRA first, at most two
    hf_api_token: str | None = field(default=None, repr=False)  # secrets: never in a repr, a log or a message
    civitai_api_token: str | None = field(default=None, repr=False)
    speed_mode: str = speed.OFF
    fp8: bool = False  # runs the fp8 transformer (go_fast, or a speed mode that uses it)
    notes: tuple[str, ...] = ()  # what validation changed or ignored, for the log

    @property
    def task(self) -> str:
        if self.mask is not None:
            return "inpaint"
        if self.image is not None:
            return "img2img"
        return "txt2img"

    @property
    def path(self) -> str:
        """The transformer that runs this request (engine paths: dev, dev-fp8, schnell)."""
        return "dev-fp8" if self.fp8 else self.model

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.num_outputs)]

    def replace(self, **changes: Any) -> "Request":
        return dataclasses.replace(self, **changes)

    @classmethod
    def build(
        cls,
        prompt: str,
        image: Path | str | None = None,
        mask: Path | str | None = None,
        aspect_ratio: str = SPEC["aspect_ratio"].default,
        width: int | None = None,
        height: int | None = None,
        megapixels: str = SPEC["megapixels"].default,
        prompt_strength: float = SPEC["prompt_strength"].default,
        model: str = SPEC["model"].default,
        num_outputs: int = SPEC["num_outputs"].default,
        num_inference_steps: int = SPEC["num_inference_steps"].default,
        guidance_scale: float = SPEC["guidance_scale"].default,
        seed: int | None = None,
        output_format: str = SPEC["output_format"].default,
        output_quality: int = SPEC["output_quality"].default,
        disable_safety_checker: bool = SPEC["disable_safety_checker"].default,
        replicate_weights: str | None = None,
        lora_scale: float = SPEC["lora_scale"].default,
        extra_lora: str | None = None,
        extra_lora_scale: float = SPEC["extra_lora_scale"].default,
        hf_api_token: str | None = None,
        civitai_api_token: str | None = None,
        go_fast: bool = SPEC["go_fast"].default,
        speed_mode: str = SPEC["speed_mode"].default,
    ) -> "Request":
        """Check every input against SPEC and their combinations; resolve the size and seed.

        Image and mask files are decoded here (a bad file is a UserError before any
        GPU work) and resized to the output size.
        """
        notes: list[str] = []
        values = dict(
            aspect_ratio=aspect_ratio, megapixels=megapixels, prompt_strength=prompt_strength, model=model,
            num_outputs=num_outputs, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            output_format=output_format, output_quality=output_quality, width=width, height=height,
            lora_scale=lora_scale, extra_lora_scale=extra_lora_scale, speed_mode=speed_mode,
        )
        for name, value in values.items():
            _check_spec(name, value)

        if not isinstance(prompt, str) or not prompt.strip():
            raise UserError("prompt is empty: describe the image you want.")
        if mask is not None and image is None:
            raise UserError("mask was given without image: inpainting needs the image the mask applies to.")
        if seed is None:
            seed = random_seed()
        elif not -MAX_SEED <= int(seed) <= MAX_SEED:
            raise UserError(f"seed must be between {-MAX_SEED} and {MAX_SEED}.")

        init_image = init_mask = None
        if image is not None:
            init_image = images.load_image(image, "image")
            out_w, out_h = sizes.size_for_image(*init_image.size)
            if (out_w, out_h) != init_image.size:
                notes.append(f"image {init_image.width}x{init_image.height} resized to {out_w}x{out_h}")
                init_image = init_image.resize((out_w, out_h), Image.Resampling.LANCZOS)
            if mask is not None:
                init_mask = images.load_mask(mask, (out_w, out_h))
            ignored = [n for n, v in (("width", width), ("height", height)) if v is not None]
            if aspect_ratio != SPEC["aspect_ratio"].default:
                ignored.append("aspect_ratio")
            if megapixels != SPEC["megapixels"].default:
                ignored.append("megapixels")
            if ignored:
                notes.append(f"{', '.join(ignored)} ignored: the output follows the input image's size")
        elif aspect_ratio == sizes.CUSTOM:
            if width is None or height is None:
                raise UserError("aspect_ratio is custom: give both width and height (256 to 1440 pixels).")
            out_w, out_h = sizes.custom_size(width, height)
            if (out_w, out_h) != (width, height):
                notes.append(f"custom size {width}x{height} rounded to {out_w}x{out_h} (multiples of 16)")
        else:
            if width is not None or height is not None:
                notes.append(f"width/height ignored: they apply only when aspect_ratio is custom (it is {aspect_ratio})")
            out_w, out_h = sizes.table_size(aspect_ratio, megapixels)

        if model == "schnell":
            if num_inference_steps > SCHNELL_MAX_STEPS:
                notes.append(f"schnell runs at most {SCHNELL_MAX_STEPS} steps: num_inference_steps {num_inference_steps} -> {SCHNELL_MAX_STEPS}")
                num_inference_steps = SCHNELL_MAX_STEPS
            if guidance_scale != 0:
                notes.append("schnell has no guidance: guidance_scale ignored")
                guidance_scale = 0.0

        if image is not None and int(num_inference_steps * prompt_strength) < 1:
            raise UserError(
                f"prompt_strength {prompt_strength} x num_inference_steps {num_inference_steps} leaves no denoising step "
                "for the image: raise prompt_strength or num_inference_steps so that their product is at least 1."
            )

        loras = _loras(replicate_weights, lora_scale, extra_lora, extra_lora_scale, notes)
        fp8 = _fp8(bool(go_fast), speed.mode(speed_mode), model, aspect_ratio if image is None else None, notes)

        return cls(
            prompt=prompt, width=out_w, height=out_h, num_outputs=int(num_outputs),
            num_inference_steps=int(num_inference_steps), guidance_scale=float(guidance_scale), seed=int(seed),
            model=model, image=init_image, mask=init_mask,
            prompt_strength=float(prompt_strength), output_format=output_format, output_quality=int(output_quality),
            disable_safety_checker=bool(disable_safety_checker), loras=loras,
            hf_api_token=hf_api_token or None, civitai_api_token=civitai_api_token or None,
            speed_mode=speed_mode, fp8=fp8, notes=tuple(notes),
        )


def _fp8(go_fast: bool, mode: "speed.Mode", model: str, aspect_ratio: str | None, notes: list[str]) -> bool:
    """Whether the request runs the fp8 transformer: go_fast, or a speed mode that uses it; dev only, and not
    with a custom size (like Replicate's go_fast)."""
    if not (go_fast or mode.fp8):
        return False
    why = "go_fast" if go_fast else f"speed_mode {mode.name}"
    if model != "dev":
        notes.append(f"{why}: the fp8 transformer is FLUX.1-dev's; schnell runs bf16")
        return False
    if aspect_ratio == sizes.CUSTOM:
        notes.append(f"{why} with aspect_ratio custom runs bf16, not fp8")
        return False
    notes.append(f"{why}: runs the fp8 transformer")
    return True


def _loras(main: str | None, main_scale: float, extra: str | None, extra_scale: float,
           notes: list[str]) -> tuple[tuple[str, float], ...]:
    """(reference, scale) pairs: extra_lora alone acts as the main one; the same reference twice is one LoRA."""
    main, extra = (main or "").strip(), (extra or "").strip()
    if not main and extra:
        notes.append("extra_lora given without replicate_weights: it is used as the main LoRA")
        return ((extra, float(extra_scale)),)
    if main and main == extra:
        notes.append("replicate_weights and extra_lora are the same LoRA: loaded once at lora_scale + extra_lora_scale")
        return ((main, float(main_scale) + float(extra_scale)),)
    return tuple((ref, float(scale)) for ref, scale in ((main, main_scale), (extra, extra_scale)) if ref)


def _check_spec(name: str, value: Any) -> None:
    spec = SPEC[name]
    if value is None:
        if spec.required or spec.default is not None:
            raise UserError(f"{name} is required.")
        return
    if spec.choices is not None and value not in spec.choices:
        raise UserError(f"{name} must be one of {', '.join(map(str, spec.choices))}; got {value!r}.")
    if spec.ge is not None and value < spec.ge or spec.le is not None and value > spec.le:
        raise UserError(f"{name} must be between {spec.ge:g} and {spec.le:g}; got {value}.")
