"""Benchmarks, as ratios measured in one run (never as timed tests).

  script/benchmark                 the predictor's end-to-end time over a bare diffusers call (tiny model, CPU)

The overhead benchmark runs the full predict() (validation, generation, safety
checker, encoding) and a bare FluxPipeline call at the same settings on the
same weights, interleaved, and reports the ratio of their medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def overhead(args) -> dict:
    os.environ.setdefault("FLUX_WEIGHTS", "tiny")
    import flux  # noqa: F401
    import torch
    from diffusers import FluxPipeline

    from flux import weights
    from predict import Predictor

    predictor = Predictor()
    predictor.setup()
    engine = predictor.engine
    path = weights.locate(weights.sources(torch.cuda.is_available()).dev, "dev")
    bare = FluxPipeline.from_pretrained(path, dtype=engine.dtype).to(engine.device)
    bare.set_progress_bar_config(disable=True)
    width, height = args.size
    inputs = dict(
        prompt="a knitted purple prune", image=None, mask=None, aspect_ratio="custom", width=width, height=height,
        megapixels="1", prompt_strength=0.8, model="dev", num_outputs=1, num_inference_steps=args.steps,
        guidance_scale=3.0, seed=1, output_format="webp", output_quality=80, disable_safety_checker=False,
    )

    def run_predictor():
        predictor.predict(**inputs)

    def run_bare():
        generator = [torch.Generator("cpu").manual_seed(1)]
        with torch.inference_mode():
            bare(prompt=inputs["prompt"], width=width, height=height, num_inference_steps=args.steps,
                 guidance_scale=3.0, generator=generator, num_images_per_prompt=1, max_sequence_length=512)

    run_bare(), run_predictor()  # warm-up
    times = {"bare diffusers": [], "predictor": []}
    for _ in range(args.repeats):
        for name, fn in (("bare diffusers", run_bare), ("predictor", run_predictor)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "device": str(engine.device), "dtype": str(engine.dtype).replace("torch.", ""), "size": f"{width}x{height}",
        "steps": args.steps, "repeats": args.repeats, **{f"{k} median s": round(v, 3) for k, v in med.items()},
        "ratio": round(med["predictor"] / med["bare diffusers"], 4),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--size", type=lambda s: tuple(map(int, s.split("x"))), default=(1024, 1024))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-ratio", type=float, default=1.05, help="exit 1 if predictor/bare exceeds this")
    args = parser.parse_args()
    result = overhead(args)
    print("\nPredictor end-to-end vs bare diffusers (same weights, same settings, interleaved):")
    for k, v in result.items():
        print(f"  {k:24} {v}")
    ok = result["ratio"] <= args.max_ratio
    print(f"  {'target':24} <= {args.max_ratio}  {'OK' if ok else 'OVER'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
