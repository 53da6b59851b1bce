"""Benchmarks, as ratios measured in one run (never as timed tests).

  script/benchmark                 the predictor's end-to-end time over a bare diffusers call (tiny model, CPU)
  script/benchmark lora            a prediction with a cached LoRA over one without; the time of a LoRA switch
  script/benchmark speed [--random-weights] [--write]
                                   bf16 eager, bf16 compiled, go_fast and each speed mode: seconds per image at
                                   1 and 4 outputs, peak GPU memory, distance to bf16 eager (MAD, PSNR), LoRA
                                   strength on go_fast, setup time of a first and a second boot. --random-weights:
                                   the full-size FLUX.1-dev architecture with random weights, built on the GPU (no
                                   download); without it, the tiny FLUX. --write puts the table in docs/benchmarks.md

The overhead benchmark runs the full predict() (validation, generation, safety
checker, encoding) and a bare FluxPipeline call at the same settings on the
same weights, interleaved, and reports the ratio of their medians.

The LoRA benchmark builds two LoRAs on every Linear of the transformer and every
CLIP layer (rank 16, tests/helpers/loras.py), passed as data: URIs so no server
is needed, and times on the same predictor: predictions without a LoRA and with
a LoRA already in place (each timed one after an untimed one that sets the
state), in pairs whose order alternates; the ratio is the median of the per-pair
ratios. Then a switch between the two LoRAs (both in the disk cache: read,
restore, inject, fuse), a scale change (restore and fuse from memory), and what
the same LoRA again costs a prediction (resolve, find in the cache, compare).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _predictor():
    os.environ.setdefault("FLUX_WEIGHTS", "tiny")
    import flux  # noqa: F401
    from predict import Predictor

    predictor = Predictor()
    predictor.setup()
    return predictor


def _inputs(args, **changes) -> dict:
    """Every input as cog passes it (the predictor's declared defaults), at the benchmark's size, steps and seed."""
    from tests.helpers.inputs import defaults

    width, height = args.size
    return defaults() | dict(aspect_ratio="custom", width=width, height=height, num_inference_steps=args.steps,
                             seed=1) | changes


def overhead(args) -> dict:
    import torch
    from diffusers import FluxPipeline

    from flux import weights

    predictor = _predictor()
    engine = predictor.engine
    path = weights.locate(weights.sources(torch.cuda.is_available()).dev, "dev")
    bare = FluxPipeline.from_pretrained(path, dtype=engine.dtype).to(engine.device)
    bare.set_progress_bar_config(disable=True)
    width, height = args.size
    inputs = _inputs(args)

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


def lora(args) -> dict:
    from flux.request import Request
    from tests.helpers import loras

    predictor = _predictor()
    engine = predictor.engine
    pipe = engine.pipeline("dev", "txt2img")

    def uri(seed: int, layout: str) -> str:
        update = loras.make_update(pipe.transformer, "ALL", text_encoder=pipe.text_encoder, seed=seed, rank=16)
        return loras.lora_uri(update, layout)

    a, b = uri(1, "diffusers"), uri(2, "diffusers")
    plain, with_a = _inputs(args), _inputs(args, replicate_weights=a)

    def timed(fn) -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    def settled(inputs) -> float:
        predictor.predict(**inputs)  # sets the LoRA state: the timed call that follows has nothing to change
        return timed(lambda: predictor.predict(**inputs))

    predictor.predict(**plain), predictor.predict(**with_a), predictor.predict(**plain)  # warm-up (a enters the cache)
    times = {"no LoRA": [], "cached LoRA": []}
    for i in range(args.repeats):  # pairs in alternating order, so load from elsewhere falls on both sides alike
        order = (("no LoRA", plain), ("cached LoRA", with_a))
        for name, inputs in order if i % 2 == 0 else order[::-1]:
            times[name].append(settled(inputs))
    pair_ratios = [lora_s / plain_s for plain_s, lora_s in zip(times["no LoRA"], times["cached LoRA"])]

    def request(reference, scale=1.0):
        return Request.build(prompt="p", replicate_weights=reference, lora_scale=scale)

    engine.use_loras(request(b))  # b enters the disk cache
    again = [timed(lambda: engine.use_loras(request(b))) for _ in range(20)]  # what a cached LoRA adds per prediction
    switches, scale_changes = [], []
    for i in range(args.repeats):
        switches.append(timed(lambda: engine.use_loras(request(a if i % 2 == 0 else b))))
    for i in range(args.repeats):
        scale_changes.append(timed(lambda: engine.use_loras(request(b, 0.5 if i % 2 == 0 else 1.0))))
    engine.use_loras(request(None))
    med = {k: statistics.median(v) for k, v in times.items()}
    width, height = args.size
    return {
        "device": str(engine.device), "dtype": str(engine.dtype).replace("torch.", ""), "size": f"{width}x{height}",
        "steps": args.steps, "repeats": args.repeats, "LoRA": "rank 16, every Linear + CLIP",
        **{f"{k} median s": round(v, 3) for k, v in med.items()},
        "ratio of medians": round(med["cached LoRA"] / med["no LoRA"], 4),
        "ratio": round(statistics.median(pair_ratios), 4),  # median of the per-pair ratios
        "same LoRA again median s": round(statistics.median(again), 5),
        "LoRA switch median s": round(statistics.median(switches), 4),
        "scale change median s": round(statistics.median(scale_changes), 4),
    }


# ----- speed -------------------------------------------------------------------------------------------------------

def _engine(args, compile_backend):
    """An engine without safety checker: the tiny FLUX from disk, or the full-size architecture built on the GPU."""
    from flux import fullsize, speed, weights
    from flux.engine import Engine, default_device, default_dtype

    device = default_device()
    dtype = default_dtype(device)
    settings = speed.Settings(compile=compile_backend, fp8=speed.fp8_kind(device), warmup=bool(compile_backend),
                              cache_dir=Path(args.cache) if compile_backend else None)
    if args.random_weights:
        pipe = fullsize.build(device, dtype)
    else:
        from diffusers import FluxPipeline

        pipe = FluxPipeline.from_pretrained(weights.locate(weights.TINY, "dev"), dtype=dtype).to(device)
    engine = Engine(pipe, None, weights.TINY, device, dtype, settings)
    if settings.warmup:
        engine.warm_up()
    return engine


def boot(args) -> dict:
    """One setup, timed (a subprocess of `speed`, so that a second boot starts from a cold process)."""
    started = time.perf_counter()
    _engine(args, args.compile)
    return {"setup s": round(time.perf_counter() - started, 2)}


def _boots(args) -> list[float]:
    import subprocess

    cmd = [sys.executable, __file__, "boot", "--cache", args.cache, "--compile", args.compile]
    cmd += ["--random-weights"] if args.random_weights else []
    seconds = []
    for _ in range(2):
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        seconds.append(json.loads(out.strip().splitlines()[-1])["setup s"])
    return seconds


def speed_table(args) -> dict:
    import tempfile

    import numpy as np
    import torch

    from flux import speed
    from flux.request import Request

    args.cache = args.cache or tempfile.mkdtemp(prefix="flux-compile-cache-")
    boots = _boots(args) if args.boots else []
    engine = _engine(args, None)
    cuda = engine.device.type == "cuda"
    width, height = args.size

    def images(inputs: dict, n: int):
        size = {"aspect_ratio": "custom", "width": width, "height": height}
        req = Request.build(**{"prompt": "a knitted purple prune", "num_inference_steps": args.steps, "seed": 1,
                               "num_outputs": n, **size, **inputs})
        return engine.generate(req).images

    def per_image(inputs: dict, n: int) -> float:
        images(inputs, n)  # warm-up (and, compiled, any specialization)
        times = []
        for _ in range(args.repeats):
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            images(inputs, n)
            if cuda:
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t) / n)
        return statistics.median(times)

    def distance(a, b) -> tuple[float, float]:
        x, y = (np.asarray(i, dtype=np.float64) for i in (a, b))
        mse = float(((x - y) ** 2).mean())
        return float(np.abs(x - y).mean()), (float("inf") if mse == 0 else 10 * np.log10(255**2 / mse))

    # go_fast with a custom size runs bf16 by design: the table sizes measure fp8 at --size when it is a table size.
    modes = [("bf16 eager", {}), ("go_fast eager", {"go_fast": True}), ("bf16 compiled", {}),
             ("go_fast", {"go_fast": True})]
    modes += [(m.name, {"speed_mode": m.name, "go_fast": True}) for m in speed.SPEED_MODES[1:]]
    reference = images(_table_size({}, width, height), 1)[0]
    rows = []
    for label, inputs in modes:
        if label == "bf16 compiled":  # compile both paths now (FORA is off between calls), warmed at this size
            for name in ("dev", "dev-fp8"):
                speed.compile_blocks(engine.path(name).transformer, args.compile)
            engine.warm_up([(width, height, 1), (width, height, 2)])
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        req_inputs = _table_size(inputs, width, height)
        row = {"mode": label, "1 output s/image": round(per_image(req_inputs, 1), 4)}
        row["4 outputs s/image"] = round(per_image(req_inputs, 4), 4) if args.batch4 else None
        row["peak GPU GB"] = round(torch.cuda.max_memory_allocated() / 1024**3, 1) if cuda else None
        row["MAD"], row["PSNR dB"] = (round(v, 2) for v in distance(images(req_inputs, 1)[0], reference))
        rows.append(row)
    return {"device": _device_name(), "model": "FLUX.1-dev, random weights" if args.random_weights else "tiny FLUX",
            "size": f"{width}x{height}", "steps": args.steps, "repeats": args.repeats, "rows": rows,
            "boots": boots, "lora": _lora_on_fp8(engine, images)}


def _table_size(inputs: dict, width: int, height: int) -> dict:
    """go_fast runs fp8 only at table sizes; ask by aspect ratio when --size is one."""
    from flux import sizes

    for mp in sizes.MEGAPIXELS:
        for ratio in sizes.ASPECT_RATIOS:
            if sizes.table_size(ratio, mp) == (width, height):
                return {**inputs, "aspect_ratio": ratio, "megapixels": mp}
    return inputs


def _lora_on_fp8(engine, images) -> dict:
    """How strongly a LoRA shows on go_fast compared with bf16: gain = <d_fp8, d_bf16> / |d_bf16|^2 with d the
    image change the LoRA makes; and the distance of go_fast at lora_scale x1 and x1.5 to bf16 at x1."""
    import numpy as np

    from tests.helpers import loras

    pipe = engine.pipeline("dev", "txt2img")
    gains, dist = [], {1.0: [], 1.5: []}
    for seed in range(3):
        update = loras.make_update(pipe.transformer, "ALL", seed=seed, strength=0.5, rank=16)
        uri = loras.lora_uri(update)
        a = {"aspect_ratio": "1:1", "megapixels": "0.25"}
        arr = lambda i: np.asarray(i[0], dtype=np.float64)  # noqa: E731
        base, fast = arr(images(a, 1)), arr(images({**a, "go_fast": True}, 1))
        with_lora = arr(images({**a, "replicate_weights": uri}, 1))
        d_bf16 = with_lora - base
        for m in dist:
            fast_lora = arr(images({**a, "go_fast": True, "replicate_weights": uri, "lora_scale": m}, 1))
            dist[m].append(float(np.abs(fast_lora - with_lora).mean()))
            if m == 1.0:
                gains.append(float(((fast_lora - fast) * d_bf16).sum() / (d_bf16**2).sum()))
    return {"gain": [round(g, 3) for g in gains], "MAD to bf16 at x1": [round(v, 2) for v in dist[1.0]],
            "MAD to bf16 at x1.5": [round(v, 2) for v in dist[1.5]]}


def _device_name() -> str:
    import platform

    import diffusers
    import torch

    import pruna
    import torchao

    what = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{os.cpu_count()}-core {platform.machine()} CPU"
    return (f"{what}; torch {torch.__version__}, diffusers {diffusers.__version__}, torchao {torchao.__version__}, "
            f"pruna {pruna.__version__}")


def _speed_markdown(result: dict) -> str:
    import datetime

    lines = [f"### {result['model']}, {result['device']}, {datetime.date.today()}", "",
             f"{result['size']}, {result['steps']} steps, median of {result['repeats']} after a warm-up; MAD and PSNR "
             "against bf16 eager at the same seed" + (" (random weights: a plumbing check, not a quality one)"
                                                      if "random" in result["model"] or "tiny" in result["model"]
                                                      else ""), "",
             "| mode | s/image, 1 output | s/image, 4 outputs | peak GPU GB | MAD | PSNR dB |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        cells = [r["mode"], r["1 output s/image"], r["4 outputs s/image"], r["peak GPU GB"], r["MAD"], r["PSNR dB"]]
        lines.append("| " + " | ".join("-" if c is None else str(c) for c in cells) + " |")
    if result["boots"]:
        lines += ["", f"Setup (compile + warm-up of every size): first boot {result['boots'][0]} s, "
                      f"second boot {result['boots'][1]} s (compile caches kept)."]
    lora = result["lora"]
    lines += ["", f"LoRA on go_fast (3 random LoRAs): gain {lora['gain']}; MAD to bf16 with the LoRA at lora_scale x1 "
                  f"{lora['MAD to bf16 at x1']}, at x1.5 {lora['MAD to bf16 at x1.5']}.", ""]
    return "\n".join(lines)


def _write_speed(result: dict) -> None:
    """Replace (or add) this machine's block in docs/benchmarks.md, between markers."""
    doc = ROOT / "docs" / "benchmarks.md"
    key = "gpu" if "random" in result["model"] else "cpu"
    start, end = f"<!-- speed:{key} -->", f"<!-- /speed:{key} -->"
    text = doc.read_text()
    block = f"{start}\n{_speed_markdown(result)}{end}"
    if start in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    doc.write_text(text)


BENCHMARKS = {
    "overhead": (overhead, 1.05, "Predictor end-to-end vs bare diffusers (same weights, same settings, interleaved)"),
    "lora": (lora, 1.1, "A prediction with a cached LoRA vs one without (same predictor, interleaved)"),
    "speed": (speed_table, None, "Fast paths: seconds per image, memory, distance to bf16, setup"),
    "boot": (boot, None, "One setup"),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", nargs="?", choices=list(BENCHMARKS), default="overhead")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--size", type=lambda s: tuple(map(int, s.split("x"))), default=(1024, 1024))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-ratio", type=float, default=None,
                        help="exit 1 if the ratio exceeds this (default: 1.05 for overhead, 1.1 for lora)")
    parser.add_argument("--random-weights", action="store_true", help="speed: the full-size FLUX.1-dev on the GPU")
    parser.add_argument("--compile", default="inductor", help="speed: the torch.compile backend")
    parser.add_argument("--cache", default=None, help="speed: compile cache folder (default: a new temporary one)")
    parser.add_argument("--no-boots", dest="boots", action="store_false", help="speed: skip the two timed boots")
    parser.add_argument("--no-batch4", dest="batch4", action="store_false", help="speed: skip num_outputs 4")
    parser.add_argument("--write", action="store_true", help="speed: write the table into docs/benchmarks.md")
    args = parser.parse_args()
    if args.random_weights:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--random-weights builds the full-size FLUX.1-dev on a GPU; none is present")
    run, default_max, title = BENCHMARKS[args.which]
    result = run(args)
    if args.which == "boot":
        print(json.dumps(result))
        return 0
    if args.which == "speed":
        print(_speed_markdown(result))
        if args.write:
            _write_speed(result)
        return 0
    max_ratio = args.max_ratio or default_max
    print(f"\n{title}:")
    for k, v in result.items():
        print(f"  {k:24} {v}")
    ok = result["ratio"] <= max_ratio
    print(f"  {'target':24} <= {max_ratio}  {'OK' if ok else 'OVER'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
