"""A .tar from a URL: only the members a layout needs, fetched in parallel ranged parts; the rest never fetched.

`extract_url(url, dest, ..., wanted=patterns)` walks the archive's member headers with small ranged reads (tarfile
reads them from a file object whose reads are ranged GETs: GNU long names and PAX headers included, and a member's
data is skipped, never read), checks every member (`member_problem`: no absolute path, no '..', no link, no device,
anywhere in the archive), picks the members whose path (below the archive's one top folder, when it has one) matches
one of `wanted`'s patterns (fnmatch; None: all), and fetches only their bytes, in parts of `limits.part_size` by
parallel ranged GETs (flux/download.py's `ranged`: the same checks, retries and credentials rule as a download),
each written in place in its file. What is picked may unpack to at most max_bytes. A server that does not take byte
ranges (or does not say how big the file is) gets the plain way, and the log says what it costs: the whole archive
downloaded, then the picked members extracted (`extract_tar`).

`list_url(url, ...)` is the walk alone (script/weights-check): what the archive holds and what would be fetched.

Anything unsafe stops the extraction with a UserError before any member's data is fetched; so does a download that
fails. On any failure dest is left incomplete: the caller extracts into a staging folder and marks nothing complete
(flux/weights.py).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import io
import logging
import os
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Sequence

from . import download as dl
from .errors import UserError
from .progress import Meter, human_bytes

log = logging.getLogger(__name__)

# A header read fetches what tarfile asks for, at least one block; after a PAX or GNU long-name header, its data
# and the member's own header come in one request. No byte of a member's data is read with them.
HEADER_READ = tarfile.BLOCKSIZE
_EXTENDED = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
NO_METER = 2**62  # progress_bytes that keeps download.py's meter (of the whole archive) quiet: ours counts members


def member_problem(name: str, regular: bool, show=lambda name: name) -> str | None:
    """What makes an archive member unsafe to unpack (every archive this container reads): an absolute path, a path
    out of the folder, a link or a special file (regular: a file or a folder). None: it is safe."""
    if name.startswith("/") or ".." in PurePosixPath(name).parts:
        return f"holds an unsafe path ({show(name)!r})"
    if not regular:
        return f"holds a link or special file ({show(name)!r})"
    return None


@dataclass(frozen=True)
class Plan:
    """What an archive holds and what of it a layout takes."""

    members: list[tarfile.TarInfo]  # every member, in order
    top: str | None  # its one top folder, if it has one
    chosen: list[tarfile.TarInfo]  # the files to fetch (their paths below `top` match a wanted pattern)

    @property
    def chosen_bytes(self) -> int:
        return sum(m.size for m in self.chosen)

    @property
    def skipped(self) -> list[tarfile.TarInfo]:
        picked = {id(m) for m in self.chosen}
        return [m for m in self.members if m.isfile() and id(m) not in picked]

    def relative(self, member: tarfile.TarInfo) -> str:
        """A member's path below the top folder."""
        parts = PurePosixPath(member.name).parts
        return "/".join(parts[1:] if self.top else parts)


def plan(members: list[tarfile.TarInfo], wanted: Sequence[str] | None, max_bytes: int) -> Plan:
    """Every member checked (`member_problem`: a UserError), and the files picked, unpacking to at most max_bytes."""
    for member in members:
        problem = member_problem(member.name, member.isfile() or member.isdir())
        if problem:
            raise UserError(f"the archive {problem}; refusing to extract it.")
    paths = [PurePosixPath(m.name).parts for m in members]  # "./a/b" and "a/b/" are ("a", "b")
    firsts = {p[0] for p in paths if p}
    top = next(iter(firsts)) if len(firsts) == 1 and any(len(p) > 1 for p in paths) else None
    result = Plan(members, top, [])
    picked: dict[str, tarfile.TarInfo] = {}  # by path: a path the archive holds twice is its last member, as tar does
    for member in members:
        path = result.relative(member)
        if member.isfile() and (wanted is None or any(fnmatch.fnmatch(path, p) for p in wanted)):
            if member.issparse():  # its data is a map of holes, not the file: never written as it is
                raise UserError(f"the archive holds a sparse file ({member.name!r}); refusing to extract it.")
            picked.pop(path, None)
            picked[path] = member
    result.chosen.extend(picked.values())
    if result.chosen_bytes > max_bytes:
        raise UserError(f"the archive unpacks to more than {max_bytes / 1024**3:.0f} GiB; refusing to extract it.")
    return result


def extract_tar(archive: Path, dest: Path, max_bytes: int, wanted: Sequence[str] | None = None) -> list[Path]:
    """Extract a .tar on disk into dest, every member checked first, only the picked files; returns them."""
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive) as tar:
            picked = plan(tar.getmembers(), wanted, max_bytes)
            tar.extractall(dest, members=picked.chosen, filter="data")
    except tarfile.TarError as exc:
        raise UserError(f"the archive is not a valid .tar ({exc}).") from None
    return [dest / m.name for m in picked.chosen]


def list_url(url: str, *, max_bytes: int, what: str = "download", headers: dict[str, str] | None = None,
             limits: dl.Limits = dl.Limits(), auth_hint: str | None = None,
             wanted: Sequence[str] | None = None) -> tuple[dl.Probe, Plan | None]:
    """The archive's member headers, read with ranged reads (no member's data), and what `wanted` picks of them;
    the Plan is None where the server takes no ranges (the headers cannot be read without the whole archive)."""
    with dl.ranged(url, what=what, headers=headers, limits=dataclasses.replace(limits, progress_bytes=NO_METER),
                   auth_hint=auth_hint) as (found, fetch, _):
        if not _takes_ranges(found):
            return found, None
        return found, plan(_headers(fetch, found.size), wanted, max_bytes)


def extract_url(url: str, dest: Path, *, max_bytes: int, what: str = "download", headers: dict[str, str] | None = None,
                limits: dl.Limits = dl.Limits(), auth_hint: str | None = None,
                wanted: Sequence[str] | None = None) -> list[Path]:
    """Fetch the members of the .tar at url that `wanted` picks into dest; returns the files written."""
    started = time.monotonic()
    dest.mkdir(parents=True, exist_ok=True)
    with dl.disk_full(what, url, "extracting"), \
            dl.ranged(url, what=what, headers=headers, limits=dataclasses.replace(limits, progress_bytes=NO_METER),
                      auth_hint=auth_hint) as (found, fetch, _):
        if _takes_ranges(found):
            picked = plan(_headers(fetch, found.size), wanted, max_bytes)
            log.info("%s: %s holds %d files (%s); fetching the %d the layout needs (%s)%s", what, dl.redact(url),
                     len(picked.chosen) + len(picked.skipped), human_bytes(found.size), len(picked.chosen),
                     human_bytes(picked.chosen_bytes),
                     f", not {', '.join(picked.relative(m) for m in picked.skipped)}" if picked.skipped else "")
            files = _fetch_members(fetch, picked.chosen, dest, what, limits)
            log.info("%s: fetched %s of %s in %.2fs", what, human_bytes(picked.chosen_bytes), dl.redact(url),
                     time.monotonic() - started)
            return files
    with dl.disk_full(what, url, "extracting"), \
            dl.ranged(url, what=what, headers=headers, limits=limits, auth_hint=auth_hint) as (found, _, whole):
        log.warning("%s: %s does not take byte ranges (or sends them compressed): downloading all of it (%s), "
                    "then keeping what the layout needs; with ranges only that would be fetched", what,
                    dl.redact(url), human_bytes(found.size) if found.size else "size not announced")
        archive = whole(dest.parent / f".{dest.name}.tar")
    try:
        with dl.disk_full(what, url, "extracting"):
            return extract_tar(archive, dest, max_bytes, wanted)
    finally:
        archive.unlink(missing_ok=True)


def _takes_ranges(found: dl.Probe) -> bool:
    return bool(found.ranges and not found.encoded and found.size)  # a compressed body has no byte offsets


class _RangedFile(io.RawIOBase):
    """The archive as a seekable file whose reads are ranged GETs of at least HEADER_READ bytes (tarfile reads
    headers from it and seeks past member data without reading it)."""

    def __init__(self, fetch, size: int):
        self._fetch, self._size = fetch, size
        self._pos, self._start, self._buf = 0, 0, b""
        self._extended = False  # the last block read was a PAX or GNU long-name header
        self._never = threading.Event()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self._pos = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._size}[whence] + offset
        return self._pos

    def read(self, n: int = -1) -> bytes:
        n = self._size - self._pos if n is None or n < 0 else min(n, self._size - self._pos)
        if n <= 0:
            return b""
        if n == 1:
            # tarfile checks that the byte before each header exists (TarFile.next reads it); the size is known, so
            # that costs no request, and the byte handed back is not the archive's
            self._pos += 1
            return b"\0"
        if not (self._start <= self._pos and self._pos + n <= self._start + len(self._buf)):
            ahead = tarfile.BLOCKSIZE if self._extended else 0  # an extended header's data: the header follows
            last = min(self._size, self._pos + max(n, HEADER_READ) + ahead) - 1
            got = bytearray()
            self._fetch(self._pos, last, lambda _offset, chunk: got.extend(chunk), self._never)
            self._start, self._buf = self._pos, bytes(got)
            self._extended = n == tarfile.BLOCKSIZE and self._buf[156:157] in _EXTENDED  # its typeflag
        data = self._buf[self._pos - self._start:self._pos - self._start + n]
        self._pos += len(data)
        return data


def _headers(fetch, size: int) -> list[tarfile.TarInfo]:
    try:
        with tarfile.open(fileobj=_RangedFile(fetch, size), mode="r:") as tar:
            return tar.getmembers()
    except tarfile.TarError as exc:
        raise UserError(f"the archive is not a valid .tar ({exc}).") from None


def _fetch_members(fetch, chosen: list[tarfile.TarInfo], dest: Path, what: str, limits: dl.Limits) -> list[Path]:
    """The chosen members' bytes, in parts fetched in parallel, each written at its place in its file."""
    total = sum(m.size for m in chosen)
    meter = Meter(what, total) if total >= limits.progress_bytes else None
    stop = threading.Event()
    files, fds, jobs = [], [], []
    try:
        for member in chosen:
            path = dest / member.name
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            fds.append(fd)
            files.append(path)
            os.ftruncate(fd, member.size)
            jobs += [(fd, member.offset_data, member.offset_data + first, min(first + limits.part_size, member.size))
                     for first in range(0, member.size, limits.part_size)]

        def part(fd: int, base: int, first: int, end: int) -> None:
            def write(offset: int, chunk: bytes) -> None:
                os.pwrite(fd, chunk, offset - base)
                if meter is not None:
                    meter.advance(len(chunk))

            fetch(first, base + end - 1, write, stop)

        with ThreadPoolExecutor(max_workers=max(1, min(limits.workers, len(jobs))),
                                thread_name_prefix="tar-part") as pool:
            futures = [pool.submit(part, *job) for job in jobs]
            try:
                for future in futures:
                    future.result()
            finally:
                stop.set()  # on a failure, parts in flight stop at their next chunk and queued ones never start
                pool.shutdown(wait=True, cancel_futures=True)
    finally:
        for fd in fds:
            os.close(fd)
    return files
