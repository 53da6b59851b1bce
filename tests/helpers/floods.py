"""Files and servers that ask a reader for more than they weigh: a tar whose long-name header is huge, a zip whose
directory lists a million entries, a safetensors file of many tiny tensors, hosts that send a byte at a time.

Each is built in a second or less from a few repeated blocks, not written member by member.
"""

from __future__ import annotations

import json
import socket
import struct
import tarfile
import time
import zlib
from http.server import BaseHTTPRequestHandler

from tests.helpers.http import LocalServer, _Server

BLOCK = tarfile.BLOCKSIZE


def long_name_targz(name_bytes: int, lora: bytes) -> bytes:
    """A .tar.gz whose first header is a GNU long name of name_bytes bytes (compressed to about a thousandth of
    that), naming an empty file, then the LoRA."""
    gz = zlib.compressobj(9, zlib.DEFLATED, 31)
    info = tarfile.TarInfo("././@LongLink")
    info.type, info.size = tarfile.GNUTYPE_LONGNAME, name_bytes
    out = [gz.compress(info.tobuf(tarfile.GNU_FORMAT))]
    chunk = b"a" * 2**20
    for start in range(0, name_bytes, len(chunk)):
        out.append(gz.compress(chunk[: min(len(chunk), name_bytes - start)]))
    member = tarfile.TarInfo("lora.safetensors")
    member.size = len(lora)
    out.append(gz.compress(bytes(-name_bytes % BLOCK) + tarfile.TarInfo("named").tobuf(tarfile.GNU_FORMAT)
                           + member.tobuf(tarfile.GNU_FORMAT) + lora
                           + bytes(-len(lora) % BLOCK) + bytes(2 * BLOCK)))
    out.append(gz.flush())
    return b"".join(out)


def zip64_of_entries(count: int) -> bytes:
    """A zip64 whose central directory lists `count` empty stored files (all named "a"), as a real zip64 declares
    them in its end records. Nothing but the directory: it is refused before any member would be read."""
    entry = struct.pack("<4s4B4HL2L5H2L", b"PK\x01\x02", 45, 3, 45, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0) + b"a"
    directory = entry * count
    end64 = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count, len(directory), 0)
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, len(directory), 1)
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    return directory + end64 + locator + end


def tensor_flood(count: int) -> bytes:
    """A valid safetensors file of `count` one-element float32 tensors (short names: a header of about 60 bytes a
    tensor)."""
    header = {f"t{i}": {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i in range(count)}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + bytes(4 * count)


class _Drip(BaseHTTPRequestHandler):
    """/body: headers, then one byte of an announced 1 MB body every `every` seconds; /headers: a status line, then
    one header line every `every` seconds, never ending them. Both stop after `lasts` seconds (a test that fails
    does not hang)."""

    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, *args):
        pass

    def do_GET(self):
        every, lasts = self.server.owner.every, self.server.owner.lasts
        self.server.owner.requests += 1
        end = time.monotonic() + lasts
        try:
            if self.path.startswith("/headers"):
                self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                while time.monotonic() < end:
                    self.wfile.write(b"X-Drip: 1\r\n")
                    self.wfile.flush()
                    time.sleep(every)
            else:
                self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n")
                while time.monotonic() < end:
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(every)
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            pass
        self.close_connection = True


class DripServer(LocalServer):
    handler = _Drip

    def __init__(self, every: float = 0.2, lasts: float = 20.0):
        self.every, self.lasts, self.requests = every, lasts, 0
        super().__init__()
