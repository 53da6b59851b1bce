"""What the run measures: its contenders' rows, the order of its sections, and the request they share."""

from __future__ import annotations




PROMPT = "a knitted purple prune on a wooden table, studio light, 85mm"

SEED = 1

BARE, TORCHAO = "diffusers bf16 eager", "diffusers-torchao fp8 compiled"

PEERS = (BARE, TORCHAO)

LIGHTLY, JUICED = "Lightly Juiced 🍊 (more consistent)", "Juiced 🔥 (default)"

EXTRA, BLINK = "Extra Juiced 🔥 (more speed)", "Blink of an eye 👁️"

KEY = (  # (row name, request inputs): measured right after setup
    ("bf16 compiled", {}),
    ("go_fast", {"go_fast": True}),
    ("Juiced, go_fast", {"speed_mode": JUICED, "go_fast": True}),
    ("Blink of an eye", {"speed_mode": BLINK}),
)

OTHER_MODES = (
    ("Lightly Juiced, bf16", {"speed_mode": LIGHTLY}),
    ("Juiced, bf16", {"speed_mode": JUICED}),
    ("Lightly Juiced, go_fast", {"speed_mode": LIGHTLY, "go_fast": True}),
    ("Extra Juiced", {"speed_mode": EXTRA}),
)

OURS = KEY + OTHER_MODES

LORA_STEPS = ((16, True), (16, False), (64, True), (64, False))  # (rank, go_fast)

# The sections' groups, in the order they run (a section's name starts with its group's).
GROUPS = ("bare diffusers, 1 output", "ours: setup", "ours, 1 output", "diffusers-torchao, 1 output", "LoRA switch",
          "4 outputs", "other speed modes", "offload", "switch", "boot")

FAIL_ENV = "FLUX_BENCHMARK_FAIL"

TORCHAO_MODES = ("auto", "default", "max-autotune")
