"""One HTTP downloader for everything the project fetches itself (weights archives, LoRAs).

Parallel ranged GETs where the server allows them, a plain stream where it does
not; every part retried and resumed; a size limit enforced on the announced and
the received length; the result lands atomically (a .part file renamed into
place), so an interrupted download never leaves a file that looks complete.
URLs are logged without their query string (signed URLs carry credentials
there) and headers are never logged.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx

from . import netguard
from .errors import UserError

log = logging.getLogger(__name__)

MiB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 2 * 1024 * MiB
    connect_timeout: float = 10.0
    read_timeout: float = 60.0  # longest silence tolerated mid-transfer
    total_timeout: float = 3600.0
    part_size: int = 64 * MiB
    workers: int = 8
    retries: int = 4


class DownloadError(UserError):
    """A download failed for a reason the user can act on (bad URL, 401, 404, too big, ...)."""


def redact(url: str) -> str:
    """The URL without query, fragment or userinfo: safe to log and to show."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _status_error(response: httpx.Response, what: str, url: str) -> DownloadError:
    code = response.status_code
    shown = redact(url)
    if code in (401, 403):
        return DownloadError(f"{what}: {shown} answered {code} (not authorized). If it is private or gated, pass a token.")
    if code == 404:
        return DownloadError(f"{what}: {shown} was not found (404). Check the reference.")
    return DownloadError(f"{what}: {shown} answered HTTP {code}.")


class _Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def check(self, what: str, url: str) -> None:
        if time.monotonic() > self.end:
            raise DownloadError(f"{what}: downloading {redact(url)} took too long; try again or use a faster host.")


def download(
    url: str,
    dest: Path,
    *,
    what: str = "download",
    headers: dict[str, str] | None = None,
    limits: Limits = Limits(),
    client: httpx.Client | None = None,
) -> Path:
    """Fetch url into dest atomically and return dest. Raises DownloadError with a user-facing message."""
    dest = Path(dest)
    if not url.lower().startswith(("https://", "http://")):
        raise DownloadError(f"{what}: only http(s) URLs can be fetched, not {redact(url)!r}.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    own_client = client is None
    if client is None:
        client = netguard.client(timeout=httpx.Timeout(limits.read_timeout, connect=limits.connect_timeout))
    deadline = _Deadline(limits.total_timeout)
    started = time.monotonic()
    try:
        size, ranges = _probe(client, url, headers or {}, what, limits)
        if size is not None and size > limits.max_bytes:
            raise DownloadError(
                f"{what}: {redact(url)} is {size / MiB:.0f} MiB, over the {limits.max_bytes / MiB:.0f} MiB limit."
            )
        if ranges and size is not None and size > limits.part_size:
            _parallel(client, url, headers or {}, part, size, what, limits, deadline)
        else:
            _stream(client, url, headers or {}, part, size, what, limits, deadline)
        os.replace(part, dest)
    except httpx.TimeoutException:
        raise DownloadError(f"{what}: {redact(url)} stopped sending data (timed out); try again later.") from None
    except httpx.TransportError as exc:
        raise DownloadError(f"{what}: could not fetch {redact(url)} ({type(exc).__name__}); check the URL.") from None
    except httpx.InvalidURL:
        raise DownloadError(f"{what}: {redact(url)} is not a valid URL.") from None
    finally:
        part.unlink(missing_ok=True)
        if own_client:
            client.close()
    elapsed = time.monotonic() - started
    got = dest.stat().st_size
    log.info("%s: fetched %s (%.1f MiB) in %.2fs", what, redact(url), got / MiB, elapsed)
    return dest


def _probe(client: httpx.Client, url: str, headers: dict, what: str, limits: Limits) -> tuple[int | None, bool]:
    """Total size (if announced) and whether the server honours byte ranges."""
    with client.stream("GET", url, headers={**headers, "Range": "bytes=0-0"}) as response:
        if response.status_code == 206:
            total = response.headers.get("content-range", "").rpartition("/")[2]
            return (int(total) if total.isdigit() else None), total.isdigit()
        if response.status_code == 200:
            length = response.headers.get("content-length")
            return (int(length) if length and length.isdigit() else None), False
        if response.status_code == 416:  # empty file
            return 0, False
        raise _status_error(response, what, url)


def _stream(client, url, headers, part: Path, size, what, limits: Limits, deadline: _Deadline) -> None:
    """One GET, resumed with a Range header after a dropped connection where the server allows it."""
    received = 0
    attempt = 0
    with open(part, "wb") as fh:
        while True:
            request_headers = dict(headers)
            if received:
                request_headers["Range"] = f"bytes={received}-"
            try:
                with client.stream("GET", url, headers=request_headers) as response:
                    if response.status_code not in (200, 206):
                        raise _status_error(response, what, url)
                    if received and response.status_code == 200:  # no resume: start over
                        fh.seek(0)
                        fh.truncate()
                        received = 0
                    for chunk in response.iter_bytes(MiB):
                        received += len(chunk)
                        if received > limits.max_bytes:
                            raise DownloadError(f"{what}: {redact(url)} is over the {limits.max_bytes / MiB:.0f} MiB limit.")
                        if size is not None and received > size:
                            raise DownloadError(f"{what}: {redact(url)} sent more bytes than it announced ({size}).")
                        fh.write(chunk)
                        deadline.check(what, url)
                if size is None or received == size:
                    return
                raise httpx.RemoteProtocolError("short read")
            except (httpx.TransportError, httpx.RemoteProtocolError):
                attempt += 1
                if attempt > limits.retries:
                    raise DownloadError(
                        f"{what}: {redact(url)} kept dropping the connection ({received} of {size or '?'} bytes received)."
                    ) from None
                log.warning("%s: connection dropped after %d bytes, resuming (attempt %d)", what, received, attempt)
                time.sleep(min(2**attempt * 0.25, 4))
                deadline.check(what, url)


def _parallel(client, url, headers, part: Path, size: int, what, limits: Limits, deadline: _Deadline) -> None:
    """Ranged GETs in parallel, each written at its offset; each range retried from where it stopped."""
    with open(part, "wb") as fh:
        fh.truncate(size)
    ranges = [(start, min(start + limits.part_size, size) - 1) for start in range(0, size, limits.part_size)]
    fd = os.open(part, os.O_WRONLY)
    failed = threading.Event()

    def fetch(first: int, last: int) -> None:
        offset = first
        attempt = 0
        while offset <= last:
            if failed.is_set():
                return
            try:
                with client.stream("GET", url, headers={**headers, "Range": f"bytes={offset}-{last}"}) as response:
                    if response.status_code != 206:
                        raise _status_error(response, what, url)
                    for chunk in response.iter_bytes(MiB):
                        if offset + len(chunk) > last + 1:
                            raise DownloadError(f"{what}: {redact(url)} sent more bytes than it announced ({size}).")
                        os.pwrite(fd, chunk, offset)
                        offset += len(chunk)
                        deadline.check(what, url)
                if offset <= last:
                    raise httpx.RemoteProtocolError("short range")
            except (httpx.TransportError, httpx.RemoteProtocolError):
                attempt += 1
                if attempt > limits.retries:
                    raise DownloadError(f"{what}: {redact(url)} kept dropping the connection.") from None
                time.sleep(min(2**attempt * 0.25, 4))

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
