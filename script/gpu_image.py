"""The lent GPU machine's image, as far as it is known, and a CPU mirror of it.

The workplace's nvidia-h100-x1 / nvidia-h200 image ('cuda'): Python 3.12 with torch 2.11 and no network; no
diffusers, pruna, torchao or cog (those travel as the device kit: script/device_kit.py). `make_mirror` builds a CPU
virtualenv with the image's known versions, where the kit is checked (`script/device-kit --check`) and the prepared
command rehearsed (script/gpu_rehearsal.py) with no network (`offline`).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

try:
    from packaging.utils import canonicalize_name
except ImportError:  # a python without packaging: pip's own copy
    from pip._vendor.packaging.utils import canonicalize_name

# The workplace's nvidia-h200 image, 'cuda' (device KINDS.md, read 2026-11-17): Python 3.12.3 at
# /opt/torch/.venv/bin/python3. Versions known (seen in sessions' pip list there); the rest are unknown.
IMAGE_VERSIONS = {
    "torch": "2.11.0", "triton": "3.6.0", "torchvision": "0.26.0", "torchaudio": "2.11.0",
    "transformers": "5.17.0", "accelerate": "1.15.0", "huggingface-hub": "1.33.0", "safetensors": "0.8.0",
    "tokenizers": "0.23.2", "sentencepiece": "0.2.2", "numpy": "2.5.2", "jaxtyping": "0.3.11",
    "torchmetrics": "1.9.0", "pytorch-lightning": "2.6.6", "onnx": "1.23.1", "onnxruntime": "1.30.0",
    "sentence-transformers": "6.0.1", "tiktoken": "0.14.0",
}
# Every package on the image (names only), as KINDS.md lists them.
IMAGE_PACKAGES = {canonicalize_name(n) for n in """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy
peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn
scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels
sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz
torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split()}

# The image's Python packages as the mirror gets them: the known versions, and the others our code, pruna or the
# kit's wheels import (the image's versions of those are unknown; these are the newest that fit).
MIRROR_PACKAGES = [
    "torch==2.11.0", "triton==3.6.0", "torchvision==0.26.0", "transformers==5.17.0", "accelerate==1.15.0",
    "huggingface_hub==1.33.0", "safetensors==0.8.0", "tokenizers==0.23.2", "sentencepiece==0.2.2", "numpy==2.5.2",
    "jaxtyping==0.3.11", "torchmetrics==1.9.0", "pytorch-lightning==2.6.6",
    "pillow", "httpx", "pandas", "scipy", "scikit-learn", "requests", "rich", "tqdm", "pyyaml", "psutil", "einops",
    "timm", "packaging", "filelock", "fsspec", "jinja2", "networkx", "sympy", "regex",
    "colorama", "protobuf", "pyarrow", "xxhash", "zipp", "pyparsing", "typing-extensions", "nvidia-ml-py", "six",
]


def find_python312() -> str:
    pyenv = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.12*/bin/python3.12")))
    for cand in [shutil.which("python3.12"), *pyenv, "/usr/bin/python3.12"]:
        if cand and subprocess.run([cand, "-c", "import sys; assert sys.version_info[:2] == (3, 12)"],
                                   capture_output=True).returncode == 0:
            return cand
    sys.exit("device-kit: no Python 3.12 found (install one, or pass --python)")


def make_mirror(venv: Path, python: str | None) -> int:
    """A CPU virtualenv with the GPU image's versions (torch 2.11.0 CUDA build and its nvidia-* wheels, several GB):
        python3.12 -m venv VENV && VENV/bin/python -m pip install -U pip
        VENV/bin/python -m pip install <MIRROR_PACKAGES>
        VENV/bin/python -m pip uninstall -y <whatever that pulled in that the image does not have>
    No diffusers, pruna, torchao or peft: those come from the kit."""
    python = python or find_python312()
    steps = [[python, "-m", "venv", str(venv)],
             [str(venv / "bin/python"), "-m", "pip", "install", "-q", "-U", "pip"],
             [str(venv / "bin/python"), "-m", "pip", "install", "-q", *MIRROR_PACKAGES]]
    for cmd in steps:
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    listed = subprocess.run([str(venv / "bin/python"), "-m", "pip", "list", "--format=freeze"],
                            capture_output=True, text=True, check=True).stdout
    extra = [line.split("==")[0] for line in listed.splitlines()
             if "==" in line and canonicalize_name(line.split("==")[0]) not in IMAGE_PACKAGES]
    if extra:  # e.g. pydantic (typer's), tzdata (python-dateutil's): not on the image, so not in its mirror
        cmd = [str(venv / "bin/python"), "-m", "pip", "uninstall", "-q", "-y", *extra]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    print(f"device-kit: mirror ready: {venv}/bin/python")
    return 0


def offline(cmd: list[str]) -> list[str]:
    """The command without network (loopback only), as on the GPU machine, where this machine allows it."""
    if os.geteuid() == 0 and shutil.which("unshare") and shutil.which("ip"):
        probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
        if probe.returncode == 0:
            return ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *cmd]
    return cmd
