"""What each section holds on the GPU at its peak, from the model's meta-device sizes (--plan)."""

from __future__ import annotations




def memory_needs(sizes, transformer_config, width: int, height: int) -> dict[str, int]:
    """Bytes each kind of section adds on the GPU at its peak to what stays there all run (T5, CLIP and the shared
    VAE: `base`), computed from flux/memory.py's Sizes (the full-size model on the meta device, or the tiny one)."""
    from flux import memory
    from flux.speed import step_cache

    b = sizes.bytes

    def act(n: int) -> int:
        return memory.activation_bytes(width, height, n)

    def fora(n: int) -> int:
        return step_cache.holds_bytes(transformer_config, width, height, n, 512)

    engine = b["dev"] + b["dev-fp8"] + b["vae"]  # ours: its bf16 copy, the fp8 copy, its own VAE
    return {
        "base": b["text_encoder"] + b["text_encoder_2"] + b["vae"],
        "bare": b["dev"] + act(1),
        "ours setup": engine + sizes.block + act(1),
        "ours row": engine + act(1) + fora(1),
        "torchao": b["dev"] + b["vae"] + act(1),  # its bf16 copy before quantize_ shrinks it to fp8 in place
        "ours 4": engine + act(4) + fora(4),
        "bare 4": b["dev"] + act(4),
        "torchao 4": b["dev"] + b["vae"] + act(4),
        "offload": b["dev"] + b["dev-fp8"] + sizes.block,  # a bf16 source and the fp8 copy made from it
        "boot": engine + sizes.block + act(1),  # the child's own engine; the parent holds nothing then
    }


PLAN_ROWS = (  # (section, need key, whether the run's base stays on the GPU beside it)
    ("bare diffusers, 1 output", "bare", True), ("ours: setup", "ours setup", True),
    ("ours, 1 output (Juiced: FORA's cache)", "ours row", True), ("diffusers-torchao, 1 output", "torchao", True),
    ("LoRA switch", "ours row", True), ("4 outputs: ours (Juiced)", "ours 4", True),
    ("4 outputs: bare diffusers", "bare 4", True), ("4 outputs: diffusers-torchao", "torchao 4", True),
    ("other speed modes", "ours row", True), ("offload", "offload", True), ("switch: ...", "ours setup", True),
    ("boot (a fresh process; this one has released its memory)", "boot", False),
)


def plan_table(gpus_gib=(78, 139)) -> str:
    """What each section holds on the GPU at its peak (full-size FLUX.1-dev, 1024x1024), and whether it fits."""
    import torch

    from flux import memory
    from flux.fakes import fullsize

    sizes = fullsize.plan_sizes(torch.bfloat16)
    needs = memory_needs(sizes, fullsize.TRANSFORMER, 1024, 1024)
    gib = memory.GiB
    lines = [f"shared all run (T5, CLIP, VAE): {needs['base'] / gib:.2f} GiB; bf16 transformer "
             f"{sizes.bytes['dev'] / gib:.2f}, fp8 copy {sizes.bytes['dev-fp8'] / gib:.2f}, largest block "
             f"{sizes.block / gib:.2f} (GiB, the meta-device sizes of flux/fakes/fullsize.py)", "",
             "| section | holds at its peak (GiB) | " + " | ".join(f"{g} GiB" for g in gpus_gib) + " |",
             "|---|---|" + "---|" * len(gpus_gib)]
    for section, key, with_base in PLAN_ROWS:
        text_encoders = sizes.bytes["text_encoder"] + sizes.bytes["text_encoder_2"]
        held = needs[key] + (needs["base"] if with_base else text_encoders)
        lines.append(f"| {section} | {held / gib:.1f} | "
                     + " | ".join("fits" if held <= g * gib else "skipped (does not fit)" for g in gpus_gib) + " |")
    return "\n".join(lines) + "\n"
