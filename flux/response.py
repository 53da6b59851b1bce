"""One HTTP response as the downloader reads it: what it may cost (Limits, the Deadline), its body counted and
decoded as it arrives (Counter: bytes on the wire and what they decode to, a compressed body decoded in bounded
pieces), and what it means for the caller in our words (DownloadError, status_error). URLs are shown without their
query string (`redact`); credentials go only to the origin they were given for (`headers_for`). flux/download.py
runs the requests."""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import httpx

from .errors import UserError
from .progress import human_bytes

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


def status_error(response: httpx.Response, what: str, url: str, auth_hint: str | None = None) -> DownloadError:
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


def headers_for(url: str, original: str, headers: dict[str, str]) -> dict[str, str]:
    """Credentials go only to the origin they were given for."""
    if same_origin(url, original):
        return headers
    return {k: v for k, v in headers.items() if k.lower() not in ("authorization", "cookie")}


class Deadline:
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


def encoding_of(response: httpx.Response) -> str | None:
    """The Content-Encoding a response's body is compressed with (None: the bytes are the file's)."""
    value = response.headers.get("content-encoding", "").strip().lower()
    return None if value in ("", "identity") else value


def length_of(response: httpx.Response) -> int | None:
    value = response.headers.get("content-length", "")
    return int(value) if value.isdigit() else None


class Counter:
    """The bytes of one body as they arrive, checked against the limits: on the wire (what the server sends,
    against max_bytes and what it announced) and, for a compressed body, what it decodes to (against max_bytes)."""

    def __init__(self, response: httpx.Response, what: str, url: str, limits: Limits, announced: int | None,
                 wire_before: int = 0):
        self.response, self.what, self.url, self.limits = response, what, redact(url), limits
        self.encoding = encoding_of(response)
        self.announced = length_of(response) if self.encoding else announced
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


def problem_of(exc: Exception) -> str:
    return "stopped sending data" if isinstance(exc, httpx.TimeoutException) else "kept dropping the connection"
