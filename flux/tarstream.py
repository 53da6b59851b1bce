"""A .tar from a URL, extracted while it downloads: parallel ranged parts handed to the extractor in order.

`extract_url(url, dest, ...)` fetches the archive in parts of `limits.part_size` bytes by parallel ranged GETs
(flux/download.py's `ranged`: the same checks, retries and credentials rule as a download), at most `limits.workers`
parts ahead of the extractor, kept in memory (at most about workers x part_size bytes); tarfile reads them in order as
one stream and each member is checked (`check_member`) before it is written. Peak disk is what the archive unpacks to,
never the archive beside it, and unpacking overlaps the download. A server that does not take byte ranges (or does not
say how big the file is) gets the plain way: the whole archive downloaded, then extracted (`extract_tar`).

The members allowed, on either way: regular files and folders, with relative paths that stay inside dest (no
absolute path, no '..', no link, no device), unpacking to at most max_bytes in all. Anything else stops the
extraction with a UserError; so does a download that fails. On any failure dest is left incomplete: the caller
extracts into a staging folder and marks nothing complete (flux/weights.py).
"""

from __future__ import annotations

import collections
import logging
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

from . import download as dl
from .errors import UserError

log = logging.getLogger(__name__)


def member_problem(name: str, regular: bool, show=lambda name: name) -> str | None:
    """What makes an archive member unsafe to unpack (every archive this container reads): an absolute path, a path
    out of the folder, a link or a special file (regular: a file or a folder). None: it is safe."""
    if name.startswith("/") or ".." in PurePosixPath(name).parts:
        return f"holds an unsafe path ({show(name)!r})"
    if not regular:
        return f"holds a link or special file ({show(name)!r})"
    return None


def check_member(member: tarfile.TarInfo, total: int, max_bytes: int) -> int:
    """Refuse an unsafe member (UserError); returns the bytes unpacked so far with it."""
    problem = member_problem(member.name, member.isfile() or member.isdir())
    if problem:
        raise UserError(f"the archive {problem}; refusing to extract it.")
    total += member.size
    if total > max_bytes:
        raise UserError(f"the archive unpacks to more than {max_bytes / 1024**3:.0f} GiB; refusing to extract it.")
    return total


def extract_tar(archive: Path, dest: Path, max_bytes: int) -> list[Path]:
    """Extract a .tar on disk into dest, every member checked first; returns the files written."""
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            total = 0
            for member in members:
                total = check_member(member, total, max_bytes)
            tar.extractall(dest, members=members, filter="data")
    except tarfile.TarError as exc:
        raise UserError(f"the archive is not a valid .tar ({exc}).") from None
    return [dest / m.name for m in members if m.isfile()]


def extract_url(url: str, dest: Path, *, max_bytes: int, what: str = "download", headers: dict[str, str] | None = None,
                limits: dl.Limits = dl.Limits(), auth_hint: str | None = None) -> list[Path]:
    """Download the .tar at url and extract it into dest as it arrives; returns the files written."""
    started = time.monotonic()
    dest.mkdir(parents=True, exist_ok=True)
    with dl.disk_full(what, url, "extracting"), \
            dl.ranged(url, what=what, headers=headers, limits=limits, auth_hint=auth_hint) as (found, fetch, whole):
        if found.ranges and not found.encoded and found.size:  # a compressed body has no byte offsets to range
            files = _extract_parts(fetch, found.size, dest, max_bytes, limits)
            log.info("%s: fetched and extracted %s (%.1f MiB) in %.2fs", what, dl.redact(url),
                     found.size / dl.MiB, time.monotonic() - started)
            return files
        log.info("%s: %s does not take byte ranges (or sends them compressed): downloading it whole, then "
                 "extracting", what, dl.redact(url))
        archive = whole(dest.parent / f".{dest.name}.tar")  # on the same probe: one request for its first byte
    try:
        with dl.disk_full(what, url, "extracting"):
            return extract_tar(archive, dest, max_bytes)
    finally:
        archive.unlink(missing_ok=True)


def _extract_parts(fetch, size: int, dest: Path, max_bytes: int, limits: dl.Limits) -> list[Path]:
    stop = threading.Event()
    workers = max(1, min(limits.workers, -(-size // limits.part_size)))
    files: list[Path] = []
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tar-part") as pool:
        parts = _Parts(fetch, size, limits.part_size, workers, pool, stop)
        try:
            with tarfile.open(fileobj=parts, mode="r|", bufsize=dl.MiB, copybufsize=dl.MiB) as tar:
                total = 0
                for member in tar:
                    total = check_member(member, total, max_bytes)
                    tar.extract(member, dest, filter="data")
                    if member.isfile():
                        files.append(dest / member.name)
            parts.drain()  # the end of the archive is not the end of the file: the rest must arrive too
        except tarfile.TarError as exc:
            raise UserError(f"the archive is not a valid .tar ({exc}).") from None
        finally:
            stop.set()  # parts in flight stop at their next chunk; queued ones never start
            pool.shutdown(wait=True, cancel_futures=True)
    return files


class _Part:
    """One ranged part: its chunks as they arrive (in order: a ranged GET resumes where it stopped)."""

    def __init__(self, first: int, last: int):
        self.first, self.size = first, last - first + 1
        self.chunks: collections.deque[bytes] = collections.deque()
        self.taken = 0
        self.arrived = threading.Condition()
        self.future = None

    def write(self, _offset: int, chunk: bytes) -> None:
        with self.arrived:
            self.chunks.append(chunk)
            self.arrived.notify_all()

    def ended(self, _future) -> None:
        with self.arrived:
            self.arrived.notify_all()


class _Parts:
    """The file's bytes in order, read as they arrive, from parts fetched ahead by the pool (at most `window` held).
    A file object for tarfile's stream mode: read(n) hands over the downloaded chunks themselves (no copy)."""

    def __init__(self, fetch, size: int, part_size: int, window: int, pool: ThreadPoolExecutor,
                 stop: threading.Event):
        self._ranges = collections.deque((first, min(first + part_size, size) - 1)
                                         for first in range(0, size, part_size))
        self._fetch, self._window, self._pool, self._stop = fetch, window, pool, stop
        self._ahead: collections.deque[_Part] = collections.deque()
        self._submit()

    def _submit(self) -> None:
        while self._ranges and len(self._ahead) < self._window:
            part = _Part(*self._ranges.popleft())
            # once the extraction stops (done or failed), the part's GET ends at its next chunk
            part.future = self._pool.submit(self._fetch, part.first, part.first + part.size - 1, part.write,
                                            self._stop)
            part.future.add_done_callback(part.ended)
            self._ahead.append(part)

    def read(self, n: int = -1) -> bytes:
        while self._ahead:
            part = self._ahead[0]
            with part.arrived:
                while not part.chunks and not part.future.done():
                    part.arrived.wait()
                chunk = part.chunks.popleft() if part.chunks else None
                if chunk is not None and 0 <= n < len(chunk):
                    chunk, rest = chunk[:n], chunk[n:]
                    part.chunks.appendleft(rest)
            if chunk is not None:
                part.taken += len(chunk)
                if part.taken == part.size:
                    self._ahead.popleft()
                    self._submit()
                return chunk
            part.future.result()  # a DownloadError of that part surfaces here, in order
            raise dl.DownloadError("the download stopped before the archive's end.")  # stopped: never expected
        return b""

    def drain(self) -> None:
        while self.read(dl.MiB):
            pass
