"""GPU memory: one plan for every budget (what stays on the GPU, what moves and how), and the residency of the
transformers that may move.

The plan (`plan()`) is the one place the rules live: setup follows it (flux/engine) and `script/memory-plan` prints
it for a GPU size without loading anything (the full-size model on the meta device). It places each component:

  gpu              resident: on the GPU from setup (a variant loaded on first use: from its first request) and kept
                   there
  gpu, on demand   on the GPU while requests use it; moved whole to the CPU, least recently used first, when a
                   request needs the room (variants loaded on first use, on GPUs that cannot keep them beside the base)
  cpu, streamed    kept in CPU memory and brought to the GPU one block at a time while it runs, the next block copied
                   on a CUDA stream while the current one computes: diffusers' group offloading (T5, for each prompt)
  cpu              kept in CPU memory, never run on this GPU: a bf16 transformer that does not fit beside its fp8 copy
                   stays there as the source its fp8 copy is quantized from (LoRAs are fused into it); requests
                   without go_fast run the fp8 copy, and their log says so

in this order, each only if what is already placed leaves the room a request needs (`working`: 1 output at 1 MP):
the shared small models (CLIP, the VAE, the safety checkers) and go_fast's fp8 copy of the base variant (FLUX.1-dev:
the path every GPU runs), then its bf16 transformer, then T5, then each variant loaded on first use and its fp8 copy
(flux/variants.py, in table order), which are resident only where they fit beside everything with the room of the
largest request (4 outputs at 1440x1440 in a speed mode with true CFG: activations plus the step cache's copy of
every block's output for both passes: block_outputs_bytes). A request that needs more room than the plan
kept moves the least recently used "on demand" transformers out first, then resident ones (`Residency`); a batch that
still does not fit runs one output at a time (flux/engine).

Sizes here are in GB of 2**30 bytes, as nvidia-smi and torch count a GPU's memory (an "80 GB" H100 reports 79.2, a
"24 GB" L4 22.0).

FLUX.1-dev on the full-size meta model (tests/test_memory.py): CLIP 0.23, VAE 0.16, both safety checkers 0.73,
T5 8.87, dev 22.17, fp8 dev 11.10 (a variant without guidance 0.02 less). On 80 GB dev, fp8 dev and T5 are
resident and the other variants on demand; on an A100 40GB or an L40S (39.6 and 44.4) dev and fp8 dev are resident
and T5 is streamed (an RTX A6000, 47.5, keeps T5 too); on 24 GB cards only fp8 dev is: go_fast is the path that
runs, T5 is streamed (8.87 GB cross PCIe per prompt, about 0.4 s at PCIe 4.0 x16) and bf16 dev stays in CPU memory.
`script/memory-plan --gpu-gb N` prints the plan for any size.

CPU memory holds what the plan keeps off the GPU and the variants loaded on first use that are not on it, within
FLUX_HOST_MEMORY_GB (the machine's RAM less 8 GB): `host_floor` is what the base variant needs there; the variants
share the rest, and where one would not fit the least recently used is dropped and read again from disk on its next
request (flux/engine/transformers.py). A machine with less than `host_floor` gets a warning at setup.

Setup never holds two bf16 transformers on the GPU: the fp8 copy is quantized one block at a time from bf16 dev
wherever it lives (flux/speed/fp8.py: fp8_transformer), so setup's peak is the resident set plus one bf16 block (0.63).
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass

import torch

from . import variants
from .limits import GiB
from .errors import UserError

log = logging.getLogger(__name__)

BASE_RESERVE_BYTES = 2 * GiB  # CUDA context, cuBLAS/cuDNN workspaces, compile scratch, allocator slack
# Activations of the transformer and the VAE decode per output pixel (bf16): 8 GiB in all at 1440x1440 x4 outputs.
# To be calibrated by `script/benchmark gpu` (peak memory).
ACTIVATION_BYTES_PER_PIXEL = 780
# The smallest GPU served: cards sold as 24 GB report 22.0 GiB (L4, A10G) to 23.7 (RTX 4090); cards sold as 20 GB
# report under 20.
MIN_GPU_BYTES = 21 * GiB
MIN_GPU_SHOWN = "24 GB (L4, A10G, RTX 3090 or 4090, or larger)"

GPU, ON_DEMAND, STREAMED, CPU = "gpu", "gpu, on demand", "cpu, streamed", "cpu"
# Every FLUX variant's bf16 transformer and its fp8 copy (flux/variants.py, in table order), then the shared models.
COMPONENTS = (*variants.transformer_names(), "text_encoder", "text_encoder_2", "vae", "safety")
ON_FIRST_USE = tuple(n for v in variants.ON_FIRST_USE for n in (v.name, v.fp8))  # placed from their first request
SHARED = ("text_encoder", "vae", "safety")  # small, used by every request: always resident
T5 = "text_encoder_2"
# The largest request: 4 outputs at 1440x1440 (custom size), a speed mode that caches, true CFG (two passes cached).
# Kontext reads its image's tokens beside the output's, up to twice the pixels: the plan does not keep room for that
# rare request (it would leave the other variants off an H200); its room is made when it comes (the engine's
# `working_bytes` counts its pixels), moving transformers out, or it runs one output at a time.
LARGEST = dict(width=1440, height=1440, outputs=4, passes=2, text_tokens=512)


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes a module's parameters and buffers hold, each storage once (fused projections make the separate q, k,
    v weights views into the fused ones); fp8 tensors count their data and scales."""
    seen: set[tuple] = set()
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        inner = getattr(tensor, "__tensor_flatten__", None)
        for part in [getattr(tensor, name) for name in inner()[0]] if inner else [tensor]:
            if part.device.type == "meta":
                total += part.numel() * part.element_size()
                continue
            storage = part.untyped_storage()
            key = (storage.data_ptr(), part.device.type, part.device.index)
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
    return total


def fp8_bytes(transformer: torch.nn.Module) -> int:
    """What a transformer takes once go_fast quantizes it (works on the meta device, for planning): each linear
    layer torchao puts in fp8 (both sides multiples of 16) holds one byte a weight plus a float32 scale per row."""
    total = module_bytes(transformer)
    for layer in transformer.modules():
        if isinstance(layer, torch.nn.Linear) and layer.in_features % 16 == 0 and layer.out_features % 16 == 0:
            weight = layer.weight
            total -= weight.numel() * weight.element_size() - weight.numel() - 4 * layer.out_features
    return total


def activation_bytes(width: int, height: int, batch: int) -> int:
    """The room a request's activations and VAE decode need on the GPU (an estimate; see the constants)."""
    return BASE_RESERVE_BYTES + batch * width * height * ACTIVATION_BYTES_PER_PIXEL


def block_outputs_bytes(config, width: int, height: int, batch: int, text_tokens: int, element_size: int = 2) -> int:
    """Every transformer block's output for one pass, as a step cache keeps them until the call returns (FORA:
    flux/speed/step_cache.py): per block, the text and image tokens at the inner width (the single-stream blocks
    return slices of one such tensor, which keep all of it alive). What the plan keeps room for per cached pass: a
    step cache that holds more says so in its `holds_bytes`, and the plan must count that instead."""
    config = dict(config)
    blocks = config["num_layers"] + config["num_single_layers"]
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    image_tokens = (width // 16) * (height // 16)
    return blocks * batch * (text_tokens + image_tokens) * inner * element_size


def free() -> None:
    """Give back what dropped references held, cached GPU memory too (after an out-of-memory error, a dropped
    variant)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def gb(nbytes: int | float) -> float:
    return nbytes / GiB


# ----- the plan -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """What the plan is made from: each component's bytes, and the room requests and setup need beside them."""

    bytes: dict[str, int]  # each of COMPONENTS
    block: int  # the largest transformer block in bf16: what building the fp8 copy adds for a moment
    streamed: int  # what T5 holds on the GPU while streamed: what it keeps out of its blocks, and two blocks
    working: int  # the room of the planned request: 1 output at 1 MP, no speed mode
    largest: int  # the room of the largest request (LARGEST)

    @classmethod
    def of(cls, transformer, text_encoder, text_encoder_2, vae, safety=(), streams: bool = True) -> "Sizes":
        """Sizes of loaded components, or of the full-size model on the meta device. `transformer` is the base
        variant's; every other variant's is its architecture (`like`), counted on the meta device.
        streams: T5 streamed on a CUDA stream holds its next block too."""
        t5_blocks = [module_bytes(b) for b in text_encoder_2.encoder.block]
        element = next(transformer.parameters()).element_size()
        big = LARGEST
        largest = activation_bytes(big["width"], big["height"], big["outputs"]) + big["passes"] * block_outputs_bytes(
            transformer.config, big["width"], big["height"], big["outputs"], big["text_tokens"], element)
        transformers = {}
        for variant in variants.VARIANTS.values():
            model = transformer if variant is variants.BASE else like(transformer, variant)
            transformers.update({variant.name: module_bytes(model), variant.fp8: fp8_bytes(model)})
        return cls(
            bytes={
                **transformers,
                "text_encoder": module_bytes(text_encoder), T5: module_bytes(text_encoder_2),
                "vae": module_bytes(vae), "safety": sum(module_bytes(m) for m in safety),
            },
            block=block_bytes(transformer),
            streamed=module_bytes(text_encoder_2) - sum(t5_blocks) + (2 if streams else 1) * max(t5_blocks),
            working=activation_bytes(1024, 1024, 1),
            largest=largest,
        )


def block_bytes(transformer) -> int:
    """The largest block of a FLUX transformer: what quantizing it a block at a time adds for a moment."""
    return max(module_bytes(b) for b in (*transformer.transformer_blocks, *transformer.single_transformer_blocks))


def like(transformer, variant: variants.Variant) -> torch.nn.Module:
    """A variant's transformer for sizing: the base's architecture with the variant's guidance embedder (or none) and
    input channels, on the meta device, in the base's dtype."""
    from diffusers import FluxTransformer2DModel

    packed = transformer.config.out_channels or transformer.config.in_channels
    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config({**transformer.config, "guidance_embeds": variant.guidance,
                                                    "in_channels": variant.in_channels(packed), "out_channels": packed})
    return model.to(next(transformer.parameters()).dtype)


@dataclass(frozen=True)
class Placement:
    name: str
    bytes: int
    where: str
    moves: int = 0  # bytes a default request moves between CPU and GPU for this component
    note: str = ""


@dataclass(frozen=True)
class Plan:
    budget: int  # bytes of GPU memory this container may use
    sizes: Sizes
    placements: dict[str, Placement]
    problem: str | None = None  # why it does not fit; None: it fits

    @property
    def fits(self) -> bool:
        return self.problem is None

    def where(self, name: str) -> str:
        return self.placements[name].where

    @property
    def resident(self) -> list[str]:
        return [n for n, p in self.placements.items() if p.where == GPU]

    @property
    def offloaded(self) -> list[str]:
        return [n for n, p in self.placements.items() if p.where != GPU]

    @property
    def shared_gpu(self) -> int:
        """What the shared components hold on the GPU (T5's share while streamed): outside the transformers' budget."""
        return sum(self.sizes.bytes[n] for n in SHARED) + (
            self.sizes.bytes[T5] if self.where(T5) == GPU else self.sizes.streamed)

    @property
    def setup_peak(self) -> int:
        """setup's GPU peak: what it places (every resident component but the transformers of the variants loaded on
        first use), plus the bf16 block being quantized into the fp8 copy."""
        return sum(p.bytes for n, p in self.placements.items()
                   if p.where == GPU and n not in ON_FIRST_USE) + self.sizes.block

    @property
    def host_bytes(self) -> int:
        """What the plan keeps in CPU memory once everything has been used: every component not resident."""
        return sum(p.bytes for p in self.placements.values() if p.where != GPU)

    @property
    def host_floor(self) -> int:
        """What the base variant needs in CPU memory: the components the plan keeps off the GPU (the variants loaded
        on first use aside), and room for its fp8 copy when a request moves it out."""
        return sum(p.bytes for n, p in self.placements.items() if p.where != GPU and n not in ON_FIRST_USE) + \
            self.placements[variants.BASE.fp8].bytes

    @property
    def per_request_moves(self) -> int:
        """Bytes the default request (1 output at 1 MP, dev, no go_fast) moves between CPU and GPU."""
        return sum(p.moves for p in self.placements.values())

    def summary(self) -> dict:
        """The plan in numbers (script/memory-plan --json)."""
        return {"fits": self.fits, "setup_peak_gb": round(gb(self.setup_peak), 2), "resident": self.resident,
                "offloaded": self.offloaded, "per_request_moves_gb": round(gb(self.per_request_moves), 2)}

    def table(self) -> str:
        """The plan as setup logs it: component, size, where, what a default request moves; then the room kept for
        requests, setup's peak and the verdict. Sizes in GB (MB for the tiny model)."""
        unit, name = (GiB, "GB") if max(self.sizes.bytes.values()) >= GiB // 10 else (1024**2, "MB")
        rows = [f"{'component':<15} {name:>6}  {'where':<15} {'per request':<12} note"]
        for p in self.placements.values():
            moved = f"{p.moves / unit:.2f} {name}" if p.moves else "-"
            rows.append(f"{p.name:<15} {p.bytes / unit:>6.2f}  {p.where:<15} {moved:<12} {p.note}".rstrip())
        s = self.sizes
        rows.append(f"room kept for a request: {gb(s.working):.2f} GB (1 output at 1 MP); the largest request "
                    f"(4 x 1440x1440, a speed mode, true CFG) needs {gb(s.largest):.2f} GB, made by moving transformers "
                    "out (\"on demand\" first, least recently used first)")
        rows.append(f"setup peak {self.setup_peak / unit:.2f} {name}; a default request moves "
                    f"{self.per_request_moves / unit:.2f} {name}; CPU memory kept {self.host_bytes / unit:.2f} {name}; "
                    f"budget {gb(self.budget):.1f} GB: "
                    + ("fits" if self.fits else f"does not fit: {self.problem}"))
        return "\n".join(rows)


def plan(budget: int, sizes: Sizes, floor: int = MIN_GPU_BYTES) -> Plan:
    """Where each component lives with `budget` bytes of GPU memory (the rules: this module's docstring). floor: the
    smallest budget served (0 for the tiny model on a CPU, where a budget is simulated)."""
    b = sizes.bytes
    placed: dict[str, Placement] = {}

    def put(name: str, where: str, note: str = "", moves: int = 0) -> None:
        placed[name] = Placement(name, b[name], where, moves, note)

    base = variants.BASE
    used = sum(b[n] for n in SHARED) + b[base.fp8]

    def room(extra: int, reserve: int) -> bool:
        return used + extra + reserve <= budget

    if room(b[base.name], sizes.working):
        put(base.name, GPU)
        used += b[base.name]
    else:
        put(base.name, CPU, "bf16 does not fit beside its fp8 copy: requests without go_fast run "
                            f"{base.fp8}")
    put(base.fp8, GPU, "go_fast" if placed[base.name].where == GPU else f"go_fast, and every {base.name} request")
    if room(b[T5], sizes.working):
        put(T5, GPU)
        used += b[T5]
    else:
        put(T5, STREAMED, "T5 to the GPU one block at a time for each prompt", moves=b[T5])
        used += sizes.streamed
    for variant in variants.ON_FIRST_USE:  # in table order, each where it fits beside the largest request
        for name in (variant.name, variant.fp8):
            if name == variant.name and placed[base.name].where == CPU:
                put(name, CPU, f"like {base.name}: requests without go_fast run {variant.fp8}")
            elif room(b[name], sizes.largest):
                put(name, GPU, "from its first request")
                used += b[name]
            else:
                put(name, ON_DEMAND, "from its first request; moved out when a request needs the room")
    for name in SHARED:
        put(name, GPU)
    minimum = sum(b[n] for n in SHARED) + b[base.fp8] + sizes.streamed + sizes.working
    problem = None
    if budget < floor:
        problem = f"{base.title} needs a GPU of {MIN_GPU_SHOWN}"
    elif minimum > budget:
        problem = f"the smallest plan (fp8 {base.name}, T5 streamed) needs {gb(minimum):.2f} GB"
    return Plan(budget, sizes, {n: placed[n] for n in COMPONENTS}, problem)


def budget(device: torch.device, limit: int | None) -> int | None:
    """The GPU memory this container plans with: the GPU's, or FLUX_GPU_MEMORY_GB's cap (checked against it in
    flux/settings.py); on a CPU only a cap given in the settings (a simulated GPU, for the tests), else None."""
    if device.type != "cuda":
        return limit
    total = torch.cuda.get_device_properties(device).total_memory
    free, _ = torch.cuda.mem_get_info(device)
    chosen = total if limit is None else limit
    if free + BASE_RESERVE_BYTES < chosen:
        log.warning("memory: %.1f GB of this GPU are in use by other processes: set FLUX_GPU_MEMORY_GB to what this "
                    "container may use (%.1f GB are free)", gb(total - free), gb(free))
    return chosen


def check_host(plan_: Plan, host: int) -> None:
    """What CPU memory (`host` bytes for weights: FLUX_HOST_MEMORY_GB, or the machine's RAM less 8 GB) means for this
    plan: a warning where the base variant's share does not fit, a note where the variants loaded on first use will
    take turns."""
    if host < plan_.host_floor:
        log.warning("memory: %.1f GB of CPU memory for weights (the machine's RAM less 8 GB, or FLUX_HOST_MEMORY_GB) "
                    "is less than the %.1f GB the plan keeps there for %s (and a LoRA keeps the originals of the "
                    "weights it changes): it may run out of RAM", gb(host), gb(plan_.host_floor),
                    variants.BASE.title)
    elif host < plan_.host_bytes:
        log.info("memory: %.1f GB of CPU memory for weights: the variants loaded on first use take turns in the "
                 "%.1f GB beside %s's share (the least recently used dropped, and read again from disk on its next "
                 "request)", gb(host), gb(host - plan_.host_floor), variants.BASE.title)


def refuse(plan_: Plan, device: torch.device) -> None:
    """A setup error for a plan that does not fit, naming the minimum."""
    if plan_.fits:
        return
    what = "This GPU" if device.type == "cuda" else "The simulated GPU (FLUX_GPU_MEMORY_GB)"
    raise UserError(f"{what} gives this container {gb(plan_.budget):.2f} GB; {plan_.problem}. Run on a GPU of "
                    f"{MIN_GPU_SHOWN}, or raise FLUX_GPU_MEMORY_GB if it caps the budget.")


# ----- offloading --------------------------------------------------------------------------------------------------


def stream(text_encoder_2, device: torch.device) -> None:
    """T5 kept in CPU memory and streamed to `device` one encoder block at a time while it runs: diffusers' group
    offloading, the next block copied on a CUDA stream (from pinned memory) while the current one computes."""
    from diffusers.hooks import apply_group_offloading

    apply_group_offloading(text_encoder_2, onload_device=device, offload_device=torch.device("cpu"),
                           offload_type="block_level", num_blocks_per_group=1, use_stream=device.type == "cuda",
                           block_modules=["encoder"])
