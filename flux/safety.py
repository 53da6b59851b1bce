"""The safety checkers: CompVis' Stable Diffusion checker flags outputs, and a second opinion (Falconsai's ViT NSFW
classifier, FLUX_SAFETY_SECOND) re-checks each flagged image; an output is dropped only when both flag it. CompVis'
checker flags many harmless images, and false positives are a top complaint; Replicate's containers re-check the
same way."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)
# diffusers' checker says it returns black images; we drop flagged images instead and log that ourselves.
logging.getLogger("diffusers.pipelines.stable_diffusion.safety_checker").setLevel(logging.ERROR)


class _ImageModel:
    """A model and its image processor on the engine's device and dtype."""

    def __init__(self, model, processor, device: torch.device, dtype: torch.dtype):
        self.model = model.to(device=device, dtype=dtype).eval()
        self.processor = processor
        self.device = device
        self.dtype = dtype

    @classmethod
    def load(cls, path: Path, device: torch.device, dtype: torch.dtype):
        model_class, processor_class = cls.classes()
        model = model_class.from_pretrained(path, dtype=dtype, use_safetensors=True)
        return cls(model, processor_class.from_pretrained(path), device, dtype)

    @staticmethod
    def classes() -> tuple[type, type]:
        """The model's and the image processor's classes (imported when first loaded)."""
        raise NotImplementedError

    def pixels(self, images: list[Image.Image]) -> torch.Tensor:
        return self.processor(images, return_tensors="pt").pixel_values.to(self.device, self.dtype)


class SafetyChecker(_ImageModel):
    @staticmethod
    def classes() -> tuple[type, type]:
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        return StableDiffusionSafetyChecker, CLIPImageProcessor

    @torch.inference_mode()
    def flags(self, images: list[Image.Image]) -> list[bool]:
        """True for each image the checker flags."""
        pixels = self.pixels(images)
        # The checker blacks out flagged entries of `images` in place; it only needs their shapes.
        placeholders = np.zeros((len(images), 1, 1, 3), dtype=np.float32)
        _, has_nsfw = self.model(clip_input=pixels, images=placeholders)
        return [bool(flag) for flag in has_nsfw]


class NsfwClassifier(_ImageModel):
    """An image classifier with an "nsfw" label (Falconsai/nsfw_image_detection: a ViT with labels normal, nsfw)."""

    def __init__(self, model, processor, device: torch.device, dtype: torch.dtype):
        labels = {str(v).lower(): int(k) for k, v in model.config.id2label.items()}
        if "nsfw" not in labels:
            raise ValueError(f"the classifier has no 'nsfw' label (its labels: {', '.join(labels)})")
        self.nsfw = labels["nsfw"]
        super().__init__(model, processor, device, dtype)

    @staticmethod
    def classes() -> tuple[type, type]:
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        return AutoModelForImageClassification, AutoImageProcessor

    @torch.inference_mode()
    def flags(self, images: list[Image.Image]) -> list[bool]:
        """True for each image the classifier labels nsfw."""
        if not images:
            return []
        pixels = self.pixels(images)
        return [int(i) == self.nsfw for i in self.model(pixel_values=pixels).logits.argmax(-1)]
