"""A weights folder as the .tar a weights URL serves (tests of flux/weights.py, flux/tarstream.py, the prefetch)."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path


def digests(folder: Path) -> dict[str, str]:
    """Every file under folder (by its relative path) and its sha256, the .complete marker left out."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".complete"}


def tar_of(folder: Path, extra: list[tarfile.TarInfo] = ()) -> bytes:
    """The folder as a .tar with everything under the folder's name; `extra` members come after every real one
    (refused mid-stream, with parts already extracted)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(folder, arcname=folder.name)
        for info in extra:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return buf.getvalue()
