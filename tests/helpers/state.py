"""A fingerprint of the state every request shares, to check that a request left nothing behind.

What one caller could change for the next lives in three places, and the fingerprint covers each:
  modules    the class of every module under every transformer the engine holds (bf16 and fp8 copies) and under
             both text encoders: a library that wraps a layer (PEFT's LoRA layers, its ModulesToSaveWrapper) shows
             here even when the weights are equal
  weights    a hash of every parameter and buffer of those modules, the LoRA targets included (tensor subclasses,
             such as torchao's fp8 weights, by their inner tensors)
  files      every file under the given folders (the LoRA cache, a server's TMPDIR): its path, size and content hash

Two fingerprints are equal when a request left the shared state as it found it. `diff` names what changed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch


def _tensor_digest(t: torch.Tensor, digest) -> None:
    """Feed a tensor's exact bits (shape, dtype, bytes) to `digest`; a wrapper subclass by its inner tensors."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        for name in names:
            _tensor_digest(getattr(t, name), digest)
        return
    t = t.detach()
    digest.update(f"{tuple(t.shape)}{t.dtype}".encode())
    if t.numel():
        digest.update(t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def _modules(engine) -> dict[str, torch.nn.Module]:
    pipe = engine.pipeline("dev", "txt2img")
    found = {"text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    found |= {f"transformer {name}": module for name, module in engine.residency.modules.items()}
    return found


def module_classes(module: torch.nn.Module) -> tuple[tuple[str, str], ...]:
    return tuple((name, f"{type(m).__module__}.{type(m).__qualname__}") for name, m in module.named_modules())


def weights_hash(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in (*module.named_parameters(), *module.named_buffers()):
        digest.update(name.encode())
        _tensor_digest(tensor, digest)
    return digest.hexdigest()


def files(folder: Path) -> tuple[tuple[str, int, str], ...]:
    """Every file (path, size, content hash) and folder (path ending in /) under `folder`."""
    folder = Path(folder)
    found = []
    for p in sorted(folder.rglob("*")) if folder.exists() else ():
        name = p.relative_to(folder).as_posix()
        if p.is_dir() and not p.is_symlink():
            found.append((name + "/", 0, ""))
        else:
            found.append((name, p.lstat().st_size, hashlib.sha256(p.read_bytes()).hexdigest()[:16] if p.is_file() else "?"))
    return tuple(found)


def fingerprint(engine, *folders: Path) -> dict[str, object]:
    """The shared state of an engine (and the files under `folders`), as comparable values."""
    state: dict[str, object] = {}
    for name, module in _modules(engine).items():
        state[f"{name}: modules"] = module_classes(module)
        state[f"{name}: weights"] = weights_hash(module)
    for folder in folders:
        state[f"files {folder}"] = files(folder)
    return state


def diff(before: dict, after: dict) -> list[str]:
    """What differs between two fingerprints, named (empty: equal)."""
    changed = []
    for key in sorted(set(before) | set(after)):
        if before.get(key) == after.get(key):
            continue
        if key.endswith(": modules") and key in before and key in after:
            old, new = dict(before[key]), dict(after[key])
            moved = sorted({n for n in set(old) | set(new) if old.get(n) != new.get(n)})
            changed.append(f"{key}: {', '.join(f'{n} {old.get(n)} -> {new.get(n)}' for n in moved[:3])}")
        else:
            changed.append(key)
    return changed
