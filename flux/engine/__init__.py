"""The engine: loads FLUX once, then turns a Request into images. It knows nothing of cog.

  build.py         setup (`load`, `Engine`): weights, components, the memory plan, the compile bundle, the warm-up
  transformers.py  each FLUX variant's bf16 transformer and go_fast's fp8 copy of it, in pipelines for every task,
                   smashed with the step caches and compiled; placed by the memory plan; kept in step with the LoRAs
  run.py           one request: routed once, its LoRAs made current, the pipeline called with a step hook, the
                   safety checkers, the facts

One set of shared components (text encoders, VAE) serves text-to-image, img2img and inpainting, for every variant
(flux/variants.py): diffusers' Flux pipelines built on the same module objects. The output stage (flux/output.py)
writes what a request made.
"""

from .build import Engine, default_device, load, serving_dtype
from ..prediction import Generated

__all__ = ["Engine", "Generated", "default_device", "load", "serving_dtype"]
