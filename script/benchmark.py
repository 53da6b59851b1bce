"""Benchmarks, as ratios measured in one run (never as timed tests).

  script/benchmark                 the predictor's end-to-end time over a bare diffusers call (tiny model, CPU)
  script/benchmark lora            a prediction with a cached LoRA over one without; the time of a LoRA switch
  script/benchmark fp8-copy        the memory go_fast's fp8 copy costs while it is built, a block at a time, over
                                   pruna's smash of a whole copy (peak memory above the bf16 source, CPU)
  script/benchmark imports --old PYTHON
                                   setup's import chain here over the same chain in PYTHON's environment (fresh
                                   processes, alternating; script/benchmark_boot.py)
  script/benchmark install-size --old PYTHON --old-rev REV
                                   the runtime packages' installed and gzip size here over PYTHON's environment
  script/benchmark tar-stream [--tar-mib N]
                                   a weights .tar on a loopback server extracted while it downloads, over downloaded
                                   whole then extracted: time to ready and peak disk
  script/benchmark gpu [--tiny] [--budget S] [--out DIR]
                                   on one GPU, in one run: bare diffusers and the diffusers-torchao recipe against
                                   this engine's paths and speed modes, LoRA switches, 4 outputs, each optimization
                                   on and off, a boot from the compile bundle (script/benchmark_gpu.py; --tiny: the
                                   same sequence on the tiny FLUX on a CPU)

The overhead benchmark runs the full predict() (validation, generation, safety
checker, encoding) and a bare FluxPipeline call at the same settings on the
same weights, interleaved, and reports the ratio of their medians.

The LoRA benchmark builds two LoRAs on every Linear of the transformer and every
CLIP layer (rank 16, flux/fakes/loras.py), passed as data: URIs so no server
is needed, and times on the same predictor: predictions without a LoRA and with
a LoRA already in place (each timed one after an untimed one that sets the
state), in pairs whose order alternates; the ratio is the median of the per-pair
ratios. Then a switch between the two LoRAs (both in the disk cache: read,
restore, inject, fuse), a scale change (restore and fuse from memory), and what
the same LoRA again costs a prediction (resolve, find in the cache, compare).

The fp8-copy benchmark builds a FLUX transformer at full width (3072, 24 heads) with 2 double- and 4 single-stream
blocks in bf16 in CPU memory (2.3 GB), in a fresh process for each method, and records the process's peak resident
memory above what it held with the source alone: while flux/speed/fp8.py's fp8_transformer builds the fp8 copy (each
block copied, quantized, its bf16 freed) and while a whole deep copy is smashed by pruna with torchao (the way setup
made it before). On a GPU the same difference is what setup adds to the GPU: one bf16 block instead of a second bf16
transformer.
"""

from __future__ import annotations

import argparse
import base64
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
    from schema import input_defaults

    width, height = args.size
    return input_defaults() | dict(prompt="a knitted purple prune", aspect_ratio="custom", width=width, height=height,
                                   num_inference_steps=args.steps, seed=1) | changes


def overhead(args) -> dict:
    import torch
    from diffusers import FluxPipeline

    from flux import weights

    predictor = _predictor()
    engine = predictor.engine
    path = weights.locate(weights.sources(torch.cuda.is_available()).base, "dev")
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
    from flux.fakes import loras
    from flux.request import Request

    predictor = _predictor()
    engine = predictor.engine
    pipe = engine.pipeline("dev", "txt2img")

    def uri(seed: int) -> str:
        update = loras.make_update(pipe.transformer, "ALL", text_encoder=pipe.text_encoder, seed=seed, rank=16)
        return "data:application/octet-stream;base64," + base64.b64encode(loras.diffusers_bytes(update)).decode()

    a, b = uri(1), uri(2)
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


def _fp8_copy_peak(method: str) -> int:
    """In this process: the peak resident bytes above the bf16 source while its fp8 copy is built by `method`."""
    import copy
    import resource

    import psutil
    import torch
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from flux import weights
    from flux.fakes import fullsize
    from flux.speed import fp8 as fp8_
    from flux.speed import projections

    with fullsize.building_in(torch.bfloat16):
        source = FluxTransformer2DModel(**{**fullsize.TRANSFORMER, "num_layers": 2, "num_single_layers": 4})
    fullsize.init_weights(source, torch.Generator().manual_seed(0))
    projections.fuse_projections(source)
    fp8_.quant_config("fp8wo")  # torchao's configs built before measuring
    before = psutil.Process().memory_info().rss
    if method == "blocks":
        fp8_.fp8_transformer(source, "fp8wo", torch.device("cpu"))
    else:
        from pruna import SmashConfig, smash

        twin = copy.deepcopy(source)
        projections.drop_unfused(twin)
        tiny = FluxPipeline.from_pretrained(weights.locate(weights.TINY, "dev"), dtype=torch.bfloat16)
        config = SmashConfig(["torchao"], device="cpu")
        config.add({"torchao_quant_type": "fp8wo"})
        config.disable_saving()
        smash(FluxPipeline(**{**tiny.components, "transformer": twin}), config)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before


def fp8_copy(args) -> dict:
    import json
    import subprocess

    peaks = {}
    for method in ("smash", "blocks"):
        done = subprocess.run([sys.executable, __file__, "fp8-copy-child", method], capture_output=True, text=True,
                              check=True)
        peaks[method] = json.loads(done.stdout.strip().splitlines()[-1])
    import torch
    from diffusers import FluxTransformer2DModel

    from flux import memory
    from flux.fakes import fullsize

    with torch.device("meta"), fullsize.building_in(torch.bfloat16):
        shape = FluxTransformer2DModel(**{**fullsize.TRANSFORMER, "num_layers": 2, "num_single_layers": 4})
    gib = 1024**3
    return {"bf16 source": f"{memory.module_bytes(shape) / gib:.2f} GB, largest block "
                           f"{memory.block_bytes(shape) / gib:.2f} GB",
            "fp8 copy": f"{memory.fp8_bytes(shape) / gib:.2f} GB",
            "pruna smash of a whole copy": f"{peaks['smash'] / gib:.2f} GB above the source",
            "fp8_transformer, a block at a time": f"{peaks['blocks'] / gib:.2f} GB above the source",
            "ratio": round(peaks["blocks"] / peaks["smash"], 3)}


def _boot(name: str):
    def run(args) -> dict:
        import benchmark_boot

        return getattr(benchmark_boot, name)(args)
    return run


BENCHMARKS = {
    "overhead": (overhead, 1.05, "Predictor end-to-end vs bare diffusers (same weights, same settings, interleaved)"),
    "lora": (lora, 1.1, "A prediction with a cached LoRA vs one without (same predictor, interleaved)"),
    "fp8-copy": (fp8_copy, 0.7, "Peak memory building go_fast's fp8 copy a block at a time vs pruna's smash of a "
                                "whole copy (each in a fresh process)"),
    "imports": (_boot("imports"), 0.8, "Setup's import chain in this environment vs --old's (fresh processes, "
                                       "alternating)"),
    "install-size": (_boot("install_size"), None, "The runtime packages, installed and gzip -6, vs --old's"),
    "boot-stages": (_boot("boot_stages"), None, "setup() stage by stage: a first boot that compiles, then a boot from "
                                                "its compile bundle (tiny FLUX, inductor, fresh processes)"),
    "tar-stream": (_boot("tar_stream"), 0.7, "A weights .tar extracted while it downloads vs downloaded whole, then "
                                             "extracted (loopback)"),
}


def main() -> int:
    if sys.argv[1:2] == ["gpu"]:  # its own options: script/benchmark gpu --help
        import benchmark_gpu

        return benchmark_gpu.main(sys.argv[2:])
    if sys.argv[1:2] == ["fp8-copy-child"]:  # one method of the fp8-copy benchmark, in its own process
        import json

        import flux  # noqa: F401

        print(json.dumps(_fp8_copy_peak(sys.argv[2])))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", nargs="?", choices=[*BENCHMARKS, "gpu"], default="overhead")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--size", type=lambda s: tuple(map(int, s.split("x"))), default=(1024, 1024))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-ratio", type=float, default=None,
                        help="exit 1 if the ratio exceeds this (default: 1.05 for overhead, 1.1 for lora)")
    parser.add_argument("--old", help="imports, install-size: the python of the environment to compare with")
    parser.add_argument("--old-rev", help="install-size: the git revision whose requirements --old holds")
    parser.add_argument("--tar-mib", type=int, default=1024, help="tar-stream: the archive's size")
    parser.add_argument("--part-mib", type=int, default=8, help="tar-stream: the size of a ranged part")
    args = parser.parse_args()
    run, default_max, title = BENCHMARKS[args.which]
    result = run(args)
    # A benchmark with several goals lists them (label, value, "<=" or ">=", bound); the others have their ratio's.
    targets = result.pop("targets", None) or [("ratio", result["ratio"], "<=", args.max_ratio or default_max)]
    print(f"\n{title}:")
    for k, v in result.items():
        print(f"  {k:24} {v}")
    ok = True
    for label, value, op, bound in targets:
        if bound is None:  # a benchmark without a goal here (boot-stages: its goals are an H100's)
            continue
        met = value <= bound if op == "<=" else value >= bound
        ok &= met
        print(f"  {'target: ' + label:24} {value} {op} {bound}  {'OK' if met else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
