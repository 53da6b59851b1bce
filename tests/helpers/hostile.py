"""What a hostile or careless caller sends: LoRA files, archives and metadata that must be refused (or used) without
changing what the next caller gets. Each builder returns the bytes of a file for the tiny FLUX.

The cases of the outside probe (issue 18) and a broader set of the same kinds: adapter metadata that would configure
PEFT (modules_to_save, a rank of 0, unknown fields, DoRA, values that are no numbers, JSON that is no JSON), tensors
that are not finite, of rank 0, of an integer dtype, full weights among the LoRA's, alphas that overflow, and
archives (a .tar.gz of 60,000 empty members, a zip).
"""

from __future__ import annotations

import functools
import gzip
import io
import json
import tarfile
import zipfile

import torch

from tests.helpers import loras


def _metadata(update: loras.Update, change) -> bytes:
    """The update in diffusers' layout with its adapter metadata (the JSON in the safetensors header) changed."""
    tensors, header = loras.diffusers_layout(update)
    config = json.loads(header["lora_adapter_metadata"])
    text = change(config)
    header = {**header, "lora_adapter_metadata": text if isinstance(text, str) else json.dumps(config)}
    return loras.safetensors_bytes(tensors, header)


def metadata_fields(update: loras.Update, **fields) -> bytes:
    """Set transformer.<field> = value for each field in the adapter metadata."""
    return _metadata(update, lambda config: config.update({f"transformer.{k}": v for k, v in fields.items()}))


def metadata_text(update: loras.Update, text: str) -> bytes:
    """The adapter metadata replaced by this text (not JSON, or JSON of the wrong shape)."""
    return _metadata(update, lambda config: text)


def tensors_changed(update: loras.Update, change, layout: str = "ai-toolkit") -> bytes:
    """The update in a layout, its tensors dict changed in place by `change` (which may add or replace keys)."""
    tensors, header = loras.LAYOUTS[layout](update)
    change(tensors)
    return loras.safetensors_bytes(tensors, header)


def _first(tensors: dict, suffix: str) -> str:
    return next(k for k in sorted(tensors) if k.endswith(suffix))


def poisoned(tensors: dict, suffix: str, value: float) -> None:
    """One element of the first tensor whose key ends with suffix set to value (NaN, inf)."""
    key = _first(tensors, suffix)
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = value


def rank_zero(tensors: dict) -> None:
    for key in [k for k in tensors if k.endswith(".lora_A.weight")]:
        tensors[key] = torch.zeros(0, tensors[key].shape[1])
        b = key.replace(".lora_A.", ".lora_B.")
        tensors[b] = torch.zeros(tensors[b].shape[0], 0)


def integers(tensors: dict) -> None:
    key = _first(tensors, ".lora_A.weight")
    tensors[key] = (tensors[key] * 100).to(torch.int32)


def targz_of_empty_members(count: int, lora: bytes | None = None) -> bytes:
    """A .tar.gz of `count` empty files (a few hundred KB that take long to unpack), then the LoRA if given."""
    body = _empty_members(count)
    if lora is not None:
        info = tarfile.TarInfo("lora.safetensors")
        info.size = len(lora)
        body += _header(info) + lora + bytes(-len(lora) % tarfile.BLOCKSIZE)
    return gzip.compress(body + bytes(2 * tarfile.BLOCKSIZE), mtime=0)  # the end of the archive: two empty blocks


@functools.lru_cache(maxsize=2)
def _empty_members(count: int) -> bytes:
    """The headers of `count` empty files, as tarfile writes them (built once a session: several tests use 60,000)."""
    return b"".join(_header(tarfile.TarInfo(f"empty/{i}.txt")) for i in range(count))


def _header(info: tarfile.TarInfo) -> bytes:
    return info.tobuf(tarfile.DEFAULT_FORMAT, tarfile.ENCODING, "surrogateescape")


def zip_of(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, body in files.items():
            z.writestr(name, body)
    return buf.getvalue()


def torch_zip_checkpoint() -> bytes:
    """What torch.save writes: a zip holding a pickle (data.pkl). Never loaded."""
    buf = io.BytesIO()
    torch.save({"lora_A": torch.zeros(2, 2)}, buf)
    return buf.getvalue()


# Library exception names, and words of their messages, that no message to a caller may carry.
LIBRARY_WORDS = ("Error:", "KeyError", "RuntimeError", "ValueError", "TypeError", "AttributeError", "IndexError",
                 "JSONDecodeError", "SafetensorError", "LoraConfig", "httpx", "TooManyRedirects",
                 "DecodingError", "ReadError", "TarError", "BadZipFile", "zlib", "Traceback", "Errno", "torch.",
                 "tensor(", "should be a positive integer", "could not be instantiated", "meta device", "device='meta'")


def library_words(message: str) -> list[str]:
    """The library words a message to a caller carries (empty: it is in our words)."""
    return [w for w in LIBRARY_WORDS if w in message]
