"""One HTTP downloader for everything the project fetches itself (weights archives, LoRAs).

Parallel ranged GETs where the server allows them, a plain stream where it does
not; every part retried and resumed; a size limit enforced on the announced and
the received length; the result lands atomically (a .part file renamed into
place), so an interrupted download never leaves a file that looks complete.
Files are asked for as they are (Accept-Encoding: identity); a server that
compresses them anyway (Content-Encoding: gzip, ...) is read, its body decoded,
with the size limit applied to the bytes on the wire and to what they decode to,
each named in its message. Every failure a server or a URL can cause is a
DownloadError (a UserError) that says what to change, never httpx's text.
URLs are logged without their query string (signed URLs carry credentials
there) and headers are never logged. After a redirect to another host (a CDN,
a signed storage URL) the parts are fetched from where the redirect led, and an
Authorization header never follows the request there. What one response may cost, and how its body is counted and
decoded, is flux/response.py.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from . import netguard
# What a response may cost and how its body is counted: flux/response.py. Callers use Limits, DownloadError, Probe,
# MiB and redact through this module too (dl.Limits, ...).
from .response import (IDENTITY, Counter, Deadline, DownloadError, Limits, MiB, Probe, encoding_of, headers_for,
                       length_of, problem_of, redact, status_error)
from .response import same_origin, shown  # noqa: F401  (dl.same_origin, dl.shown: flux/lora, flux/weights)
from .progress import Meter, human_bytes

log = logging.getLogger(__name__)

@contextlib.contextmanager
def _session(url: str, what: str, limits: Limits):
    """A guarded client, with transport failures turned into DownloadErrors that name the URL (never its query)."""
    if not url.lower().startswith(("https://", "http://")):
        raise DownloadError(f"{what}: only http(s) URLs can be fetched, not {redact(url)!r}.")
    # Every socket operation ends by the fetch's deadline: a host that sends a byte (or a header line) at a time
    # cannot stretch it (the same total_timeout Deadline counts from, started here for the headers too).
    end = time.monotonic() + limits.total_timeout
    client = netguard.client(deadline=end, timeout=httpx.Timeout(limits.read_timeout, connect=limits.connect_timeout))
    try:
        yield client
    except httpx.TimeoutException:
        late = " and did not finish in time" if time.monotonic() > end - 0.1 else ""  # the deadline, not a silence
        raise DownloadError(f"{what}: {redact(url)} stopped sending data (timed out){late}; try again later.") from None
    except httpx.TooManyRedirects:
        raise DownloadError(f"{what}: {redact(url)} redirects too many times (a redirect loop?): use the file's "
                            "direct URL.") from None
    except httpx.DecodingError:
        raise DownloadError(f"{what}: {redact(url)} sent a body that does not decode as its Content-Encoding says "
                            "(a broken server or proxy): try again later, or use another host.") from None
    except httpx.UnsupportedProtocol:
        raise DownloadError(f"{what}: {redact(url)} redirects to a URL that is not http(s); use the file's direct "
                            "https URL.") from None
    except (httpx.NetworkError, httpx.ProxyError):
        raise DownloadError(f"{what}: could not connect to {redact(url)}; check the URL, or try again later.") from None
    except httpx.ProtocolError:
        raise DownloadError(f"{what}: {redact(url)} answered something that is not valid HTTP; check the URL.") from None
    except (httpx.InvalidURL, httpx.RequestError, UnicodeError):
        raise DownloadError(f"{what}: {redact(url)} is not a URL this container can fetch; check it.") from None
    finally:
        client.close()


def download(
    url: str,
    dest: Path,
    *,
    what: str = "download",
    headers: dict[str, str] | None = None,
    limits: Limits = Limits(),
    auth_hint: str | None = None,
    space_hint: str = "",
) -> Path:
    """Fetch url into dest atomically and return dest. Raises DownloadError with a user-facing message.

    auth_hint ends the message of a 401/403 (which token to pass); space_hint adds to the one of a full disk.
    """
    with ranged(url, what=what, headers=headers, limits=limits, auth_hint=auth_hint) as (_, _, whole):
        return whole(Path(dest), space_hint)


def _save(session, url: str, dest: Path, found: Probe, target: str, target_headers: dict, meter, what: str,
          limits: Limits, deadline: Deadline, auth_hint: str | None, space_hint: str, started: float) -> Path:
    """What `found` probed, saved into dest atomically (in parallel parts where the server takes ranges)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        with disk_full(what, url, "saving", space_hint):
            if found.ranges and not found.encoded and found.size is not None and found.size > limits.part_size:
                _parallel(session, target, target_headers, part, found.size, what, limits, deadline, auth_hint, meter)
            else:
                _stream(session, target, target_headers, part, found.size, what, limits, deadline, auth_hint, meter)
            os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)
    log.info("%s: fetched %s (%.1f MiB) in %.2fs", what, redact(url), dest.stat().st_size / MiB,
             time.monotonic() - started)
    return dest


@contextlib.contextmanager
def disk_full(what: str, url: str, doing: str, hint: str = ""):
    """A full disk (or quota, or file size limit) while `doing` url, as a DownloadError saying so."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        raise DownloadError(f"{what}: the disk is full ({os.strerror(exc.errno)}) while {doing} {redact(url)}; "
                            f"nothing was kept. Free disk space{hint} and try again.") from None


def check_room(folder: Path, need: int, what: str) -> None:
    """A DownloadError when the disk under folder has less room than a download of `need` bytes takes (with 1 GiB to
    spare): checked before anything is fetched."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < need + 2**30:
        raise DownloadError(f"{what}: not enough disk to fetch them: {human_bytes(free)} free under {folder}, about "
                            f"{human_bytes(need)} needed. Free disk space, or point FLUX_WEIGHTS_DIR at a larger disk.")


def probe(url: str, *, what: str = "download", headers: dict[str, str] | None = None, limits: Limits = Limits(),
          auth_hint: str | None = None) -> Probe:
    """Where url leads after redirects, and what is there (one request for one byte)."""
    with _session(url, what, limits) as session:
        return _probe(session, url, headers or {}, what, auth_hint)


def fetch_json(url: str, *, what: str = "download", headers: dict[str, str] | None = None,
               limits: Limits = Limits(max_bytes=MiB), auth_hint: str | None = None):
    """GET a small JSON document (an API answer), bounded by limits.max_bytes."""
    with _session(url, what, limits) as session:
        with session.stream("GET", url, headers={**(headers or {}), "Accept": "application/json"}) as response:
            if response.status_code != 200:
                raise status_error(response, what, url, auth_hint)
            body = bytearray()
            counter = Counter(response, what, url, limits, None)
            for chunk in counter.chunks():
                body += chunk
    try:
        return json.loads(body)
    except ValueError:
        raise DownloadError(f"{what}: {redact(url)} did not answer JSON.") from None


def _probe(client: httpx.Client, url: str, headers: dict, what: str, auth_hint: str | None) -> Probe:
    """Total size (if announced), whether the server honours byte ranges, and where redirects led."""
    with client.stream("GET", url, headers={**headers, **IDENTITY, "Range": "bytes=0-0"}) as response:
        final, etag, encoded = str(response.url), response.headers.get("etag"), encoding_of(response) is not None
        if response.status_code == 206:
            total = response.headers.get("content-range", "").rpartition("/")[2]
            return Probe(final, int(total) if total.isdigit() else None, total.isdigit(), etag, encoded)
        if response.status_code == 200:  # no ranges; a compressed body announces its compressed length
            return Probe(final, length_of(response), False, etag, encoded)
        if response.status_code == 416:  # empty file
            return Probe(final, 0, False, etag)
        raise status_error(response, what, url, auth_hint)


def _stream(client, url, headers, part: Path, size, what, limits: Limits, deadline: Deadline, auth_hint,
            meter: Meter | None) -> None:
    """One GET, resumed with a Range header after a dropped connection where the server allows it (a compressed
    body is fetched again from its start: its decoded bytes are no offset into what the server sends)."""
    received = 0
    attempt = 0
    encoded = False
    with open(part, "wb") as fh:
        while True:
            before = received
            request_headers = {**headers, **IDENTITY}
            if received and not encoded:
                request_headers["Range"] = f"bytes={received}-"
            try:
                with client.stream("GET", url, headers=request_headers) as response:
                    if response.status_code not in (200, 206):
                        raise status_error(response, what, url, auth_hint)
                    encoded = encoding_of(response) is not None
                    if received and (response.status_code == 200 or encoded):  # no resume: start over
                        fh.seek(0)
                        fh.truncate()
                        received = 0
                        if meter is not None:
                            meter.done = 0
                    counter = Counter(response, what, url, limits, size, wire_before=received)
                    for chunk in counter.chunks():  # as they arrive: each counted, the deadline checked
                        received += len(chunk)
                        fh.write(chunk)
                        if meter is not None:
                            meter.advance(len(chunk))
                        deadline.check(what, url)
                if counter.complete:
                    return
                raise httpx.RemoteProtocolError("short read")
            except (httpx.TransportError, httpx.RemoteProtocolError) as exc:
                attempt += 1
                problem = f"{problem_of(exc)} ({received} of {size or '?'} bytes received)"
                # A body that ends short again without a byte more (a host whose length is wrong) is not retried on.
                stalled = attempt > 1 and received == before and isinstance(exc, httpx.RemoteProtocolError)
                if attempt > limits.retries or stalled:
                    raise DownloadError(f"{what}: {redact(url)} {problem}.") from None
                log.warning("%s: connection dropped after %d bytes, resuming (attempt %d)", what, received, attempt)
                time.sleep(max(0.0, min(2**attempt * 0.25, 4, deadline.end - time.monotonic())))
                deadline.check(what, url, problem)


def _parallel(client, url, headers, part: Path, size: int, what, limits: Limits, deadline: Deadline, auth_hint,
              meter: Meter | None) -> None:
    """Ranged GETs in parallel, each written at its offset; each range retried from where it stopped."""
    with open(part, "wb") as fh:
        fh.truncate(size)
    ranges = [(start, min(start + limits.part_size, size) - 1) for start in range(0, size, limits.part_size)]
    fd = os.open(part, os.O_WRONLY)
    failed = threading.Event()

    def fetch(first: int, last: int) -> None:
        _fetch_range(client, url, headers, first, last, lambda offset, chunk: os.pwrite(fd, chunk, offset), what,
                     limits, deadline, auth_hint, meter, failed, size)

    try:
        with ThreadPoolExecutor(max_workers=min(limits.workers, len(ranges))) as pool:
            futures = [pool.submit(fetch, first, last) for first, last in ranges]
            for future in futures:
                try:
                    future.result()
                except BaseException:
                    failed.set()
                    raise
    finally:
        os.close(fd)


def _fetch_range(client, url, headers, first: int, last: int, write, what, limits: Limits, deadline: Deadline,
                 auth_hint, meter: Meter | None, stop: threading.Event, size: int) -> None:
    """Bytes first..last by ranged GETs, each chunk passed to write(offset, chunk); retried from where it stopped.
    Returns early (incomplete) once stop is set, at its next chunk."""
    offset = first
    attempt = 0
    while offset <= last:
        if stop.is_set():
            return
        try:
            with client.stream("GET", url, headers={**headers, **IDENTITY, "Range": f"bytes={offset}-{last}"}) as response:
                if response.status_code != 206:
                    raise status_error(response, what, url, auth_hint)
                encoding = encoding_of(response)
                if encoding is not None:
                    raise DownloadError(f"{what}: {redact(url)} answered a byte range compressed "
                                        f"({encoding}), which cannot be put in place; try again later.")
                for chunk in response.iter_bytes():  # as they arrive: each counted, the deadline checked
                    if stop.is_set():
                        return
                    if offset + len(chunk) > last + 1:
                        raise DownloadError(f"{what}: {redact(url)} sent more bytes than it announced ({size}).")
                    write(offset, chunk)
                    offset += len(chunk)
                    if meter is not None:
                        meter.advance(len(chunk))
                    deadline.check(what, url)
            if offset <= last:
                raise httpx.RemoteProtocolError("short range")
        except (httpx.TransportError, httpx.RemoteProtocolError) as exc:
            attempt += 1
            if attempt > limits.retries:
                raise DownloadError(f"{what}: {redact(url)} {problem_of(exc)}.") from None
            time.sleep(max(0.0, min(2**attempt * 0.25, 4, deadline.end - time.monotonic())))
            deadline.check(what, url, problem_of(exc))


@contextlib.contextmanager
def ranged(url: str, *, what: str = "download", headers: dict[str, str] | None = None, limits: Limits = Limits(),
           auth_hint: str | None = None):
    """For a reader that takes a file in parts as they arrive (flux/tarstream.py): yields (probe, fetch, whole), where
    fetch(first, last, write, stop) GETs bytes first..last of where url leads, with download()'s checks, retries and
    credentials rule, passing each chunk to write(offset, chunk); it returns early once the threading.Event stop is
    set. whole(dest, space_hint) is download() to dest on the same probe (download() is this, for a server that takes
    no ranges too). Transport failures inside the block become DownloadErrors."""
    deadline = Deadline(limits.total_timeout)
    started = time.monotonic()
    headers = headers or {}
    with _session(url, what, limits) as session:
        found = _probe(session, url, headers, what, auth_hint)
        if found.size is not None and found.size > limits.max_bytes:
            raise DownloadError(
                f"{what}: {redact(url)} is {human_bytes(found.size)}, over the {human_bytes(limits.max_bytes)} limit."
            )
        # Parts come from where the redirects led (one version of the file, one hop), without credentials
        # meant for the first host.
        target, target_headers = found.url, headers_for(found.url, url, headers)
        meter = Meter(what, found.size) if found.size is None or found.size >= limits.progress_bytes else None

        def fetch(first: int, last: int, write, stop: threading.Event) -> None:
            _fetch_range(session, target, target_headers, first, last, write, what, limits, deadline, auth_hint,
                         meter, stop, found.size)

        def whole(dest: Path, space_hint: str = "") -> Path:
            return _save(session, url, dest, found, target, target_headers, meter, what, limits, deadline, auth_hint,
                         space_hint, started)

        yield found, fetch, whole
