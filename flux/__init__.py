"""FLUX.1 image generation engine behind predict.py (plain Python; no cog here).

Importing this package first sets the environment that the libraries below it
read at import time:
  - PRUNA_METRICS_ENABLED=false: pruna's telemetry is on by default; this container never phones home.
  - HF_HUB_DISABLE_TELEMETRY=1: likewise for huggingface_hub; HF_HUB_DISABLE_PROGRESS_BARS=1 keeps logs readable.
  - LOCAL_KERNELS for bitsandbytes' CPU kernel: diffusers imports bitsandbytes, whose CPU backend would
    otherwise ask huggingface.co (at import time) whether a kernel publisher is trusted. We use no 4-bit
    CPU kernels, so it is pointed at a local path that does not exist and makes no network call.
  - TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR: inductor fixes its cache folder the first time anything
    compiles, and importing diffusers already compiles (it imports hqq), so the compile caches are placed in the
    working compile-cache folder (flux/folders.py) here, before anything imports diffusers.
Values already set in the environment win.
httpx logs every request's full URL at INFO, query string included (where signed URLs carry their
credentials): its logger is kept at WARNING so that no configuration of the root logger can print them.
"""

import logging as _logging
import os as _os

_os.environ.setdefault("PRUNA_METRICS_ENABLED", "false")
_os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
_os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # progress bars garble prediction logs
_os.environ.setdefault("LOCAL_KERNELS", "kernels-community/quantization-bitsandbytes=/nonexistent/no-hub-kernels")
from .folders import compile_cache_dir as _compile_cache_dir  # noqa: E402  (no third-party imports)

_os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(_compile_cache_dir() / "inductor"))
_os.environ.setdefault("TRITON_CACHE_DIR", str(_compile_cache_dir() / "triton"))
_logging.getLogger("bitsandbytes").setLevel(_logging.ERROR)
_logging.getLogger("httpx").setLevel(_logging.WARNING)

from .errors import UserError  # noqa: E402

__all__ = ["UserError"]
