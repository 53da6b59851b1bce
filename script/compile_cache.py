"""Compile bundles: what a boot compiled, carried to the next container (flux/compile_cache.py).

  script/compile-cache export [DIR]    boot the engine as setup() does (the weights and the speed settings from the
                                       environment, FLUX_COMPILE on; the warm-up compiles every size on each path,
                                       or loads what FLUX_COMPILE_CACHE already holds), then write the bundle to DIR:
                                       a folder, or a .tar when DIR ends in .tar. Default: weights/compile-bundle.tar
                                       (FLUX_WEIGHTS_DIR), where nothing is built into the image

Host the bundle next to the weights (an https URL of the .tar, or a Hugging Face repo holding the folder) and point
FLUX_COMPILE_CACHE at it: a container booting on the same GPU type with the same software and settings then loads
the compiled graphs instead of compiling them. The bundle holds no token and no path.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def export(dest: Path) -> dict:
    import flux  # noqa: F401  (sets the compile-cache folders before anything imports diffusers)
    import torch
    from torch._dynamo.utils import counters

    from flux import compile_cache, logs, weights
    from flux.engine import load as engine_load

    logs.configure()
    os.environ.setdefault("FLUX_COMPILE", "inductor")
    os.environ["FLUX_WARMUP"] = "1"
    os.environ["FLUX_SETUP_BUDGET_S"] = "1000000000"  # a bundle holds every graph: nothing is deferred (flux/budget.py)
    started = time.monotonic()
    engine = engine_load(weights.sources(has_cuda=torch.cuda.is_available()))
    if engine.settings.compile is None:
        raise SystemExit("FLUX_COMPILE is off: there is nothing to compile into a bundle.")
    written = compile_cache.export(engine.settings.cache_dir, dest.resolve())
    manifest = json.loads((engine.settings.cache_dir / compile_cache.MANIFEST).read_text())
    return {"bundle": str(written), "digest": manifest["digest"], "artifacts": manifest["artifacts"],
            "setup s": round(time.monotonic() - started, 2), "stages": engine.stages.seconds,
            "fx graphs compiled": counters["inductor"]["fxgraph_cache_miss"],
            "fx graphs loaded": counters["inductor"]["fxgraph_cache_hit"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    out = sub.add_parser("export", help="boot, then write the compile bundle to DIR (a folder, or DIR.tar; default "
                                        "weights/compile-bundle.tar)")
    out.add_argument("dest", type=Path, metavar="DIR", nargs="?")
    args = parser.parse_args()
    if args.dest is None:
        from flux.folders import weights_dir

        args.dest = weights_dir() / "compile-bundle.tar"
    logging.getLogger("flux").setLevel(logging.INFO)
    print(json.dumps(export(args.dest), default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
