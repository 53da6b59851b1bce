"""The FLUX variants this container serves: one row each, and the only place that names one.

Everything that differs between FLUX variants is a column here, read by the rest of the code:
  request validation   the `model` input's choices, the step cap, whether guidance_scale means anything
  weights              the setting that names a variant's weights, its default (a public .tar on Replicate's weights
                       delivery: no token), its Hugging Face repo, the files fetched and what a folder must hold
  the engine           which variant setup loads (the base: its pipeline carries the text encoders, tokenizers and
                       VAE every variant shares) and which load on first use; the diffusers pipeline class of each
                       task; the T5 window
  the memory plan      each variant's bf16 and fp8 transformers, placed in table order
  the fakes            each variant's tiny twin (flux/fakes/tiny.py): the same architecture, its own seed, its
                       guidance embedder and scheduler from the row

Adding a FLUX variant whose tasks run on diffusers' Flux pipelines is one row here plus its tiny twin's seed; a
variant with a new task also names that task's pipeline class. README, "Adding a FLUX variant".

No third-party imports here: everything imports this table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TASKS = ("txt2img", "img2img", "inpaint")  # a request's task: from whether it gives image, and mask
NEEDS = {"txt2img": "a prompt alone", "img2img": "an image", "inpaint": "an image and a mask"}
# diffusers' Flux pipelines, by task: every variant built on FluxTransformer2DModel runs in them.
FLUX_PIPELINES = {"txt2img": "FluxPipeline", "img2img": "FluxImg2ImgPipeline", "inpaint": "FluxInpaintPipeline"}


@dataclass(frozen=True)
class Reads:
    """How a diffusers pipeline class reads a request: what the engine passes it and what validation makes of the
    image. size: "image": the output has the input image's size (resized within bounds first), so that inpainting
    can put the unmasked pixels back exactly; "kontext": the image only conditions the generation (the pipeline
    resizes it to a Kontext training resolution itself) and the output size is chosen apart (flux/sizes.py)."""

    strength: bool = False  # reads prompt_strength (how much of the image is re-generated)
    true_cfg: bool = True  # has true classifier-free guidance of its own; False: the engine's (flux/engine/guidance.py)
    size: str = "image"
    max_area: bool = False  # rescales the output to `max_area` pixels (Kontext's): given the output's own area
    keep_size: bool = False  # the image keeps the size validation gave it (`_auto_resize=False`; else Kontext's own)
    image_tokens: bool = False  # the image's latents ride beside the noise as tokens (Kontext): twice the sequence


# What each pipeline class a variant names reads (diffusers 0.42's signatures).
PIPELINE_READS = {
    "FluxPipeline": Reads(),
    "FluxImg2ImgPipeline": Reads(strength=True),
    "FluxInpaintPipeline": Reads(strength=True),
    "FluxKontextPipeline": Reads(size="kontext", max_area=True, image_tokens=True),
    "FluxKontextInpaintPipeline": Reads(strength=True, max_area=True, keep_size=True, image_tokens=True),
    "FluxFillPipeline": Reads(strength=True, true_cfg=False),
}

# black-forest-labs/FLUX.1-dev scheduler/scheduler_config.json (FlowMatchEulerDiscreteScheduler). Real weights bring
# their own scheduler folder; this column is what the fakes (tiny twins, the full-size random model) are built with.
DEV_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                     base_image_seq_len=256, max_image_seq_len=4096)
# black-forest-labs/FLUX.1-schnell scheduler/scheduler_config.json.
SCHNELL_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)

# What is fetched of a repo: only what diffusers loads (FLUX repos also hold single-file checkpoints never read).
# The base variant brings every shared component; the others only their transformer and scheduler.
BASE_FILES = ("model_index.json", "scheduler/*", "text_encoder/*", "text_encoder_2/*", "tokenizer/*", "tokenizer_2/*",
              "transformer/*", "vae/*")
BASE_LAYOUT = ("model_index.json", "transformer", "vae", "text_encoder", "text_encoder_2")
TRANSFORMER_FILES = ("model_index.json", "scheduler/*", "transformer/*")
TRANSFORMER_LAYOUT = ("transformer",)


VAE_SCALE_FACTOR = 8  # FLUX.1's VAE (and every tiny twin's): a latent pixel per 8x8 image pixels

# Replicate's weights delivery: public .tars in diffusers layout and single-file checkpoints in BFL's layout, the
# sources Replicate's own FLUX containers boot from (replicate/cog-flux, cog-flux-kontext), readable with no token. FLUX_WEIGHTS_HOST replaces this host (a mirror, a test server).
PUBLIC_HOST = "https://weights.replicate.delivery"


@dataclass(frozen=True)
class Variant:
    name: str  # the `model` input's value, and the name of its bf16 transformer ("-fp8" names go_fast's copy)
    title: str  # as logs and messages name it
    public: str  # default weights: the path of a public .tar on PUBLIC_HOST (the diffusers folders, one top folder
    #              or none, maybe beside files never read: only what `files` names is fetched), or of a single-file
    #              checkpoint in BFL's layout (.safetensors/.sft: flux/singlefile.py, with flux/configs/<name>/)
    repo: str  # its Hugging Face repo in diffusers format (a setting may name it; gated ones need HF_TOKEN)
    setting: str  # the environment variable that names other weights (a folder, a repo id, an https .tar)
    max_sequence_length: int  # T5 tokens it reads: a longer prompt is refused, never cut
    guidance: bool  # guidance-distilled (a guidance embedder reads guidance_scale); without, guidance_scale is ignored
    scheduler: dict  # its published scheduler config (the tiny twin and the full-size fake use it)
    tiny_seed: int  # its tiny twin's transformer seed: twins differ in weights, so tests tell them apart
    max_steps: int | None = None  # a step cap below the schema's (a timestep-distilled variant)
    at_setup: bool = False  # loaded by setup() (the base variant); False: on first use, sharing the base's components
    files: tuple[str, ...] = TRANSFORMER_FILES
    layout: tuple[str, ...] = TRANSFORMER_LAYOUT  # what a local folder must hold
    pipelines: dict[str, str] = field(default_factory=lambda: dict(FLUX_PIPELINES))  # task -> diffusers class name
    # its published defaults where they differ from the schema's: an input left at the schema's default (which dev's
    # are) takes the variant's value instead (flux/request.py; README "Models")
    defaults: dict[str, float] = field(default_factory=dict)
    fill_channels: bool = False  # its transformer also reads the masked image's latents and the mask (FLUX.1-Fill)
    max_guidance: float = 10  # guidance_scale above this is refused (the schema allows FLUX.1-Fill's 100)

    @property
    def fp8(self) -> str:
        """The name of its go_fast copy."""
        return f"{self.name}-fp8"

    def in_channels(self, packed: int) -> int:
        """Its transformer's input channels, given the packed (2x2) latents' (`out_channels`: 64 for FLUX.1): with
        fill channels also the masked image's packed latents and the mask, one channel per pixel of a packed latent's
        16x16 patch (the 8x VAE of FLUX.1 and of the tiny twins): FLUX.1-Fill's 384."""
        return packed + (packed + 4 * VAE_SCALE_FACTOR**2 if self.fill_channels else 0)


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("dev", "FLUX.1-dev", "/default/black-forest-labs/FLUX.1-dev/files.tar", "black-forest-labs/FLUX.1-dev",
            "FLUX_WEIGHTS", 512, True, DEV_SCHEDULER, tiny_seed=1, at_setup=True, files=BASE_FILES,
            layout=BASE_LAYOUT),
    Variant("schnell", "FLUX.1-schnell", "/default/black-forest-labs/FLUX.1-schnell/slim.tar",
            "black-forest-labs/FLUX.1-schnell", "FLUX_SCHNELL_WEIGHTS", 256, False, SCHNELL_SCHEDULER, tiny_seed=2,
            max_steps=4),
    Variant("krea-dev", "FLUX.1-Krea-dev", "/default/black-forest-labs/FLUX.1-krea-dev/files.tar",
            "black-forest-labs/FLUX.1-Krea-dev", "FLUX_KREA_DEV_WEIGHTS", 512, True, DEV_SCHEDULER, tiny_seed=11),
    # instruction editing; without image, text-to-image (README "Models": sizes, defaults)
    Variant("kontext-dev", "FLUX.1-Kontext-dev", "/default/black-forest-labs/kontext/release-candidate/kontext-dev.sft",
            "black-forest-labs/FLUX.1-Kontext-dev", "FLUX_KONTEXT_DEV_WEIGHTS", 512, True, DEV_SCHEDULER, tiny_seed=12,
            pipelines={"txt2img": "FluxKontextPipeline", "img2img": "FluxKontextPipeline",
                       "inpaint": "FluxKontextInpaintPipeline"},
            defaults={"guidance_scale": 2.5, "prompt_strength": 1.0}),
    # inpainting only: image and mask
    Variant("fill-dev", "FLUX.1-Fill-dev", "/default/black-forest-labs/ctrl-n-fill/flux1-fill-dev.safetensors",
            "black-forest-labs/FLUX.1-Fill-dev", "FLUX_FILL_DEV_WEIGHTS", 512, True, DEV_SCHEDULER, tiny_seed=13,
            pipelines={"inpaint": "FluxFillPipeline"}, defaults={"guidance_scale": 30, "prompt_strength": 1.0},
            fill_channels=True, max_guidance=100),
)}
NAMES = tuple(VARIANTS)
BASE = next(v for v in VARIANTS.values() if v.at_setup)
ON_FIRST_USE = tuple(v for v in VARIANTS.values() if not v.at_setup)
assert sum(v.at_setup for v in VARIANTS.values()) == 1, "exactly one variant (the base) loads at setup"
assert all(set(v.pipelines) <= set(TASKS) and set(v.pipelines.values()) <= set(PIPELINE_READS) for v in VARIANTS.values())


def get(name: str) -> Variant:
    return VARIANTS[name]


def of_transformer(name: str) -> tuple[Variant, bool]:
    """A transformer's variant, and whether it is the fp8 copy: "schnell-fp8" -> (schnell, True)."""
    base, fp8 = (name[: -len("-fp8")], True) if name.endswith("-fp8") else (name, False)
    return VARIANTS[base], fp8


def transformer_names() -> tuple[str, ...]:
    """Every transformer the engine may hold, in table order: each variant's bf16, then its fp8 copy."""
    return tuple(n for v in VARIANTS.values() for n in (v.name, v.fp8))

# FluxTransformer2DModel's block lists, every variant's architecture: the units compiled, quantized and cached.
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")
