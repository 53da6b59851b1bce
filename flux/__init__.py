"""FLUX.1 image generation engine behind predict.py (plain Python; no cog here).

Importing this package first sets the environment that the libraries below it
read at import time:
  - PRUNA_METRICS_ENABLED=false: pruna's telemetry is on by default; this container never phones home.
  - HF_HUB_DISABLE_TELEMETRY=1: likewise for huggingface_hub; HF_HUB_DISABLE_PROGRESS_BARS=1 keeps logs readable.
  - TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR: the compile caches go to the working compile-cache folder
    (flux/folders.py). This must happen before torch._dynamo is imported (diffusers imports it at import time): its
    import resolves inductor's cache folder once and writes the default into the environment (torch 2.14,
    torch/_dynamo/package.py), after which setting these would change nothing.
Values already set in the environment win.
torchao's import logs "Skipping import of cpp extensions due to incompatible torch version": pruna 0.3.4 caps torchao
below 0.17, whose C++ extensions are built for an older torch. Nothing here uses them (go_fast's fp8 runs through
torch's _scaled_mm), so the line is noise that stays until pruna allows a newer torchao.
httpx logs every request's full URL at INFO, query string included (where signed URLs carry their
credentials): its logger is kept at WARNING so that no configuration of the root logger can print them.
"""

import logging as _logging
import os as _os

_os.environ.setdefault("PRUNA_METRICS_ENABLED", "false")
_os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
_os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # progress bars garble prediction logs
from .folders import compile_cache_dir as _compile_cache_dir  # noqa: E402  (no third-party imports)

_os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(_compile_cache_dir() / "inductor"))
_os.environ.setdefault("TRITON_CACHE_DIR", str(_compile_cache_dir() / "triton"))
_logging.getLogger("httpx").setLevel(_logging.WARNING)

from .errors import UserError  # noqa: E402

__all__ = ["UserError"]
