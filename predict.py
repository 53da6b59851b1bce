"""Cog entry point for FLUX.1-dev on Replicate.

This file only declares the inputs (with Replicate's FLUX.1-dev names, defaults
and bounds) and hands them, by name, to the engine's Request in flux/. The values in
Input(...) are literals because cog's schema generator reads this file without
running it; flux/request.py:SPEC holds the same values for the engine (the one other
place an input is declared), and tests/test_schema.py fails if the two ever disagree.
"""

import logging
import shutil
import tempfile
import uuid
from pathlib import Path as _Path
from typing import List, Optional

from cog import BasePredictor, Input, Path, Secret

import flux  # noqa: F401  (sets library environment defaults before anything imports diffusers)
from flux import engine, gpu, images, logs, output, weights
from flux.request import Request

log = logging.getLogger("flux.predict")


class Predictor(BasePredictor):
    def setup(self) -> None:
        logs.configure()
        sources = weights.sources(has_cuda=gpu.cuda_available())  # a GPU torch cannot use is a setup error
        self.engine = engine.load(sources)
        self._out_dir: Optional[_Path] = None

    def predict(
        self,
        prompt: str = Input(description="Prompt for generated image"),
        negative_prompt: Optional[str] = Input(
            description="What the image should not show. Used only with true_cfg_scale above 1 (true classifier-free "
            "guidance: two transformer passes per step, so about twice the denoising time).",
            default=None,
        ),
        image: Optional[Path] = Input(
            description="Input image for image to image or inpainting mode. The output keeps its aspect ratio "
            "(each side within 256..1440, a multiple of 16); aspect_ratio, width, height and megapixels are ignored. "
            "With kontext-dev, the image to edit: the output is the Kontext resolution nearest its aspect ratio "
            "unless aspect_ratio says otherwise.",
            default=None,
        ),
        mask: Optional[Path] = Input(
            description="Image mask for inpainting mode (white = repaint, black = keep). Needs image; resized to it.",
            default=None,
        ),
        aspect_ratio: str = Input(
            description="Aspect ratio for the generated image. With custom, set width and height.",
            choices=["1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21", "custom"],
            default="1:1",
        ),
        width: Optional[int] = Input(
            description="Width of generated image. Only works if `aspect_ratio` is set to custom. "
            "Will be rounded to nearest multiple of 16.",
            ge=256,
            le=1440,
            default=None,
        ),
        height: Optional[int] = Input(
            description="Height of generated image. Only works if `aspect_ratio` is set to custom. "
            "Will be rounded to nearest multiple of 16.",
            ge=256,
            le=1440,
            default=None,
        ),
        megapixels: str = Input(
            description="Approximate number of megapixels for generated image", choices=["1", "0.25"], default="1"
        ),
        prompt_strength: float = Input(
            description="Prompt strength when using img2img or inpainting. 1.0 corresponds to full destruction of "
            "information in image. Left at 0.8, kontext-dev's and fill-dev's inpainting use 1; kontext-dev's edits "
            "do not read it",
            ge=0,
            le=1,
            default=0.8,
        ),
        model: str = Input(
            description="Which model to run inference with. The dev model performs best with around 28 inference "
            "steps but the schnell model only needs 4 steps (it runs at most 4, without guidance). krea-dev is "
            "FLUX.1-Krea-dev, a dev fine-tune for natural, photographic images (the same inputs as dev). kontext-dev "
            "is FLUX.1-Kontext-dev: with image it edits the image as the prompt says (\"make it night\"), at the Kontext "
            "resolution nearest the image's aspect unless aspect_ratio says otherwise; with mask, only the white part; "
            "without image, text-to-image (its default guidance_scale is 2.5). fill-dev is FLUX.1-Fill-dev: "
            "inpainting only, with image and mask (its default guidance_scale is 30, prompt_strength 1).",
            choices=["dev", "schnell", "krea-dev", "kontext-dev", "fill-dev"],
            default="dev",
        ),
        num_outputs: int = Input(description="Number of outputs to generate", ge=1, le=4, default=1),
        num_inference_steps: int = Input(
            description="Number of denoising steps. More steps can give more detailed images, but take longer.",
            ge=1,
            le=50,
            default=28,
        ),
        guidance_scale: float = Input(
            description="Guidance scale for the diffusion process. Lower values can give more realistic images. "
            "Good values to try are 2, 2.5, 3 and 3.5. Up to 10, and up to 100 for fill-dev. Left at 3, kontext-dev "
            "and fill-dev use their own defaults (2.5 and 30)",
            ge=0,
            le=100,
            default=3,
        ),
        true_cfg_scale: float = Input(
            description="True classifier-free guidance scale, against negative_prompt. 1 turns it off (one pass per "
            "step); above 1 runs the transformer twice per step. Try 1.5 to 4.",
            ge=1,
            le=10,
            default=1,
        ),
        seed: Optional[int] = Input(
            description="Random seed. Set for reproducible generation; output i uses seed + i.", default=None
        ),
        output_format: str = Input(
            description="Format of the output images", choices=["webp", "jpg", "png"], default="webp"
        ),
        output_quality: int = Input(
            description="Quality when saving the output images, from 0 to 100. 100 is best quality, 0 is lowest "
            "quality. Not relevant for .png outputs",
            ge=0,
            le=100,
            default=80,
        ),
        disable_safety_checker: bool = Input(description="Disable safety checker for generated images.", default=False),
        replicate_weights: Optional[str] = Input(
            description="LoRA weights to apply. A Replicate model (owner/model or owner/model/version, e.g. "
            "'fofr/flux-pixar-cars'), a Hugging Face reference (huggingface.co/owner/repo or "
            "huggingface.co/owner/repo/file.safetensors), a CivitAI URL (civitai.com/models/<id>[/<name>]), any "
            "https URL of a .safetensors file, or a data: URI. Formats: diffusers/PEFT, kohya, ai-toolkit, XLabs, "
            "BFL (ComfyUI, fal), LyCORIS LoKr and LoHa.",
            default=None,
        ),
        lora_scale: float = Input(
            description="How strongly the main LoRA applies. 0 is the model without it; sane results between 0 and "
            "1; negative values push away from it.",
            ge=-1,
            le=3,
            default=1,
        ),
        extra_lora: Optional[str] = Input(
            description="A second LoRA, applied together with the main one (same reference forms as "
            "replicate_weights). Alone, it acts as the main LoRA.",
            default=None,
        ),
        extra_lora_scale: float = Input(
            description="How strongly the extra LoRA applies.", ge=-1, le=3, default=1
        ),
        hf_api_token: Optional[Secret] = Input(
            description="Hugging Face token, for LoRAs in gated or private repos.", default=None
        ),
        civitai_api_token: Optional[Secret] = Input(
            description="CivitAI token, for CivitAI downloads that need one.", default=None
        ),
        go_fast: bool = Input(
            description="Run faster predictions: the transformer in fp8, compiled, at every size and for img2img and "
            "inpainting. Images differ slightly from the bf16 ones.",
            default=False,
        ),
        speed_mode: str = Input(
            description="Pruna's speed modes: reuse the transformer's outputs across denoising steps (FORA), "
            "from Lightly Juiced (closest to Off) to Blink of an eye (fastest). Extra Juiced and Blink of an eye "
            "also use the fp8 transformer.",
            choices=["Off", "Lightly Juiced 🍊 (more consistent)", "Juiced 🔥 (default)",
                     "Extra Juiced 🔥 (more speed)", "Blink of an eye 👁️"],
            default="Off",
        ),
    ) -> List[Path]:
        inputs = {name: value for name, value in locals().items() if name != "self"}  # every input, as SPEC names
        inputs.update(image=delivered(image), mask=delivered(mask))
        request = Request.build(**inputs)
        prediction = output.write(self.engine.run(request), self._new_out_dir())
        for name, value in prediction.metrics.items():  # beside predict_time in the response's metrics
            self.record_metric(name, value)
        return [Path(p) for p in prediction.files]

    def _new_out_dir(self) -> _Path:
        """A fresh folder name per prediction, created only when outputs are written (a cancelled or failed
        prediction leaves nothing); the previous prediction's folder, already sent by cog, is removed."""
        if self._out_dir is not None:
            shutil.rmtree(self._out_dir, ignore_errors=True)
        self._out_dir = _Path(tempfile.gettempdir()) / f"flux-out-{uuid.uuid4().hex}"
        return self._out_dir


def delivered(value):
    """A file input as cog delivered it, for the engine to read only if cog fetched it for this prediction.

    cog 0.23.1 (coglet) fetches every file a caller sends (an upload, a data: URI, an http(s) URL) before predict()
    runs, with cog.types.URLPath.convert: a tempfile.NamedTemporaryFile in the temp folder, passed as cog's Path, and
    deleted after the prediction. Any other string (a path on this machine) it passes on as a str, unread
    (tests/test_coglet.py pins both). Both are handed on as images.Delivered; only a Python caller's own
    pathlib.Path or PIL image (tests, scripts) is passed as it is.
    """
    if isinstance(value, (str, Path)):
        return images.Delivered(value, folder=tempfile.gettempdir(), prefix=tempfile.template)
    return value
