"""Whether this machine's NVIDIA GPU can be used, and a setup error that says why not.

The pinned torch 2.14.1 wheels are CUDA 13.0 builds, which need an NVIDIA driver of 580 or newer. With an older
driver torch says only that CUDA is not available (and warns once); setup would then fall back to the tiny model or
fail later with a CUDA traceback. Instead: when torch cannot use CUDA but `nvidia-smi` answers, the driver is read
from it and the requirement named.
"""

from __future__ import annotations

import logging
import shutil
import subprocess

from .errors import UserError

log = logging.getLogger(__name__)

MIN_DRIVER = 580  # CUDA 13.0's minimum (the pinned torch wheels are cu130 builds)


class GpuError(UserError):
    """A GPU is present but cannot be used; the message says what to change."""


def driver_version() -> str | None:
    """The NVIDIA driver version nvidia-smi reports, or None when there is no nvidia-smi (no NVIDIA driver)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        done = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("gpu: nvidia-smi did not answer (%s)", type(exc).__name__)
        return None
    versions = [line.strip() for line in done.stdout.splitlines() if line.strip()]
    return versions[0] if done.returncode == 0 and versions else None


def cuda_available() -> bool:
    """True when torch can use the GPU; False on a machine with no NVIDIA driver; a GpuError when a driver is there
    but torch cannot use it (too old for CUDA 13, or another reason, named)."""
    import torch

    if torch.cuda.is_available():
        return True
    driver = driver_version()
    if driver is None:
        return False
    cuda = torch.version.cuda or "the CUDA it was built for"
    try:
        major = int(driver.split(".")[0])
    except ValueError:
        major = None
    if major is not None and major < MIN_DRIVER:
        raise GpuError(f"This machine's NVIDIA driver is {driver}; the image's torch {torch.__version__} is built for "
                       f"CUDA {cuda}, which needs driver {MIN_DRIVER} or newer. Update the NVIDIA driver (README, "
                       "\"Deploy to Replicate\": supported drivers and GPUs).")
    raise GpuError(f"An NVIDIA driver ({driver}) is installed but torch {torch.__version__} (CUDA {cuda}) cannot use "
                   "the GPU: check that the container was started with GPU access (docker run --gpus all) and that "
                   "nvidia-smi lists the GPU.")
