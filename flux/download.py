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
Authorization header never follows the request there.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx

from . import netguard
from .progress import Meter, human_bytes
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
    progress_bytes: int = 4 * MiB  # a download this big (or of unknown size) logs its progress as it goes


class DownloadError(UserError):
    """A download failed for a reason the user can act on (bad URL, 401, 404, too big, ...)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Probe:
    """What the first request learned: where redirects led, the size, whether ranges work, the ETag."""

    url: str  # after redirects
    size: int | None  # of the file; of the compressed body when `encoded`
    ranges: bool
    etag: str | None
    encoded: bool = False  # the server compresses the body (Content-Encoding) although asked not to


def redact(url: str) -> str:
    """The URL without query, fragment or userinfo: safe to log and to show."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 address keeps its brackets
        host = f"[{host}]"
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def shown(reference: str) -> str:
    """A reference (a URL, a repo id, a path) as logs and messages may show it: a URL redacted, anything else as is."""
    return redact(reference) if "://" in reference else reference


def _status_error(response: httpx.Response, what: str, url: str, auth_hint: str | None = None) -> DownloadError:
    code = response.status_code
    shown = redact(url)
    if code in (401, 403):
        hint = auth_hint or "If it is private or gated, pass a token."
        return DownloadError(f"{what}: {shown} answered {code} (not authorized). {hint}", code)
    if code == 404:
        return DownloadError(f"{what}: {shown} was not found (404). Check the reference.", code)
    return DownloadError(f"{what}: {shown} answered HTTP {code}.", code)


def same_origin(a: str, b: str) -> bool:
    x, y = urlsplit(a), urlsplit(b)
    return (x.scheme, x.hostname, x.port) == (y.scheme, y.hostname, y.port)


def _headers_for(url: str, original: str, headers: dict[str, str]) -> dict[str, str]:
    """Credentials go only to the origin they were given for."""
    if same_origin(url, original):
        return headers
    return {k: v for k, v in headers.items() if k.lower() not in ("authorization", "cookie")}


class _Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def check(self, what: str, url: str, problem: str | None = None) -> None:
        """Past the deadline: fail, naming the last problem seen while retrying if there was one."""
        if time.monotonic() > self.end:
            if problem:
                raise DownloadError(f"{what}: {redact(url)} {problem} and did not finish in time; try again later "
                                    "or use another host.")
            raise DownloadError(f"{what}: downloading {redact(url)} took too long; try again or use a faster host.")


# Files are fetched as they are: ranges and sizes then count the file's own bytes.
IDENTITY = {"Accept-Encoding": "identity"}


def _encoding(response: httpx.Response) -> str | None:
    """The Content-Encoding a response's body is compressed with (None: the bytes are the file's)."""
    value = response.headers.get("content-encoding", "").strip().lower()
    return None if value in ("", "identity") else value


def _length(response: httpx.Response) -> int | None:
    value = response.headers.get("content-length", "")
    return int(value) if value.isdigit() else None


class _Counter:
    """The bytes of one body as they arrive, checked against the limits: on the wire (what the server sends,
    against max_bytes and what it announced) and, for a compressed body, what it decodes to (against max_bytes)."""

    def __init__(self, response: httpx.Response, what: str, url: str, limits: Limits, announced: int | None,
                 wire_before: int = 0):
        self.response, self.what, self.url, self.limits = response, what, redact(url), limits
        self.encoding = _encoding(response)
        self.announced = _length(response) if self.encoding else announced
        self.wire_before = 0 if self.encoding else wire_before
        self.decoded = 0

    @property
    def wire(self) -> int:
        return self.wire_before + self.response.num_bytes_downloaded

    def chunks(self):
        """The body's bytes as they arrive, each counted before it is passed on. A gzip or deflate body is decoded
        here in pieces of at most 1 MiB: httpx decodes each chunk read whole, and 64 KiB of gzip can decode to 64 MB
        in one piece, held before any count could refuse it."""
        if self.encoding not in ("gzip", "x-gzip", "deflate"):  # httpx decodes no other (it passes them as they are)
            for chunk in self.response.iter_bytes():
                self.add(chunk)
                yield chunk
            return
        # gzip: a gzip header; deflate: a zlib header (RFC 9110), or raw deflate as some servers send it (as httpx)
        decoder = zlib.decompressobj(zlib.MAX_WBITS | (16 if "gzip" in self.encoding else 0))
        started = False
        for raw in self.response.iter_raw():
            while raw:
                try:
                    piece = decoder.decompress(raw, MiB)
                except zlib.error:
                    if started or self.encoding != "deflate":
                        raise httpx.DecodingError(f"the body is not valid {self.encoding}") from None
                    decoder, started = zlib.decompressobj(-zlib.MAX_WBITS), True
                    continue
                started, raw = True, decoder.unconsumed_tail
                self.add(piece)
                yield piece
        if rest := decoder.flush():  # what a last match left pending: at most a few hundred bytes
            self.add(rest)
            yield rest

    def add(self, chunk: bytes) -> None:
        self.decoded += len(chunk)
        if self.wire > self.limits.max_bytes:
            raise DownloadError(f"{self.what}: {self.url} is over the {human_bytes(self.limits.max_bytes)} limit"
                                + (f" ({self.encoding}-compressed bytes received)." if self.encoding else "."))
        if self.encoding and self.decoded > self.limits.max_bytes:
            raise DownloadError(f"{self.what}: {self.url} is {self.encoding}-compressed and decodes to more than the "
                                f"{human_bytes(self.limits.max_bytes)} limit.")
        if self.announced is not None and self.wire > self.announced:
            raise DownloadError(f"{self.what}: {self.url} sent more bytes than it announced ({self.announced}"
                                + (f" {self.encoding}-compressed)." if self.encoding else ")."))

    @property
    def complete(self) -> bool:
        return self.announced is None or self.wire == self.announced


def _problem(exc: Exception) -> str:
    return "stopped sending data" if isinstance(exc, httpx.TimeoutException) else "kept dropping the connection"


@contextlib.contextmanager
def _session(url: str, what: str, limits: Limits):
    """A guarded client, with transport failures turned into DownloadErrors that name the URL (never its query)."""
    if not url.lower().startswith(("https://", "http://")):
        raise DownloadError(f"{what}: only http(s) URLs can be fetched, not {redact(url)!r}.")
    # Every socket operation ends by the fetch's deadline: a host that sends a byte (or a header line) at a time
    # cannot stretch it (the same total_timeout _Deadline counts from, started here for the headers too).
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
          limits: Limits, deadline: _Deadline, auth_hint: str | None, space_hint: str, started: float) -> Path:
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
                raise _status_error(response, what, url, auth_hint)
            body = bytearray()
            counter = _Counter(response, what, url, limits, None)
            for chunk in counter.chunks():
                body += chunk
    try:
        return json.loads(body)
    except ValueError:
        raise DownloadError(f"{what}: {redact(url)} did not answer JSON.") from None


def _probe(client: httpx.Client, url: str, headers: dict, what: str, auth_hint: str | None) -> Probe:
    """Total size (if announced), whether the server honours byte ranges, and where redirects led."""
    with client.stream("GET", url, headers={**headers, **IDENTITY, "Range": "bytes=0-0"}) as response:
        final, etag, encoded = str(response.url), response.headers.get("etag"), _encoding(response) is not None
        if response.status_code == 206:
            total = response.headers.get("content-range", "").rpartition("/")[2]
            return Probe(final, int(total) if total.isdigit() else None, total.isdigit(), etag, encoded)
        if response.status_code == 200:  # no ranges; a compressed body announces its compressed length
            return Probe(final, _length(response), False, etag, encoded)
        if response.status_code == 416:  # empty file
            return Probe(final, 0, False, etag)
        raise _status_error(response, what, url, auth_hint)


def _stream(client, url, headers, part: Path, size, what, limits: Limits, deadline: _Deadline, auth_hint,
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
                        raise _status_error(response, what, url, auth_hint)
                    encoded = _encoding(response) is not None
                    if received and (response.status_code == 200 or encoded):  # no resume: start over
                        fh.seek(0)
                        fh.truncate()
                        received = 0
                        if meter is not None:
                            meter.done = 0
                    counter = _Counter(response, what, url, limits, size, wire_before=received)
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
                problem = f"{_problem(exc)} ({received} of {size or '?'} bytes received)"
                # A body that ends short again without a byte more (a host whose length is wrong) is not retried on.
                stalled = attempt > 1 and received == before and isinstance(exc, httpx.RemoteProtocolError)
                if attempt > limits.retries or stalled:
                    raise DownloadError(f"{what}: {redact(url)} {problem}.") from None
                log.warning("%s: connection dropped after %d bytes, resuming (attempt %d)", what, received, attempt)
                time.sleep(max(0.0, min(2**attempt * 0.25, 4, deadline.end - time.monotonic())))
                deadline.check(what, url, problem)


def _parallel(client, url, headers, part: Path, size: int, what, limits: Limits, deadline: _Deadline, auth_hint,
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


def _fetch_range(client, url, headers, first: int, last: int, write, what, limits: Limits, deadline: _Deadline,
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
                    raise _status_error(response, what, url, auth_hint)
                encoding = _encoding(response)
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
                raise DownloadError(f"{what}: {redact(url)} {_problem(exc)}.") from None
            time.sleep(max(0.0, min(2**attempt * 0.25, 4, deadline.end - time.monotonic())))
            deadline.check(what, url, _problem(exc))


@contextlib.contextmanager
def ranged(url: str, *, what: str = "download", headers: dict[str, str] | None = None, limits: Limits = Limits(),
           auth_hint: str | None = None):
    """For a reader that takes a file in parts as they arrive (flux/tarstream.py): yields (probe, fetch, whole), where
    fetch(first, last, write, stop) GETs bytes first..last of where url leads, with download()'s checks, retries and
    credentials rule, passing each chunk to write(offset, chunk); it returns early once the threading.Event stop is
    set. whole(dest, space_hint) is download() to dest on the same probe (download() is this, for a server that takes
    no ranges too). Transport failures inside the block become DownloadErrors."""
    deadline = _Deadline(limits.total_timeout)
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
        target, target_headers = found.url, _headers_for(found.url, url, headers)
        meter = Meter(what, found.size) if found.size is None or found.size >= limits.progress_bytes else None

        def fetch(first: int, last: int, write, stop: threading.Event) -> None:
            _fetch_range(session, target, target_headers, first, last, write, what, limits, deadline, auth_hint,
                         meter, stop, found.size)

        def whole(dest: Path, space_hint: str = "") -> Path:
            return _save(session, url, dest, found, target, target_headers, meter, what, limits, deadline, auth_hint,
                         space_hint, started)

        yield found, fetch, whole
