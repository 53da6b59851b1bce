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
from typing import Any

from PIL import Image

from . import images, sizes, speed, variants
from .errors import UserError

log = logging.getLogger(__name__)

OUTPUT_FORMATS = ("webp", "jpg", "png")
MAX_SEED = 2**63 - 1 - 4  # seed + i must stay a valid 64-bit generator seed


@dataclass(frozen=True)
class InputSpec:
    default: Any = None
    ge: float | None = None
    le: float | None = None
    choices: tuple | None = None
    required: bool = False
    shown: bool = True  # False: never in a repr (secrets; decoded images)


# Every input, once: predict.py's signature repeats these as literals (cog reads that file without running it) and
# tests/test_schema.py keeps the two equal. A Request has a field for each, holding the validated value.
SPEC: dict[str, InputSpec] = {
    "prompt": InputSpec(required=True),
    "negative_prompt": InputSpec(),
    "image": InputSpec(shown=False),
    "mask": InputSpec(shown=False),
    "aspect_ratio": InputSpec(default="1:1", choices=(*sizes.ASPECT_RATIOS, sizes.CUSTOM)),
    "width": InputSpec(ge=sizes.MIN_SIDE, le=sizes.MAX_SIDE),
    "height": InputSpec(ge=sizes.MIN_SIDE, le=sizes.MAX_SIDE),
    "megapixels": InputSpec(default="1", choices=sizes.MEGAPIXELS),
    "prompt_strength": InputSpec(default=0.8, ge=0, le=1),
    "model": InputSpec(default=variants.BASE.name, choices=variants.NAMES),
    "num_outputs": InputSpec(default=1, ge=1, le=4),
    "num_inference_steps": InputSpec(default=28, ge=1, le=50),
    "guidance_scale": InputSpec(default=3, ge=0, le=100),  # up to 10 but for fill-dev (variants)
    "true_cfg_scale": InputSpec(default=1, ge=1, le=10),
    "seed": InputSpec(),
    "output_format": InputSpec(default="webp", choices=OUTPUT_FORMATS),
    "output_quality": InputSpec(default=80, ge=0, le=100),
    "disable_safety_checker": InputSpec(default=False),
    "replicate_weights": InputSpec(),
    "lora_scale": InputSpec(default=1, ge=-1, le=3),
    "extra_lora": InputSpec(),
    "extra_lora_scale": InputSpec(default=1, ge=-1, le=3),
    "hf_api_token": InputSpec(shown=False),
    "civitai_api_token": InputSpec(shown=False),
    "go_fast": InputSpec(default=False),
    "speed_mode": InputSpec(default=speed.OFF, choices=speed.SPEED_MODE_NAMES),
}


def random_seed() -> int:
    return int.from_bytes(os.urandom(4), "big")


class _Request:
    """A validated prediction request: a field per input of SPEC (after validation: width and height resolved,
    image and mask decoded at the output size, the variant's step cap and guidance applied, secrets as plain strings
    that no repr shows) and what validation derives. Build it with `Request.build(**inputs)`."""

    @property
    def task(self) -> str:
        if self.mask is not None:
            return "inpaint"
        if self.image is not None:
            return "img2img"
        return "txt2img"

    @property
    def reads(self) -> "variants.Reads":
        """How its pipeline reads it (flux/variants.py)."""
        return variants.PIPELINE_READS[variants.get(self.model).pipelines[self.task]]

    @property
    def pixels(self) -> int:
        """The pixels the transformer reads per output: the output's, plus the image's where its latents ride beside
        the noise (Kontext: an edit's image as the pipeline resizes it, an inpainting's at the output size)."""
        pixels = self.width * self.height
        if self.image is None or not self.reads.image_tokens:
            return pixels
        if self.reads.keep_size:
            return 2 * pixels
        width, height = sizes.kontext_size(*self.image.size, SPEC["megapixels"].default)
        return pixels + width * height

    @property
    def transformer(self) -> str:
        """The transformer copy that runs this request: its variant's bf16 one, or "-fp8", go_fast's copy
        (flux/engine/transformers.py). The response's `path` metric."""
        return variants.get(self.model).fp8 if self.fp8 else self.model

    @property
    def mode(self) -> "speed.Mode":
        """Its speed mode."""
        return speed.mode(self.speed_mode)

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.num_outputs)]

    @property
    def true_cfg(self) -> bool:
        """True classifier-free guidance: a negative prompt and true_cfg_scale over 1 (two transformer passes per
        step); otherwise the request is the same as without them."""
        return bool(self.negative_prompt) and self.true_cfg_scale > 1

    def replace(self, **changes: Any) -> "Request":
        return dataclasses.replace(self, **changes)

    @classmethod
    def build(cls, **inputs: Any) -> "Request":
        """Check every input against SPEC and their combinations; resolve the size and seed. Inputs not given take
        SPEC's default. Image and mask files are decoded here (a bad file is a UserError before any GPU work) and
        resized to the output size."""
        unknown = set(inputs) - set(SPEC)
        if unknown:
            raise TypeError(f"unknown inputs: {', '.join(sorted(unknown))}")
        v = {name: _plain(inputs.get(name, spec.default)) for name, spec in SPEC.items()}
        for name in SPEC:
            _check_spec(name, v[name])
        notes: list[str] = []
        prompt, image, mask = v["prompt"], v["image"], v["mask"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise UserError("prompt is empty: describe the image you want.")
        if mask is not None and image is None:
            raise UserError("mask was given without image: inpainting needs the image the mask applies to.")
        if v["seed"] is None:
            v["seed"] = random_seed()
        elif not -MAX_SEED <= int(v["seed"]) <= MAX_SEED:
            raise UserError(f"seed must be between {-MAX_SEED} and {MAX_SEED}.")

        variant = variants.get(v["model"])
        task = "inpaint" if mask is not None else "img2img" if image is not None else "txt2img"
        if task not in variant.pipelines:
            runs = " or ".join(variants.NEEDS[t] for t in variant.pipelines)
            raise UserError(f"{variant.title} runs with {runs} only (a mask is white where it paints); this request "
                            f"gives {variants.NEEDS[task]}. Give {runs}, or use model {variants.BASE.name}.")
        reads = variants.PIPELINE_READS[variant.pipelines[task]]
        for name, value in variant.defaults.items():  # the schema's default stands for the variant's own
            if v[name] == SPEC[name].default and (name != "prompt_strength" or (image is not None and reads.strength)):
                notes.append(f"{name} {value:g}: {variant.name}'s default (the schema's {SPEC[name].default:g} "
                             f"stands for it)")
                v[name] = value
        if not SPEC["guidance_scale"].ge <= v["guidance_scale"] <= variant.max_guidance:
            raise UserError(f"guidance_scale must be between 0 and {variant.max_guidance:g} for {variant.title}; "
                            f"got {v['guidance_scale']}.")
        v["width"], v["height"] = _size(v, reads, notes)

        if variant.max_steps is not None and v["num_inference_steps"] > variant.max_steps:
            notes.append(f"{variant.name} runs at most {variant.max_steps} steps: num_inference_steps "
                         f"{v['num_inference_steps']} -> {variant.max_steps}")
            v["num_inference_steps"] = variant.max_steps
        if not variant.guidance and v["guidance_scale"] != 0:
            notes.append(f"{variant.name} has no guidance: guidance_scale ignored")
            v["guidance_scale"] = 0.0

        if image is not None and not reads.strength:
            notes.append(f"prompt_strength means nothing to {variant.title} with an image and no mask (the image "
                         "conditions the whole generation): ignored")
        elif image is not None and int(v["num_inference_steps"] * v["prompt_strength"]) < 1:
            raise UserError(
                f"prompt_strength {v['prompt_strength']} x num_inference_steps {v['num_inference_steps']} leaves no "
                "denoising step for the image: raise prompt_strength or num_inference_steps so that their product is "
                "at least 1."
            )
        v["negative_prompt"] = _negative_prompt(v["negative_prompt"], v["true_cfg_scale"], notes)

        v.update(
            num_outputs=int(v["num_outputs"]), num_inference_steps=int(v["num_inference_steps"]),
            guidance_scale=float(v["guidance_scale"]), true_cfg_scale=float(v["true_cfg_scale"]), seed=int(v["seed"]),
            prompt_strength=float(v["prompt_strength"]), output_quality=int(v["output_quality"]),
            disable_safety_checker=bool(v["disable_safety_checker"]), go_fast=bool(v["go_fast"]),
            hf_api_token=v["hf_api_token"] or None, civitai_api_token=v["civitai_api_token"] or None,
        )
        loras = _loras(v["replicate_weights"], v["lora_scale"], v["extra_lora"], v["extra_lora_scale"], notes)
        fp8 = _fp8(v["go_fast"], speed.mode(v["speed_mode"]), v["model"], notes)
        return cls(**v, loras=loras, fp8=fp8, notes=tuple(notes))


Request = dataclasses.make_dataclass(
    "Request",
    [(name, Any, field(default=spec.default, repr=spec.shown)) for name, spec in SPEC.items()] + [
        ("loras", tuple, field(default=())),  # (reference, scale): the main LoRA first, at most two
        ("fp8", bool, field(default=False)),  # runs the fp8 transformer (go_fast, or a speed mode that uses it)
        ("notes", tuple, field(default=())),  # what validation changed or ignored, for the log
    ],
    bases=(_Request,), frozen=True,
)
Request.__module__ = __name__


def _size(v: dict, reads: "variants.Reads", notes: list[str]) -> tuple[int, int]:
    """The output size (and v's image and mask decoded, resized where the output follows the image): the image's
    size within bounds where the pipeline's output follows it; a Kontext edit's own size unless aspect_ratio or a
    custom size says otherwise; else the aspect-ratio table or the custom size."""
    aspect_ratio, megapixels, width, height = v["aspect_ratio"], v["megapixels"], v["width"], v["height"]
    image, mask = v["image"], v["mask"]
    if image is not None:
        v["image"] = images.load_image(image, "image")
    chosen = aspect_ratio != SPEC["aspect_ratio"].default
    if image is not None and reads.size == "kontext" and not chosen:
        out = sizes.kontext_size(*v["image"].size, megapixels)
        notes.append(f"output {out[0]}x{out[1]}: the Kontext resolution nearest the image's aspect ratio (set "
                     "aspect_ratio for another size)")
        if width is not None or height is not None:
            notes.append("width/height ignored: they apply only when aspect_ratio is custom")
        return out
    if image is not None and reads.size == "image":
        out = sizes.size_for_image(*v["image"].size)
        if out != v["image"].size:
            notes.append(f"image {v['image'].width}x{v['image'].height} resized to {out[0]}x{out[1]}")
            v["image"] = v["image"].resize(out, Image.Resampling.LANCZOS)
        if mask is not None:
            v["mask"] = images.load_mask(mask, out)
        ignored = [n for n, value in (("width", width), ("height", height)) if value is not None]
        if chosen:
            ignored.append("aspect_ratio")
        if megapixels != SPEC["megapixels"].default:
            ignored.append("megapixels")
        if ignored:
            notes.append(f"{', '.join(ignored)} ignored: the output follows the input image's size")
        return out
    if aspect_ratio == sizes.CUSTOM:
        if width is None or height is None:
            raise UserError("aspect_ratio is custom: give both width and height (256 to 1440 pixels).")
        out = sizes.custom_size(width, height)
        if out != (width, height):
            notes.append(f"custom size {width}x{height} rounded to {out[0]}x{out[1]} (multiples of 16)")
        return out
    if width is not None or height is not None:
        notes.append(f"width/height ignored: they apply only when aspect_ratio is custom (it is {aspect_ratio})")
    return sizes.table_size(aspect_ratio, megapixels)


def _plain(value: Any) -> Any:
    """cog's Secret as its string (the Request keeps it out of every repr)."""
    return value.get_secret_value() if hasattr(value, "get_secret_value") else value


def _negative_prompt(negative: str | None, true_cfg_scale: float, notes: list[str]) -> str | None:
    negative = negative if isinstance(negative, str) and negative.strip() else None
    if negative and true_cfg_scale <= 1:
        notes.append("negative_prompt is used only with true_cfg_scale above 1 (it is 1): ignored")
    elif not negative and true_cfg_scale > 1:
        notes.append(f"true_cfg_scale {true_cfg_scale:g} needs a negative_prompt to guide away from: ignored")
    return negative


def _fp8(go_fast: bool, mode: "speed.Mode", model: str, notes: list[str]) -> bool:
    """Whether the request runs its model's fp8 transformer: go_fast, or a speed mode that uses it, at every size,
    for every task (the compiled graphs have dynamic shapes) and every variant (those loaded on first use get theirs
    then)."""
    if not (go_fast or mode.fp8):
        return False
    notes.append(f"{'go_fast' if go_fast else f'speed_mode {mode.name}'}: runs the fp8 {model} transformer")
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
