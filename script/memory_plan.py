"""The GPU memory plan of the full-size FLUX.1-dev for a GPU of N GB, before deploying: which components stay on
the GPU, which are streamed or kept in CPU memory, what setup's peak is and what each request moves across PCIe.

  script/memory-plan --gpu-gb 24          the plan as a table, as setup() logs it on such a GPU
  script/memory-plan --gpu-gb 24 --json   the same, and a last line of JSON:
                                          {"fits", "setup_peak_gb", "resident", "offloaded", "per_request_moves_gb"}

It plans with the rules setup() follows (flux/memory.py: plan), on the full-size architecture built on the meta
device: no weights are read, no GPU is needed, it takes seconds. GB are 2**30 bytes, as nvidia-smi counts them:
pass the total nvidia-smi shows (an L4 shows 22.5, of which torch reports 22.0; a 24 GB RTX 4090 reports 23.6), or
what FLUX_GPU_MEMORY_GB will cap it at. It exits 0 when the plan fits, 1 when it does not.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="script/memory-plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu-gb", type=float, required=True, help="the GPU memory to plan with, in GB (2**30 bytes)")
    parser.add_argument("--json", action="store_true", help="end with the plan's summary as one line of JSON")
    args = parser.parse_args(argv)
    if not args.gpu_gb > 0:
        parser.error("--gpu-gb must be a positive number of GB, e.g. 24")

    import flux  # noqa: F401  (library environment first)
    from flux import memory
    from flux.fakes import fullsize

    plan = memory.plan(int(args.gpu_gb * memory.GiB), fullsize.plan_sizes())
    print(f"FLUX.1-dev on {args.gpu_gb:g} GB of GPU memory:")
    print(plan.table())
    if args.json:
        print(json.dumps(plan.summary()))
    return 0 if plan.fits else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
