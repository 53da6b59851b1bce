"""results.md: the rows as tables (each timing against both peers), setups, LoRA switches, offloading, the rest."""

from __future__ import annotations

from .names import PEERS


def markdown(rows: list[dict]) -> str:
    meta = rows[0]
    lines = [f"# script/benchmark gpu: {meta['model']}", "",
             f"{meta['device']}; {meta['software']}; {meta['size']}, {meta['steps']} steps, median of "
             f"{meta['repeats']} after one untimed call; deadline {meta['budget s']} s after the start", ""]
    if meta.get("note"):
        lines += [meta["note"], ""]
    lines += ["| contender | outputs | s per call | s per image | / bare diffusers | / diffusers-torchao | peak GPU GB "
              "| first call s | transformer | latents finite (std) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if r["kind"] == "timing"):
        ratios = []
        for peer in PEERS:
            ref = next((p for p in rows if p["kind"] == "timing" and p["name"] == peer
                        and p["outputs"] == r["outputs"]), None)
            ratios.append(f"{r['s'] / ref['s']:.3f}" if ref else "-")
        lines.append(f"| {r['name']} | {r['outputs']} | {r['s']:.3f} | {r['s'] / r['outputs']:.3f} | {ratios[0]} | "
                     f"{ratios[1]} | {r.get('peak GB', '-')} | {r['first s']:.1f} | {r.get('transformer', '-')} | "
                     f"{r['finite']} ({r['latent std']:.3g}) |")
    setups = [r for r in rows if r["kind"] == "setup"]
    if setups:
        lines += ["", "## Setup", "", "| engine | warmed | stage seconds | graphs compiled (kind: seconds each) |",
                  "|---|---|---|---|"]
        for r in setups:
            graphs = "; ".join(f"{k}: " + ", ".join(f"{s:.1f}" for s in v) for k, v in r["graphs"].items())
            lines.append(f"| {r['name']} | {r.get('warmed', '-')} | "
                         f"{', '.join(f'{k} {v:.1f}' for k, v in r['stages'].items())} | {graphs or 'none'} |")
    switches = [r for r in rows if r["kind"] == "lora"]
    if switches:
        lines += ["", "## LoRA switch (from the disk cache)", "",
                  "| path | rank | switch s | prediction right after s | recompiled |", "|---|---|---|---|---|"]
        lines += [f"| {r['path']} | {r['rank']} | {r['switch s']:.3f} | {r['prediction s']:.3f} | {r['recompiled']} |"
                  for r in switches]
    moves = [r for r in rows if r["kind"] == "offload"]
    if moves:
        lines += ["", "## Offloading (the memory plan's cost model)", "",
                  "| what | GB moved | s | s over resident | GB/s |", "|---|---|---|---|---|"]
        lines += [f"| {r['name']} | {r['GB']:.2f} | {r['s']:.3f} | {r.get('extra s', '-')} | {r.get('GB/s', '-')} |"
                  for r in moves]
    other = [r for r in rows if r["kind"] in ("boot", "skipped", "error", "not available", "stopped")]
    if other:
        lines += ["", "## Boot, skipped sections, errors, options not available here", ""]
        lines += ["- " + ", ".join(f"{k}: {v}" for k, v in r.items() if k not in ("at s", "software")) for r in other]
    done = [r for r in rows if r["kind"] == "done"]
    if done:
        lines += ["", f"Run ended {done[-1]['elapsed s']} s after the start."]
    return "\n".join(lines) + "\n"
