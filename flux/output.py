"""The output stage: what a request made, written as files, with the prediction's facts for the response's metrics
(README, "Response")."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from . import images, memory
from .prediction import Generated, Prediction

log = logging.getLogger(__name__)


def write(generated: Generated, out_dir: Path) -> Prediction:
    """The images as files in out_dir (created only now: a failed prediction leaves nothing), in the request's format
    and quality; one log line for the whole prediction."""
    req = generated.req
    started = time.monotonic()
    files = images.save(generated.images, out_dir, req.output_format, req.output_quality)
    generated.timings["encode"] = time.monotonic() - started
    log.info(
        "prediction: path=%s speed_mode=%s task=%s size=%dx%d steps=%d outputs=%d seeds=%s %s total=%.2fs",
        req.transformer, req.speed_mode, req.task, req.width, req.height, generated.steps, len(files), generated.seeds,
        " ".join(f"{k}={v:.2f}s" for k, v in generated.timings.items()), time.monotonic() - generated.started,
    )
    return Prediction(files, metrics(generated, len(files)))


def metrics(generated: Generated, image_count: int) -> dict[str, object]:
    """The prediction's facts under the names callers key on (README, "Response"). Never a token: LoRAs appear as
    the logs show them, without query strings."""
    req = generated.req
    facts: dict[str, object] = {
        "seed": generated.seeds[0],
        "seeds": list(generated.seeds),
        "image_count": image_count,
        "nsfw_count": generated.flagged,
        "width": req.width,
        "height": req.height,
        "num_inference_steps": generated.steps,
        "transformer_passes": generated.passes,
        "path": req.transformer,
        "speed_mode": req.speed_mode,
        "true_cfg": req.true_cfg,
        "memory.moves": [str(m) for m in generated.moves],
        "memory.moved_gb": round(memory.gb(generated.moved_bytes), 3),
    }
    if generated.loras:
        facts["lora"] = [got.shown for got in generated.loras]
        facts["lora_cached"] = all(got.cached for got in generated.loras)
        facts["lora_unapplied_tensors"] = generated.lora_unapplied
    facts.update({f"timing.{stage}": round(seconds, 4) for stage, seconds in generated.timings.items()})
    return facts
