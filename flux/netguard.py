"""Refuse to fetch from non-public addresses (SSRF guard) for every URL the project fetches itself.

A user-supplied URL (a LoRA reference, a weights URL) must not make the
container talk to loopback, private networks, link-local addresses such as the
cloud metadata service at 169.254.169.254, or any other non-global address.
The check runs where the connection is made, on the addresses DNS returned,
and the socket connects to the address that passed the check: a redirect to a
private host or a DNS answer that changes between check and use (rebinding)
is refused too.

FLUX_ALLOW_PRIVATE_URLS=1 allows them (tests, private deployments).

A client may also be given a deadline (a time.monotonic() value): every connect, TLS handshake, read and write of
its connections then waits at most until it, so a host that sends a byte at a time (a body, or header lines)
cannot stretch a fetch past it; past it, the next socket operation fails as a timeout.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import socket
import time
import typing

import httpcore
import httpx
from httpcore._backends.sync import SyncStream  # httpcore's own socket stream (not re-exported)

from .errors import UserError

ENV = "FLUX_ALLOW_PRIVATE_URLS"


class PrivateAddressError(UserError):
    """A URL resolved to an address this container does not fetch from."""


def allow_private() -> bool:
    return os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes")


def is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def resolve(host: str, port: int) -> list[tuple]:
    """getaddrinfo results for host, refusing non-public addresses unless allowed."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise httpcore.ConnectError(f"could not resolve {host}: {exc}") from None
    if not allow_private():
        blocked = sorted({info[4][0] for info in infos if not is_public(info[4][0])})
        if blocked:
            raise PrivateAddressError(
                f"{host} resolves to a non-public address ({', '.join(blocked)}); this container only fetches from "
                f"public addresses. Use a public URL (private deployments can set {ENV}=1)."
            )
    return infos


def _within(deadline: float | None, timeout: float | None, error: type[Exception]) -> float | None:
    """An operation's timeout shortened to what is left before the deadline; past it, `error`."""
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        raise error("the deadline of the fetch has passed")
    return left if timeout is None else min(timeout, left)


class _Bounded(httpcore.NetworkStream):
    """A connection whose every operation ends by the deadline."""

    def __init__(self, stream: httpcore.NetworkStream, deadline: float | None):
        self._stream, self._deadline = stream, deadline

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, _within(self._deadline, timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, _within(self._deadline, timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        timeout = _within(self._deadline, timeout, httpcore.ConnectTimeout)
        return _Bounded(self._stream.start_tls(ssl_context, server_hostname, timeout), self._deadline)

    def get_extra_info(self, info: str) -> typing.Any:
        return self._stream.get_extra_info(info)


class GuardedBackend(httpcore.SyncBackend):
    """httpcore's socket backend, connecting only to addresses that passed the check, every operation of its
    connections ending by `deadline` (a time.monotonic() value; None: only their own timeouts)."""

    def __init__(self, deadline: float | None = None):
        self.deadline = deadline

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: typing.Iterable | None = None) -> httpcore.NetworkStream:
        timeout = _within(self.deadline, timeout, httpcore.ConnectTimeout)
        last_error: Exception | None = None
        for family, kind, proto, _, address in resolve(host, port):
            try:
                sock = socket.socket(family, kind, proto)
                sock.settimeout(timeout)
                for option in socket_options or ():
                    sock.setsockopt(*option)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if local_address:
                    sock.bind((local_address, 0))
                sock.connect(address)
            except socket.timeout as exc:
                sock.close()
                last_error = httpcore.ConnectTimeout(str(exc))
            except OSError as exc:
                sock.close()
                last_error = httpcore.ConnectError(str(exc))
            else:
                return _Bounded(SyncStream(sock), self.deadline)
        raise last_error or httpcore.ConnectError(f"could not connect to {host}")


def transport(deadline: float | None = None, **kwargs) -> httpx.HTTPTransport:
    """An httpx transport whose connections go through GuardedBackend (ending by `deadline` when given)."""
    t = httpx.HTTPTransport(**kwargs)
    # httpx does not expose httpcore's network_backend argument; its pool is the place it lives (httpx 0.28).
    t._pool._network_backend = GuardedBackend(deadline)
    return t


def client(deadline: float | None = None, **kwargs) -> httpx.Client:
    """An httpx.Client that follows redirects and refuses non-public addresses (environment proxies ignored); with a
    deadline (a time.monotonic() value), nothing it does on the network lasts past it."""
    kwargs.setdefault("follow_redirects", True)
    return httpx.Client(transport=transport(deadline), trust_env=False, **kwargs)


# huggingface_hub's own client waits forever by default (timeout=None): a hub that stops answering would hang a
# request. 60 s of silence, 10 s to connect; its calls that pass a timeout of their own keep it.
HUB_TIMEOUT = httpx.Timeout(60.0, connect=10.0)


@functools.cache
def install_for_huggingface_hub() -> None:
    """Make huggingface_hub's own HTTP calls (API, file downloads, redirects) go through the guard too. Once per
    process: huggingface_hub closes its shared client on every install (the guard reads FLUX_ALLOW_PRIVATE_URLS
    on each connection, so one install keeps up with it)."""
    import huggingface_hub
    from huggingface_hub.utils._http import hf_request_event_hook  # what huggingface_hub's default client installs

    def factory() -> httpx.Client:
        return httpx.Client(
            transport=transport(), event_hooks={"request": [hf_request_event_hook]},
            follow_redirects=True, timeout=HUB_TIMEOUT,
        )

    huggingface_hub.set_client_factory(factory)
