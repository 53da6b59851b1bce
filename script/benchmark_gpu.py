"""script/benchmark gpu: this container against its peers on one GPU, in one run that ends by its deadline.

The sequence and the command line; the sections are in script/gpu_bench/ (its docstring says what each does).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_bench import __doc__ as DOC  # noqa: E402
from gpu_bench.boot import boot, boot_child  # noqa: E402
from gpu_bench.machine import build_shared, device_name, pinned, rowwise_fp8_runs, versions  # noqa: E402
from gpu_bench.memory_model import memory_needs, plan_table  # noqa: E402
from gpu_bench.names import BARE, GROUPS, KEY, OTHER_MODES, TORCHAO, TORCHAO_MODES  # noqa: E402
from gpu_bench.ours import batch_warm_up, ours, ours_rows  # noqa: E402
from gpu_bench.peers import peer_bare, peer_torchao, torchao_s  # noqa: E402
from gpu_bench.schedule import STARTED, Ctx, DeadlineReached, Run  # noqa: E402
from gpu_bench.sections import lora_switches, offload, switches  # noqa: E402


def sequence(ctx: Ctx) -> None:
    """Every section, key rows first (module docstring)."""
    needs = ctx.needs
    ctx.section(GROUPS[0], ctx.row_s(BARE, None), needs["bare"], lambda: peer_bare(ctx, 1))
    ctx.section(GROUPS[1], ctx.est("ours setup"), needs["ours setup"], lambda: ours(ctx))
    ours_rows(ctx, GROUPS[2], KEY, 1)
    ctx.section(GROUPS[3], torchao_s(ctx, 1), needs["torchao"], lambda: peer_torchao(ctx, 1))
    lora_switches(ctx)
    # 4 outputs: ours (its batch-2+ graphs compiled first), then the peers
    ctx.section("4 outputs: ours warm-up", ctx.engine_s() + ctx.est("batch warm-up"),
                needs["ours setup"] if ctx.engine is None else 0, lambda: batch_warm_up(ctx))
    if ctx.batch_warm:
        ours_rows(ctx, "4 outputs", KEY, 4)
    ctx.section(f"4 outputs: {BARE}", ctx.row_s(BARE, None, 4), needs["bare 4"], lambda: peer_bare(ctx, 4))
    ctx.section(f"4 outputs: {TORCHAO}", torchao_s(ctx, 4), needs["torchao 4"], lambda: peer_torchao(ctx, 4))
    ours_rows(ctx, "other speed modes", OTHER_MODES, 1)
    if ctx.batch_warm:
        ours_rows(ctx, "other speed modes", OTHER_MODES, 4)
    ctx.section(GROUPS[7], ctx.est("offload"), needs["offload"], lambda: offload(ctx))
    switches(ctx)
    ctx.section(GROUPS[9], ctx.est("boot"), 0, lambda: boot(ctx))  # its own memory check, once it has released


def run(args) -> Path:
    work = Path(tempfile.mkdtemp(prefix="flux-benchmark-"))
    # Before anything compiles: this run's own LoRA and compile caches, empty, so that compile times are cold.
    from flux.folders import compile_cache_dir  # (no third-party imports)

    os.environ["FLUX_WEIGHTS_DIR"] = str(work / "weights")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(compile_cache_dir(work / "weights") / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(compile_cache_dir(work / "weights") / "triton")
    deadline = args.deadline or STARTED + args.budget
    import torch

    import flux  # noqa: F401  (library environment first)
    from flux import logs, memory

    logs.configure()
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("script/benchmark gpu needs an NVIDIA GPU (the full-size model is built on it); "
                         "--tiny runs the same sequence on the tiny FLUX on this CPU.")
    out = args.out or work / "out"
    started = time.perf_counter()
    device, dtype, shared = build_shared(args)
    software = versions()
    product = pinned("torch")
    meta = {"model": "tiny FLUX (random weights)" if args.tiny else "FLUX.1-dev architecture, random weights",
            "device": device_name(), "software": ", ".join(f"{k} {v}" for k, v in software.items()),
            "versions": software, "container pins": f"torch {product} (requirements.txt)",
            "size": "x".join(map(str, args.size)), "steps": args.steps, "repeats": args.repeats,
            "budget s": round(deadline - STARTED), "backend": args.backend,
            "build s": round(time.perf_counter() - started, 1)}
    if product and not software["torch"].startswith(product):
        meta["note"] = (f"Measured with this machine's torch {software['torch']}; the container pins torch {product} "
                        "(requirements.txt, docs/benchmarks.md: the torch pin): every row here is of the torch above.")
    ctx = Ctx(args, device, dtype, shared, Run(out, deadline, meta), work)
    # the model's own sizes: those of the meta-device model (--plan) for the full-size one
    ctx.sizes = memory.Sizes.of(shared.transformer, shared.text_encoder, shared.text_encoder_2, shared.vae)
    ctx.needs = memory_needs(ctx.sizes, shared.transformer.config, *args.size)
    ctx.rowwise = rowwise_fp8_runs(device)
    ctx.run.arm()
    try:
        sequence(ctx)
    except DeadlineReached:
        Run.disarm()
        cut = ctx.run.running
        ctx.run.section = cut or ctx.run.section
        ctx.run.add({"kind": "stopped", "reason": f"the deadline ({round(deadline - STARTED)} s after the start) came "
                     + ("while this section ran: it was cut" if cut else "between sections")})
    finally:
        Run.disarm()
    ctx.run.section = "end"
    ctx.run.add({"kind": "done", "elapsed s": round(ctx.run.elapsed(), 1)})
    return out


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="script/benchmark gpu", description=DOC,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tiny FLUX on this machine's CPU")
    parser.add_argument("--budget", type=float, default=450,
                        help="seconds from this process's start; no section starts that cannot finish by then, and "
                             "the one running then is cut (default 450)")
    parser.add_argument("--deadline", type=float, default=None,
                        help="the same as an absolute time (seconds since the epoch); wins over --budget")
    parser.add_argument("--out", type=Path, default=None, help="folder for results.jsonl and results.md")
    parser.add_argument("--size", type=lambda s: tuple(map(int, s.split("x"))), default=None)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--repeats", type=int, default=2, help="timed calls after the untimed one (default 2)")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend for every contender")
    parser.add_argument("--torchao-mode", choices=TORCHAO_MODES, default="auto",
                        help="the torchao peer's compile mode (auto: max-autotune when its estimate fits)")
    parser.add_argument("--only", type=lambda s: [g.strip() for g in s.split(",") if g.strip()], default=None,
                        help="run only the sections whose names start with these (comma-separated), e.g. "
                             "'ours: setup,boot' (a second try that measures what the first did not)")
    parser.add_argument("--plan", action="store_true", help="print what each section holds on the GPU and exit")
    parser.add_argument("--boot-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.size = args.size or ((512, 512) if args.tiny else (1024, 1024))
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    if args.plan:
        print(plan_table())
        return 0
    if args.boot_child:
        boot_child(args)
        return 0
    out = run(args)
    print((out / "results.md").read_text())
    print(f"results: {out}/results.jsonl, {out}/results.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
