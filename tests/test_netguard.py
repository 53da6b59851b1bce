"""The SSRF guard: URLs the project fetches itself never reach non-public addresses unless allowed."""

from __future__ import annotations

import pytest

from flux import download, netguard, weights
from flux.errors import UserError
from tests.helpers.http import FileServer, HubServer


@pytest.fixture
def guarded(monkeypatch, tmp_path, weights_root):
    monkeypatch.delenv(netguard.ENV, raising=False)
    return tmp_path


@pytest.mark.parametrize("address,public", [
    ("127.0.0.1", False), ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False),
    ("169.254.169.254", False), ("0.0.0.0", False), ("100.64.0.1", False), ("::1", False), ("fe80::1", False),
    ("fc00::1", False), ("::ffff:127.0.0.1", False), ("224.0.0.1", False), ("8.8.8.8", True),
    ("2606:4700:4700::1111", True),
])
def test_is_public(address, public):
    assert netguard.is_public(address) is public


def test_loopback_refused_by_default(guarded):
    with FileServer() as srv:
        url = srv.add("/lora.safetensors", b"x" * 100)
        with pytest.raises(netguard.PrivateAddressError, match="non-public address"):
            download.download(url, guarded / "out")
        assert srv.requests == []  # refused before connecting
    assert not (guarded / "out").exists()


def test_hostname_resolving_to_loopback_refused(guarded):
    with FileServer() as srv:
        srv.add("/f", b"data")
        url = srv.url("/f").replace("127.0.0.1", "localhost")
        with pytest.raises(netguard.PrivateAddressError, match="localhost resolves to a non-public address"):
            download.download(url, guarded / "out")


def test_metadata_service_refused(guarded):
    with pytest.raises(netguard.PrivateAddressError, match="169.254.169.254"):
        download.download("http://169.254.169.254/latest/meta-data/", guarded / "out")


def test_redirect_to_private_address_refused(guarded, monkeypatch):
    """A redirect is checked like the first request: the second hop is refused."""
    with FileServer() as target:
        target.add("/secret", b"internal")
        calls = []

        def fake_resolve(host, port):
            calls.append(host)
            if host == "public.example":  # pretend this name is public, and point it at the test server
                import socket
                return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
            return original(host, port)

        original = netguard.resolve
        with FileServer() as front:
            port = int(front.base.rsplit(":", 1)[1])
            front.add("/lora.safetensors", b"", redirect=target.url("/secret"))
            monkeypatch.setattr(netguard, "resolve", fake_resolve)
            with pytest.raises(netguard.PrivateAddressError, match="127.0.0.1"):
                download.download(f"http://public.example:{port}/lora.safetensors", guarded / "out")
        assert calls == ["public.example", "127.0.0.1"]
        assert target.requests == []


def test_allowed_with_env(guarded, monkeypatch):
    monkeypatch.setenv(netguard.ENV, "1")
    with FileServer() as srv:
        url = srv.add("/f", b"hello")
        assert download.download(url, guarded / "out").read_bytes() == b"hello"


def test_weights_tar_url_guarded(guarded):
    with FileServer() as srv:
        with pytest.raises(UserError, match="non-public address"):
            weights.locate(srv.add("/w.tar", b"not reached"), "dev")


def test_hugging_face_endpoint_guarded(guarded, monkeypatch):
    with HubServer() as hub:
        hub.add_repo("black-forest-labs/FLUX.1-dev", {"model_index.json": b"{}"})
        monkeypatch.setenv("HF_ENDPOINT", hub.base)
        with pytest.raises(UserError, match="non-public address"):
            weights.locate("black-forest-labs/FLUX.1-dev", "dev")
        assert hub.requests == []


def test_non_http_schemes_refused(guarded):
    with pytest.raises(UserError, match="only http"):
        download.download("file:///etc/passwd", guarded / "out")
