"""What each weights source holds, what a boot would fetch of it and its size, and whether the layout the engine
loads holds, without downloading the data: a .tar's member headers by ranged reads, a Hugging Face repo's file
list, a folder's files, a single-file checkpoint's header (flux/survey.py). This is how a first GPU host checks the
defaults in seconds.

  script/weights-check                        the sources a GPU would use: the public defaults, or the settings
  script/weights-check --host URL             the same with every default on URL (FLUX_WEIGHTS_HOST): a mirror
  script/weights-check dev=https://x/f.tar safety=CompVis/stable-diffusion-safety-checker
                                              these sources; KIND is a FLUX variant (flux/variants.py), safety or
                                              safety-second; a SOURCE without KIND= is checked as dev's

It exits 0 only when every source holds. A loopback or private host needs FLUX_ALLOW_PRIVATE_URLS=1, as the server
does; a gated Hugging Face repo needs HF_TOKEN.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="script/weights-check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="*", metavar="[KIND=]SOURCE",
                        help="a source to check (default: every source a GPU would use)")
    parser.add_argument("--host", help="replaces the host of every default (FLUX_WEIGHTS_HOST)")
    args = parser.parse_args(argv)

    import flux  # noqa: F401  (library environment first)
    from flux import progress, survey, variants, weights

    kinds = (*variants.NAMES, weights.SAFETY, weights.SAFETY_SECOND)
    env = {**os.environ, **({"FLUX_WEIGHTS_HOST": args.host} if args.host else {})}
    if args.sources:
        checks = []
        for given in args.sources:
            kind, _, source = given.partition("=") if given.split("=")[0] in kinds else ("", "", given)
            checks.append((kind or variants.BASE.name, source, None))
    else:
        srcs = weights.sources(has_cuda=True, env=env)
        checks = [(name, source, None) for name, source in srcs.variants.items()]
        checks += [(kind, source, srcs.endpoints.get(kind)) for kind, source in
                   ((weights.SAFETY, srcs.safety), (weights.SAFETY_SECOND, srcs.safety_second)) if source]

    size = progress.human_bytes
    failed = 0
    for kind, source, endpoint in checks:
        found = survey.survey(source, kind, endpoint)
        print(f"{kind}: {weights.shown(source)} ({found.form})")
        if found.files:
            print(f"  holds {len(found.files)} files, {size(sum(found.files.values()))}")
        if found.fetched:
            print(f"  fetches {len(found.fetched)} files, {size(sum(found.fetched.values()))}: {_grouped(found.fetched)}")
            skipped = {f: n for f, n in found.files.items() if f not in found.fetched}
            if skipped:
                print(f"  skips {len(skipped)} files, {size(sum(skipped.values()))}: {_grouped(skipped)}")
        if found.problem:
            print(f"  DOES NOT HOLD: {found.problem}")
        elif found.missing:
            print(f"  DOES NOT HOLD: the layout needs {', '.join(found.missing)}, which it lacks")
        elif found.holds_what:
            print(f"  holds {found.holds_what}")
        else:
            print("  layout holds" + (f" ({', '.join(weights.LAYOUT[kind])})" if weights.LAYOUT[kind] else ""))
        failed += not found.holds
    print(f"{len(checks) - failed} of {len(checks)} sources hold" + (": OK" if not failed else ""))
    return 1 if failed else 0


def _grouped(files: dict[str, int]) -> str:
    """Files by their top folder: "transformer/ (3 files)", a file at the top by its name."""
    groups: dict[str, int] = defaultdict(int)
    for name in files:
        top, _, rest = name.partition("/")
        groups[f"{top}/" if rest else top] += 1
    return ", ".join(g if not g.endswith("/") else f"{g} ({n} file{'s' * (n > 1)})" for g, n in sorted(groups.items()))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
