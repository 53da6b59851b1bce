"""A local HTTP file server on 127.0.0.1 only, for tests and benchmarks: static files with byte ranges and
misbehaviours (tests/helpers/http.py builds a tiny Hugging Face hub on it).

  python script/fileserver.py FILE...   serves each FILE at /<its name> from a process of its own, prints each URL
                                        (one a line), and stops when its stdin closes (script/benchmark tar-stream)

FileServer serves `files[path] = bytes` with byte ranges, and per path can:
  no_ranges  ignore Range headers (always 200 with the whole body)
  slow       sleep between chunks (seconds per 64 KiB)
  truncate   announce the full length but close after this many bytes
  hang       accept the request, then send nothing for this many seconds
  hang_first the same, on the first request for the path only (a download that starts slowly)
  extra      on a full (200) response, send this many bytes more than the file has, without a Content-Length
             (the body ends when the connection closes): more bytes than a ranged probe announced
  reset      with truncate: end with a TCP reset (RST) instead of a clean close
  auth       require `Authorization: Bearer <auth>` (401 otherwise)
  status     answer with this HTTP status
  redirect   answer 302 to this location
  content_type  the Content-Type header
  encoding   send the body compressed with this Content-Encoding ("gzip"; "gzip-broken": announced as gzip, not
             gzip), whatever the request's Accept-Encoding, without ranges (a misbehaving server or CDN)
A file's body is bytes, or an OnDisk file read as it is served (a sparse file of many GiB costs no memory).
Every request is recorded in `requests` (method, path, headers) for assertions.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


@functools.lru_cache(maxsize=64)
def etag(body) -> str:
    """The body's ETag, hashed once per body (a benchmark serves 512 MiB in many ranged parts); a file on disk's
    from its path, size and time."""
    if isinstance(body, OnDisk):
        stat = os.stat(body.path)
        return f'"{body.path}-{stat.st_size}-{stat.st_mtime_ns}"'
    return f'"{hashlib.sha256(body).hexdigest()}"'


class OnDisk:
    """A file served from disk, read only where a response reads it: len(), and slices that are views until read."""

    def __init__(self, path, start: int = 0, end: int | None = None):
        self.path, self.start = path, start
        self.end = os.path.getsize(path) if end is None else end

    def __len__(self) -> int:
        return self.end - self.start

    def __getitem__(self, part: slice):
        first, last, _ = part.indices(len(self))
        return OnDisk(self.path, self.start + first, self.start + max(first, last))

    def __bytes__(self) -> bytes:
        with open(self.path, "rb") as fh:
            fh.seek(self.start)
            return fh.read(len(self))


@dataclass
class Behaviour:
    no_ranges: bool = False
    slow: float = 0.0
    truncate: int | None = None
    hang: float = 0.0
    hang_first: float = 0.0
    extra: int = 0
    reset: bool = False
    auth: str | None = None
    status: int | None = None
    redirect: str | None = None
    content_type: str = "application/octet-stream"
    encoding: str | None = None


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, *args):  # quiet
        pass

    def do_HEAD(self):
        self._serve(head=True)

    def do_GET(self):
        self._serve(head=False)

    def _serve(self, head: bool):
        owner = self.server.owner
        owner.requests.append(Recorded(self.command, self.path, dict(self.headers)))
        path = unquote(urlsplit(self.path).path)
        route = owner.route(self, path, head)
        if route is not None:
            return
        body = owner.files.get(path)
        behaviour = owner.behaviours.get(path, Behaviour())
        if behaviour.hang:
            time.sleep(behaviour.hang)
        if behaviour.hang_first and sum(r.path == self.path for r in owner.requests) == 1:
            time.sleep(behaviour.hang_first)
        if behaviour.redirect:
            self.send_response(302)
            self.send_header("Location", behaviour.redirect)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if behaviour.auth and self.headers.get("Authorization") != f"Bearer {behaviour.auth}":
            return self._plain(401, b"unauthorized")
        if behaviour.status:
            return self._plain(behaviour.status, b"error")
        if body is None:
            return self._plain(404, b"not found")
        if behaviour.encoding:
            payload = gzip.compress(body) if behaviour.encoding == "gzip" else b"\x1f\x8b this is not gzip" + body[:64]
            return self._plain(200, b"" if head else payload, {"Content-Encoding": "gzip",
                                                                "Content-Type": behaviour.content_type})
        start, end, status = 0, len(body) - 1, 200
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if match and not behaviour.no_ranges:
            start = int(match.group(1))
            end = min(int(match.group(2)) if match.group(2) else len(body) - 1, len(body) - 1)
            if start >= len(body):
                return self._plain(416, b"")
            status = 206
        # no copies of a large body: a benchmark serves 1 GiB in parts
        chunk = body[start:end + 1] if isinstance(body, OnDisk) else memoryview(body)[start:end + 1]
        self.send_response(status)
        self.send_header("Content-Type", behaviour.content_type)
        if behaviour.extra and status == 200:
            self.send_header("Connection", "close")
        else:
            self.send_header("Content-Length", str(len(chunk)))
        self.send_header("ETag", etag(body))
        if not behaviour.no_ranges:
            self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(body)}")
        self.end_headers()
        if head:
            return
        payload = bytes(chunk) + b"\0" * behaviour.extra if behaviour.extra and status == 200 else chunk
        if behaviour.truncate is not None:
            payload = payload[: max(0, behaviour.truncate - start)]
        try:
            for i in range(0, len(payload), 65536):
                piece = payload[i:i + 65536]
                self.wfile.write(bytes(piece) if isinstance(piece, OnDisk) else piece)
                if behaviour.slow:
                    time.sleep(behaviour.slow)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            return
        if behaviour.reset:
            import socket
            import struct

            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()  # linger 0: the peer sees "connection reset by peer"
            self.close_connection = True
            return
        if behaviour.truncate is not None or behaviour.extra:
            self.close_connection = True

    def _plain(self, status: int, body: bytes, headers: dict | None = None):
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            try:
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                return

    def json(self, status: int, obj, headers: dict | None = None):
        self._plain(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: object

    def handle_error(self, request, client_address):
        """A client closing its kept-alive connection (a cog server stopped, a cancelled download) is not an error of
        the test; anything else is printed as socketserver does."""
        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            super().handle_error(request, client_address)


class LocalServer:
    """A threaded HTTP server on 127.0.0.1 (a free port) for the duration of a `with` block."""

    handler: type[BaseHTTPRequestHandler]

    def __init__(self):
        self._server = _Server(("127.0.0.1", 0), self.handler)
        self._server.owner = self
        # serve_forever checks for shutdown every poll_interval: 0.5 s by default, a wait at every server's end
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    @property
    def base(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, path: str) -> str:
        return self.base + path

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()


class FileServer(LocalServer):
    handler = _Handler

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.behaviours: dict[str, Behaviour] = {}
        self.requests: list[Recorded] = []
        super().__init__()

    def add(self, path: str, body: bytes, **behaviour) -> str:
        self.files[path] = body
        self.behaviours[path] = Behaviour(**behaviour)
        return self.url(path)

    def ranged_gets(self) -> list[str]:
        """The Range headers of the requests for a file's parts (not the one-byte probe, not whole GETs)."""
        return [r.headers["Range"] for r in self.requests if r.headers.get("Range", "bytes=0-0") != "bytes=0-0"]

    def route(self, handler: _Handler, path: str, head: bool):
        """Override for dynamic routes; return None to fall through to static files."""
        return None


def main(paths: list[str]) -> None:
    with FileServer() as server:
        for path in map(Path, paths):
            print(server.add(f"/{path.name}", path.read_bytes()), flush=True)
        sys.stdin.read()  # until the caller closes it


if __name__ == "__main__":
    main(sys.argv[1:])
