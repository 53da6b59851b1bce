"""LoRAs, from a caller's reference to weights fused into the serving model: one module per reason to change.

  hosts.py     references (Replicate, Hugging Face, CivitAI, https URLs, data: URIs), one class per host, located
  tokens.py    the credentials sent to hosts (a request's own, else the container's)
  sources.py   references fetched into the on-disk cache; only a file that reads as a LoRA enters it
  archives.py  a download unpacked to its one .safetensors (a .tar or a .zip read as a stream, capped while reading)
  formats.py   a LoRA file read as per-layer factors, each checked before any weight changes
  layouts.py   the layouts read, one class each (detection and reading), in the order they are tried
  keymaps.py   BFL's and LyCORIS' key names mapped to diffusers' modules
  scaling.py   a low-rank pair's scale as PEFT gives it (adapter metadata, alpha tensors)
  delta.py     per-layer factors (`Delta`: ΔW's maths) and a LoRA as them (`LoraWeights`)
  fuse.py      ΔW added to the serving weights in place and restored exactly (`LoraManager`); go_fast's fp8 copy kept
               in step (`Fp8Twin`)

lora_loader.py, beside predict.py, is the package's face (the names the design card and the tests use). The names
every module here shares are below.
"""

from __future__ import annotations

from ..errors import UserError

SAFETENSORS = ".safetensors"
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
WHAT = "LoRA"  # how downloads name what they fetch


class LoraError(UserError):
    """A LoRA could not be fetched or used; the message says what to change."""


def short(text: str, limit: int = 80) -> str:
    """A name from a file, cut to a length a message can carry."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def listing(names: list[str], limit: int = 8) -> str:
    if not names:
        return "nothing"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(short(n) for n in names[:limit]) + more


def pickle_message(shown: str) -> str:
    return (f"{shown} is a pickle checkpoint (.bin/.ckpt/.pt), which is never loaded because it can run code. "
            "Use the LoRA's .safetensors file.")
