"""A weights folder as the .tar a weights URL serves (tests of flux/weights.py, flux/tarstream.py, the prefetch)."""

from __future__ import annotations

import hashlib
import io
import sys
import tarfile
from pathlib import Path, PurePosixPath

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "script"))
from deploy_check import replicate_tar  # noqa: E402,F401  (the deploy rehearsal's Replicate-layout tar, shared)


def digests(folder: Path) -> dict[str, str]:
    """Every file under folder (by its relative path) and its sha256, markers (.complete, .tiny-version: not in a
    layout, never fetched from a .tar) left out."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(".")}


def tar_of(folder: Path, extra: list[tarfile.TarInfo] = ()) -> bytes:
    """The folder as a .tar with everything under the folder's name; `extra` members come after every real one
    (an unsafe one is refused from the headers, before any member's data is fetched)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(folder, arcname=folder.name)
        for info in extra:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return buf.getvalue()


def loaded_bytes(folder: Path) -> int:
    """The bytes of a weights folder's files (markers left out)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def serve_public(hub, root: Path, unread: int = 2**30) -> dict[str, Path]:
    """Replicate's weights delivery and the safety checkers' Hugging Face repos as the public defaults find them,
    serving the tiny twins, on one HubServer (FLUX_WEIGHTS_HOST=hub.base): each variant's .tar at its `public` path,
    laid out as Replicate's are (dev's and krea-dev's under a top folder named like the tar's, schnell's slim.tar with
    none), each after an unread sparse member of `unread` bytes; a variant whose `public` is a single-file checkpoint
    (kontext-dev, fill-dev) as its tiny twin in BFL's layout. Returns each component's tiny folder (or file), by
    kind."""
    from flux import variants, weights
    from flux.fakes import tiny
    from tests.helpers.http import OnDisk

    folders = {}
    for v in variants.VARIANTS.values():
        if v.public.endswith((".safetensors", ".sft")):
            folders[v.name] = tiny.ensure_single_file(root / "twins" / PurePosixPath(v.public).name, v)
            hub.add(v.public, OnDisk(folders[v.name]))
            continue
        top = PurePosixPath(v.public).parent.name  # FLUX.1-dev, FLUX.1-krea-dev, FLUX.1-schnell
        folders[v.name] = tiny.ensure_pipeline(root / "twins" / top, v)
        archive = replicate_tar(root / f"{v.name}.tar", folders[v.name], top=not v.public.endswith("/slim.tar"),
                                unread=unread)
        hub.add(v.public, OnDisk(archive))
    for kind, repo, build in ((weights.SAFETY, weights.SAFETY_REPO, tiny.ensure_safety_checker),
                              (weights.SAFETY_SECOND, weights.SAFETY_SECOND_REPO, tiny.ensure_nsfw_classifier)):
        folders[kind] = build(root / "twins" / kind)
        hub.add_repo(repo, {p.relative_to(folders[kind]).as_posix(): p.read_bytes()
                            for p in folders[kind].rglob("*") if p.is_file() and not p.name.startswith(".")})
    return folders
