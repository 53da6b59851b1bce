"""lora_loader: every reference kind fetched from servers on 127.0.0.1 (hosts mapped by configuration), the cache,
the refusals, and every layout normalized by diffusers' converters."""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

import pytest
import torch

import lora_loader
from flux.settings import LoraSettings
from flux.fakes import tiny
from flux.cache import DiskCache
from flux.errors import UserError
from tests.helpers import hostile, loras
from tests.helpers.images import data_uri
from tests.helpers.http import FileServer, HubServer

TOKEN = "tok_SECRET_0123456789"


@pytest.fixture(scope="module")
def tiny_pipe():
    return tiny.build_pipeline()


@pytest.fixture(scope="module")
def lora_file(tiny_pipe) -> bytes:
    return loras.lora_bytes(loras.make_update(tiny_pipe.transformer, "ATTENTION"), "ai-toolkit")


@pytest.fixture
def env(weights_root):
    """An empty cache and a loader; hosts are mapped per test with monkeypatch."""
    return weights_root / "loras"


@pytest.fixture
def loader():
    return lora_loader.LoraLoader()


def fetch(loader, reference, **tokens):
    """A fetch by the loader of a container set up now: each test maps hosts, limits and tokens through the
    environment first (LoraSettings, read once at setup), then fetches with the request's tokens."""
    loader.settings = LoraSettings.from_env()
    return loader.fetch(reference, loader.tokens(**tokens))


def cache_names(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ----- parsing ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("fofr/flux-pixar-cars", lora_loader.ReplicateRef("fofr", "flux-pixar-cars")),
    ("fofr/flux-pixar-cars/abc123", lora_loader.ReplicateRef("fofr", "flux-pixar-cars", "abc123")),
    ("fofr/flux-pixar-cars/versions/abc123", lora_loader.ReplicateRef("fofr", "flux-pixar-cars", "abc123")),
    ("fofr/flux-pixar-cars:abc123", lora_loader.ReplicateRef("fofr", "flux-pixar-cars", "abc123")),
    ("https://replicate.com/fofr/flux.pixar/versions/abc123", lora_loader.ReplicateRef("fofr", "flux.pixar", "abc123")),
    ("huggingface.co/owner/repo", lora_loader.HuggingFaceRef("owner/repo")),
    ("https://huggingface.co/owner/repo/", lora_loader.HuggingFaceRef("owner/repo")),
    ("huggingface.co/owner/repo/sub/lora.safetensors", lora_loader.HuggingFaceRef("owner/repo", "main", "sub/lora.safetensors")),
    ("https://huggingface.co/owner/repo/resolve/v2/lora.safetensors?download=true",
     lora_loader.HuggingFaceRef("owner/repo", "v2", "lora.safetensors")),
    ("https://huggingface.co/owner/repo/blob/main/a.safetensors", lora_loader.HuggingFaceRef("owner/repo", "main", "a.safetensors")),
    ("civitai.com/models/123", lora_loader.CivitaiRef("123")),
    ("https://civitai.com/models/123/some-style?modelVersionId=456", lora_loader.CivitaiRef("123", "456")),
    ("https://civitai.com/api/download/models/456?type=Model", lora_loader.CivitaiRef(None, "456")),
    ("https://example.com/x.safetensors?sig=abc", lora_loader.UrlRef("https://example.com/x.safetensors?sig=abc")),
])
def test_references_are_understood(text, expected):
    assert lora_loader.parse(text) == expected


@pytest.mark.parametrize("text,message", [
    ("not a reference", "Cannot read the LoRA reference"),
    ("example.com/lora.safetensors", "Cannot read the LoRA reference"),  # a URL without its scheme
    ("huggingface.co/datasets/x/y", "not a Hugging Face model reference"),
    ("civitai.com/images/5", "CivitAI references look like"),
])
def test_unreadable_references_name_the_accepted_forms(text, message):
    with pytest.raises(UserError, match=message):
        lora_loader.parse(text)


def test_pinned_references():
    assert lora_loader.parse("a/b/v1").pinned and not lora_loader.parse("a/b").pinned
    assert not lora_loader.parse("huggingface.co/a/b/x.safetensors").pinned  # a branch can move
    assert lora_loader.parse(f"huggingface.co/a/b/resolve/{'0' * 40}/x.safetensors").pinned
    assert lora_loader.parse("civitai.com/api/download/models/5").pinned and not lora_loader.parse("civitai.com/models/5").pinned


# ----- Replicate ----------------------------------------------------------------------------------------------------

def test_replicate_model_tar_via_redirect_rechecked_and_cached_by_version(env, loader, lora_file, monkeypatch):
    other = loras.lora_bytes(loras.make_update(tiny.build_pipeline().transformer, "ATTENTION", seed=9), "ai-toolkit")
    with FileServer() as srv:
        monkeypatch.setenv("FLUX_REPLICATE_URL", srv.base)
        srv.add("/delivery/v1/trained_model.tar", loras.tar_of({"output/lora.safetensors": lora_file, "config.yaml": b"x"}))
        srv.add("/delivery/v2/trained_model.tar", loras.tar_of({"output/lora.safetensors": other}))
        srv.add("/me/style/_weights", b"", redirect=srv.url("/delivery/v1/trained_model.tar"))
        first = fetch(loader, "me/style")
        assert first.path.read_bytes() == lora_file
        count = len(srv.requests)
        assert fetch(loader, "me/style").path == first.path
        assert len(srv.requests) == count, "resolved moments ago: no request at all"

        monkeypatch.setenv("FLUX_LORA_RECHECK_S", "0")  # re-resolve: one probe, same version -> same file, no download
        assert fetch(loader, "me/style").key == first.key
        assert all(r.path.endswith("_weights") or r.headers.get("Range") == "bytes=0-0" for r in srv.requests[count:])

        srv.add("/me/style/_weights", b"", redirect=srv.url("/delivery/v2/trained_model.tar"))  # a new version
        second = fetch(loader, "me/style")
        assert second.key != first.key and second.path.read_bytes() == other


def test_replicate_version_is_cached_for_good(env, loader, lora_file, monkeypatch):
    monkeypatch.setenv("FLUX_LORA_RECHECK_S", "0")
    with FileServer() as srv:
        monkeypatch.setenv("FLUX_REPLICATE_URL", srv.base)
        srv.add("/d/abc.tar", loras.tar_of({"lora.safetensors": lora_file}))
        srv.add("/me/style/versions/abc/_weights", b"", redirect=srv.url("/d/abc.tar"))
        path = fetch(loader, "me/style/abc").path
        count = len(srv.requests)
        assert fetch(loader, "replicate.com/me/style/versions/abc").path == path
        assert fetch(lora_loader.LoraLoader(), "me/style:abc").path == path  # after a restart too
        assert len(srv.requests) == count


def test_replicate_token_goes_to_replicate_only(env, loader, lora_file, monkeypatch):
    monkeypatch.setenv("REPLICATE_API_TOKEN", TOKEN)
    with FileServer() as front, FileServer() as delivery:
        monkeypatch.setenv("FLUX_REPLICATE_URL", front.base)
        front.add("/me/private/_weights", b"", redirect=delivery.add("/x.tar", loras.tar_of({"l.safetensors": lora_file})),
                  auth=TOKEN)
        assert fetch(loader, "me/private").path.read_bytes() == lora_file
        assert all(r.headers.get("Authorization") == f"Bearer {TOKEN}" for r in front.requests)
        assert delivery.requests and not any("Authorization" in r.headers for r in delivery.requests)


def test_replicate_errors(env, loader, monkeypatch):
    with FileServer() as srv:
        monkeypatch.setenv("FLUX_REPLICATE_URL", srv.base)
        with pytest.raises(UserError, match="Replicate model me/missing was not found"):
            fetch(loader, "me/missing")
        srv.add("/me/private/_weights", b"", auth="other")
        with pytest.raises(UserError, match="me/private is private"):
            fetch(loader, "me/private")
    assert cache_names(env) == []


def test_replicate_tar_with_several_safetensors(env, loader, lora_file, monkeypatch):
    with FileServer() as srv:
        monkeypatch.setenv("FLUX_REPLICATE_URL", srv.base)
        srv.add("/t.tar", loras.tar_of({"a.safetensors": lora_file, "b.safetensors": lora_file}))
        srv.add("/me/two/_weights", b"", redirect=srv.url("/t.tar"))
        with pytest.raises(UserError, match=r"several \.safetensors files \(a\.safetensors, b\.safetensors\)"):
            fetch(loader, "me/two")


# ----- Hugging Face -------------------------------------------------------------------------------------------------

@pytest.fixture
def hub(monkeypatch):
    with HubServer() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.base)
        yield hub


def test_hugging_face_repo_with_one_safetensors(env, loader, lora_file, hub):
    hub.add_repo("me/style", {"lora.safetensors": lora_file, "README.md": b"hi", "optimizer.bin": b"x"})
    got = fetch(loader, "huggingface.co/me/style")
    assert got.path.read_bytes() == lora_file and "@" in got.key
    assert fetch(loader, "https://huggingface.co/me/style/lora.safetensors").key == got.key


def test_hugging_face_repo_with_several_lists_them(env, loader, lora_file, hub):
    hub.add_repo("me/many", {"a.safetensors": lora_file, "b.safetensors": lora_file})
    with pytest.raises(UserError, match=r"2 \.safetensors files: a\.safetensors, b\.safetensors\. Name one"):
        fetch(loader, "huggingface.co/me/many")
    assert fetch(loader, "huggingface.co/me/many/b.safetensors").path.read_bytes() == lora_file


def test_hugging_face_pinned_revision_needs_no_api_call(env, loader, lora_file, hub):
    repo = hub.add_repo("me/pinned", {"x.safetensors": lora_file})
    got = fetch(loader, f"https://huggingface.co/me/pinned/resolve/{repo.sha}/x.safetensors")
    assert got.path.read_bytes() == lora_file
    assert not any(r.path.startswith("/api/") for r in hub.requests)


def test_hugging_face_gated_repo_needs_the_token(env, loader, lora_file, hub, caplog):
    hub.add_repo("me/gated", {"g.safetensors": lora_file}, gated_token=TOKEN)
    with pytest.raises(UserError, match="pass hf_api_token"):
        fetch(loader, "huggingface.co/me/gated")
    with caplog.at_level(logging.DEBUG):
        got = fetch(loader, "huggingface.co/me/gated", hf_api_token=TOKEN)
    assert got.path.read_bytes() == lora_file
    assert TOKEN not in caplog.text and TOKEN not in got.key and TOKEN not in str(got.path)
    assert TOKEN not in repr(lora_loader.Tokens.of(hf_api_token=TOKEN))


def test_hugging_face_missing_repo_and_file(env, loader, hub, lora_file):
    with pytest.raises(UserError, match="repo me/nothing was not found"):
        fetch(loader, "huggingface.co/me/nothing")
    hub.add_repo("me/repo", {"a.safetensors": lora_file})
    with pytest.raises(UserError, match="has no file 'b.safetensors'"):
        fetch(loader, "huggingface.co/me/repo/b.safetensors")
    hub.add_repo("me/pickles", {"pytorch_lora_weights.bin": b"x"})
    with pytest.raises(UserError, match="no .safetensors file .*only pickle files"):
        fetch(loader, "huggingface.co/me/pickles")


# ----- CivitAI ------------------------------------------------------------------------------------------------------

def test_civitai_model_page_resolves_the_latest_version(env, loader, lora_file, monkeypatch):
    with FileServer() as srv:
        monkeypatch.setenv("FLUX_CIVITAI_URL", srv.base)
        srv.add("/api/v1/models/123", loras.civitai_model_json(123, [457, 456]), content_type="application/json")
        srv.add("/api/download/models/457", lora_file, auth=TOKEN)
        with pytest.raises(UserError, match="pass civitai_api_token"):
            fetch(loader, "https://civitai.com/models/123/tiny-style")
        got = fetch(loader, "https://civitai.com/models/123/tiny-style", civitai_api_token=TOKEN)
        assert got.path.read_bytes() == lora_file and got.key == "civitai:457"
        assert not any(TOKEN in r.path for r in srv.requests), "the token travels in a header, never in the URL"
        count = len(srv.requests)
        monkeypatch.setenv("CIVITAI_API_TOKEN", TOKEN)  # from the environment; a version id is cached for good
        assert fetch(loader, "civitai.com/api/download/models/457").path == got.path
        assert len(srv.requests) == count


def test_civitai_errors(env, loader, monkeypatch):
    with FileServer() as srv:
        monkeypatch.setenv("FLUX_CIVITAI_URL", srv.base)
        with pytest.raises(UserError, match="CivitAI model 9 was not found"):
            fetch(loader, "civitai.com/models/9")
        srv.add("/api/v1/models/10", b'{"type": "Checkpoint", "modelVersions": [{"id": 1}]}')
        with pytest.raises(UserError, match="is a Checkpoint, not a LoRA"):
            fetch(loader, "civitai.com/models/10")


# ----- URLs and data: URIs ------------------------------------------------------------------------------------------

def test_the_whole_url_is_the_cache_key_and_its_query_is_never_shown(env, loader, lora_file, tiny_pipe, caplog):
    """Two URLs that differ only in their query are two files (a download?id=1, ?id=2 service); the query, which may
    hold a signature, appears in no log line, key or file name. A re-signed URL of a cached file is fetched again."""
    other = loras.lora_bytes(loras.make_update(tiny_pipe.transformer, "ATTENTION", seed=4), "ai-toolkit")

    class ById(FileServer):
        def route(self, handler, path, head):
            if path != "/download":
                return None
            body = {"id=1": lora_file, "id=2": other}.get(urlsplit(handler.path).query.split("&")[0])
            handler._plain(200 if body else 404, body or b"")
            return True

    with ById() as srv, caplog.at_level(logging.INFO):
        first = fetch(loader, srv.url("/download?id=1&sig=SECRETSIG"))
        second = fetch(loader, srv.url("/download?id=2&sig=SECRETSIG"))
        assert first.path.read_bytes() == lora_file and second.path.read_bytes() == other
        assert first.key != second.key and not second.cached
        assert fetch(loader, srv.url("/download?id=1&sig=SECRETSIG")).cached
        assert not fetch(loader, srv.url("/download?id=1&sig=RESIGNED")).cached
    assert "SECRET" not in caplog.text and "id=" not in caplog.text
    assert not any("SECRET" in k or "id=" in k for k in (first.key, second.key, first.shown, first.path.name))


def test_a_server_that_compresses_the_file_anyway_is_read_and_both_sizes_are_limited(env, loader, lora_file,
                                                                                     monkeypatch):
    """Content-Encoding: gzip on a LoRA although identity was asked for: decoded, checked against the compressed
    length it announced; the limit applies to the bytes on the wire and to what they decode to, each named."""
    import gzip

    with FileServer() as srv:
        got = fetch(loader, srv.add("/gz.safetensors", lora_file, encoding="gzip"))
        assert got.path.read_bytes() == lora_file
        assert all(r.headers.get("Accept-Encoding") == "identity" for r in srv.requests)
        monkeypatch.setenv("FLUX_LORA_MAX_BYTES", str(len(lora_file) - 1))  # the compressed body fits, not the file
        assert len(gzip.compress(lora_file)) < len(lora_file) - 1
        with pytest.raises(UserError, match=r"gzip-compressed and decodes to more than the .* limit"):
            fetch(loader, srv.add("/gz2.safetensors", lora_file, encoding="gzip"))
        monkeypatch.setenv("FLUX_LORA_MAX_BYTES", str(len(gzip.compress(lora_file)) // 2))
        with pytest.raises(UserError, match=r"over the .* limit"):
            fetch(loader, srv.add("/gz3.safetensors", lora_file, encoding="gzip"))
    assert cache_names(env) == [got.path.name]


@pytest.mark.parametrize("case,message", [
    ("redirect loop", "redirects too many times"),
    ("broken gzip", "does not decode as its Content-Encoding says"),
])
def test_misbehaving_servers_fail_in_our_words(env, loader, lora_file, case, message):
    with FileServer() as srv:
        if case == "redirect loop":
            url = srv.add("/loop.safetensors", b"", redirect=srv.url("/loop.safetensors"))
        else:
            url = srv.add("/broken.safetensors", lora_file, encoding="gzip-broken")
        with pytest.raises(UserError, match=message) as failed:
            fetch(loader, url)
    assert not hostile.library_words(str(failed.value)), str(failed.value)
    assert cache_names(env) == []


@pytest.mark.parametrize("behaviour", [dict(no_ranges=True), dict(slow=0.01)])
def test_servers_without_ranges_or_slow(env, loader, lora_file, behaviour):
    with FileServer() as srv:
        got = fetch(loader, srv.add("/l.safetensors", lora_file, **behaviour))
    assert got.path.read_bytes() == lora_file


def test_parallel_ranged_download(env, loader, tiny_pipe, monkeypatch):
    from flux import download
    from tests.test_weights import _small_parts

    monkeypatch.setattr(download.Limits, "__init__", _small_parts(download.Limits.__init__))  # 64 KiB parts
    body = loras.lora_bytes(loras.make_update(tiny_pipe.transformer, "ALL", rank=64), "ai-toolkit")
    with FileServer() as srv:
        got = fetch(loader, srv.add("/big.safetensors", body))
        ranged = srv.ranged_gets()
    assert got.path.read_bytes() == body and len(ranged) > 1


def test_truncating_server_fails_cleanly(env, loader, lora_file):
    with FileServer() as srv:
        with pytest.raises(UserError, match="kept dropping the connection"):
            fetch(loader, srv.add("/cut.safetensors", lora_file, truncate=len(lora_file) // 2))
    assert cache_names(env) == []


def test_timeout_and_size_limit(env, loader, lora_file, monkeypatch):
    with FileServer() as srv:
        monkeypatch.setenv("FLUX_LORA_MAX_BYTES", "1000")
        with pytest.raises(UserError, match=r"KiB, over the 1000 bytes limit"):
            fetch(loader, srv.add("/big.safetensors", lora_file))
        monkeypatch.delenv("FLUX_LORA_MAX_BYTES")
        monkeypatch.setenv("FLUX_LORA_TIMEOUT_S", "0.2")
        with pytest.raises(UserError, match="stopped sending data .* did not finish in time"):
            fetch(loader, srv.add("/slow.safetensors", b"x" * 400_000, slow=0.3))
    assert cache_names(env) == []


@pytest.mark.parametrize("body,message", [
    (b"<!DOCTYPE html><html>login</html>", "is a web page, not a safetensors file"),
    (b"\x80\x04\x95pickled", "is a pickle checkpoint"),
    (b"PK\x03\x04torch-zip", "is a .zip archive that cannot be read"),
    (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json", "is not a safetensors file"),
])
def test_not_safetensors_is_refused_and_not_cached(env, loader, body, message):
    with FileServer() as srv:
        with pytest.raises(UserError, match=message):
            fetch(loader, srv.add("/x.safetensors", body))
    assert cache_names(env) == []


def test_truncated_safetensors_is_refused(env, loader, lora_file):
    with FileServer() as srv:
        with pytest.raises(UserError, match="not a safetensors file"):
            fetch(loader, srv.add("/half.safetensors", lora_file[: len(lora_file) // 2]))


def test_pickle_urls_are_never_downloaded(env, loader):
    with FileServer() as srv:
        with pytest.raises(UserError, match="pickle checkpoint"):
            fetch(loader, srv.add("/lora.bin", b"\x80\x04"))
        assert srv.requests == []


def test_not_found_and_unauthorized(env, loader):
    with FileServer() as srv:
        with pytest.raises(UserError, match=r"was not found \(404\)"):
            fetch(loader, srv.url("/missing.safetensors"))
        with pytest.raises(UserError, match="not authorized"):
            fetch(loader, srv.add("/private.safetensors", b"x", auth="t"))


def test_data_uris_of_a_file_and_of_a_tar(env, loader, lora_file):
    for body in (lora_file, loras.tar_of({"dir/lora.safetensors": lora_file})):
        uri = data_uri(body, "application/octet-stream")
        assert fetch(loader, uri).path.read_bytes() == lora_file
    with pytest.raises(UserError, match="not valid base64"):
        fetch(loader, "data:;base64,@@@")


@pytest.mark.parametrize("mode", ["w", "w:gz", "w:bz2", "w:xz"])
def test_tar_archives_of_every_compression(env, loader, lora_file, mode):
    body = loras.tar_of({"output/config.yaml": b"x", "output/lora.safetensors": lora_file}, mode)
    assert fetch(loader, data_uri(body, "")).path.read_bytes() == lora_file


def test_archives_are_capped_while_reading(env, loader, lora_file, monkeypatch):
    """Members and content are counted as the archive is read: a .tar.gz of 60,000 empty files is refused at the
    cap, not unpacked; content beyond FLUX_LORA_MAX_BYTES is refused (a zip by what it unpacks to)."""
    with pytest.raises(UserError, match=r"holds more than 1,000 files") as failed:
        fetch(loader, data_uri(hostile.targz_of_empty_members(60_000, lora_file), ""))
    assert "Send the .safetensors file itself" in str(failed.value)
    many = {f"f{i}.txt": b"" for i in range(lora_loader.MAX_MEMBERS + 1)}
    with pytest.raises(UserError, match=r"zip archive holds more than 1,000 files"):
        fetch(loader, data_uri(hostile.zip_of({**many, "lora.safetensors": lora_file}), ""))
    monkeypatch.setenv("FLUX_LORA_MAX_BYTES", str(len(lora_file) * 2))
    padding = b"\0" * (len(lora_file) * 3)  # compresses to little: within the download limit, not unpacked
    for archive in (hostile.zip_of({"lora.safetensors": padding + lora_file}),
                    hostile.targz_of_empty_members(0, padding + lora_file)):
        with pytest.raises(UserError, match="unpacks to more than"):
            fetch(loader, data_uri(archive, ""))
    assert cache_names(env) == []


def test_zips_are_read_like_tars(env, loader, lora_file):
    assert fetch(loader, data_uri(hostile.zip_of({"dir/lora.safetensors": lora_file, "README.md": b"hi"}), "")
                 ).path.read_bytes() == lora_file
    with pytest.raises(UserError, match="pickle checkpoint"):
        fetch(loader, data_uri(hostile.torch_zip_checkpoint(), ""))
    with pytest.raises(UserError, match=r"no \.safetensors file \(it holds: a\.txt\)"):
        fetch(loader, data_uri(hostile.zip_of({"a.txt": b"x"}), ""))
    with pytest.raises(UserError, match=r"\.zip archive (is damaged|that cannot be read)"):
        fetch(loader, data_uri(hostile.zip_of({"lora.safetensors": lora_file})[:-30], ""))
    assert cache_names(env) != []


def test_unsafe_tar_is_refused(env, loader):
    uri = data_uri(loras.tar_of({"../evil.safetensors": b"x"}), "")
    with pytest.raises(UserError, match="unsafe path"):
        fetch(loader, uri)
    assert not (env.parent / "evil.safetensors").exists() and cache_names(env) == []


# ----- the cache ----------------------------------------------------------------------------------------------------

def test_cache_is_an_lru_with_a_size_cap_that_survives_restarts(env, lora_file, monkeypatch):
    with FileServer() as srv:
        urls = [srv.add(f"/l{i}.safetensors", lora_file) for i in range(3)]
        monkeypatch.setenv("FLUX_LORA_CACHE_GB", str(2.5 * len(lora_file) / 2**30))  # room for two
        first = fetch(lora_loader.LoraLoader(), urls[0])
        second = fetch(lora_loader.LoraLoader(), urls[1])
        fetch(lora_loader.LoraLoader(), urls[0])  # used again: urls[1] is now the oldest
        third = fetch(lora_loader.LoraLoader(), urls[2])  # a new process each time: the folder is the index
        assert sorted(cache_names(env)) == sorted([first.path.name, third.path.name])
        assert not second.path.exists()
        count = len(srv.requests)
        fetch(lora_loader.LoraLoader(), urls[0])
        assert len(srv.requests) == count


def test_stale_staging_folders_are_cleaned(tmp_path):
    import os
    import time

    cache = DiskCache(tmp_path, 10**9, ".safetensors")
    stale = tmp_path / ".staging-crashed"
    stale.mkdir()
    old = time.time() - 7200
    os.utime(stale, (old, old))
    fresh = tmp_path / ".staging-running"
    fresh.mkdir()
    assert cache.entries() == []
    assert not stale.exists() and fresh.exists()


# ----- layouts ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("subset,layouts", list(loras.EXPRESSIBLE.items()))
def test_every_layout_normalizes_to_the_same_update(tiny_pipe, tmp_path, subset, layouts):
    """Each layout, through diffusers' converters, gives per module the same scale * B @ A, exactly."""
    update = loras.make_update(tiny_pipe.transformer, subset)
    for layout in layouts:
        weights = lora_loader.normalize(loras.write(update, layout, tmp_path / f"{layout}.safetensors"), layout, layout)
        assert weights.layout == layout
        deltas = weights.deltas_of("transformer")
        assert sorted(deltas) == sorted(update.transformer), layout
        for name, (a, b) in update.transformer.items():
            assert deltas[name].kind == "lora" and deltas[name].rank == update.rank
            assert torch.equal(deltas[name].weight(), b @ a), (layout, name)


@pytest.mark.parametrize("layout", ["diffusers", "kohya", "bfl"])
def test_text_encoder_weights_are_kept(tiny_pipe, tmp_path, layout):
    update = loras.make_update(tiny_pipe.transformer, "ATTENTION", text_encoder=tiny_pipe.text_encoder)
    weights = lora_loader.normalize(loras.write(update, layout, tmp_path / "l.safetensors"), "k", "l")
    assert weights.components == ("transformer", "text_encoder")
    deltas = weights.deltas_of("text_encoder")
    assert sorted(deltas) == sorted(update.text_encoder)
    for name, (a, b) in update.text_encoder.items():
        assert torch.equal(deltas[name].weight(), b @ a), (layout, name)


def _file(tmp_path, tensors, name="x.safetensors"):
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / name))
    return tmp_path / name


def test_unknown_layout_is_refused_naming_its_keys(tmp_path):
    path = _file(tmp_path, {"unet.down_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 8),
                            "unet.down_blocks.0.attn.to_q.lora_B.weight": torch.zeros(8, 4)})
    with pytest.raises(UserError, match=r"not a FLUX LoRA .* its keys look like unet\.down_blocks\.0"):
        lora_loader.normalize(path, "k", "sdxl.safetensors")


def test_kohya_lora_of_another_model_is_refused(tmp_path):
    path = _file(tmp_path, {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
                            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4)})
    with pytest.raises(UserError, match="kohya LoRA but its keys do not fit FLUX.1 .*different model"):
        lora_loader.normalize(path, "k", "sdxl-kohya.safetensors")


def test_control_lora_is_refused(tmp_path):
    path = _file(tmp_path, {"double_blocks.0.img_attn.norm.query_norm.scale": torch.ones(128)})
    with pytest.raises(UserError, match="FLUX Control LoRA"):
        lora_loader.normalize(path, "k", "canny.safetensors")


def test_t5_weights_are_named_in_the_log_and_the_rest_applies(tiny_pipe, tmp_path, caplog):
    update = loras.make_update(tiny_pipe.transformer, "ATTENTION", text_encoder=tiny_pipe.text_encoder)
    tensors, _ = loras.kohya_layout(update)
    tensors |= {"lora_te2_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight": torch.zeros(4, 32),
                "lora_te2_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight": torch.zeros(32, 4)}
    with caplog.at_level(logging.WARNING, logger="flux"):
        weights = lora_loader.normalize(_file(tmp_path, tensors), "k", "with-t5")
    assert "T5 text-encoder weights (2 tensors)" in caplog.text
    assert sorted(weights.deltas_of("transformer")) == sorted(update.transformer)
    assert sorted(weights.deltas_of("text_encoder")) == sorted(update.text_encoder)


def test_files_diffusers_reads_are_not_gated(tiny_pipe, tmp_path):
    """PEFT keys with no `transformer.` prefix: no layout of the old gate, but diffusers reads them."""
    update = loras.make_update(tiny_pipe.transformer, "ATTENTION", seed=9)
    tensors, _ = loras.ai_toolkit_layout(update)
    bare = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    weights = lora_loader.normalize(_file(tmp_path, bare, "bare.safetensors"), "k", "bare")
    deltas = weights.deltas_of("transformer")
    assert sorted(deltas) == sorted(update.transformer)
    for name, (a, b) in update.transformer.items():
        assert torch.equal(deltas[name].weight(), b @ a)


def test_unreadable_file_names_itself_what_it_holds_and_what_is_accepted(tmp_path):
    path = _file(tmp_path, {"model.layers.0.mlp.weight": torch.zeros(4, 4)}, "llm.safetensors")
    with pytest.raises(lora_loader.LoraError, match=r"^llm\.safetensors is not a FLUX LoRA .*diffusers/PEFT, .*\)"
                                                    r": its keys look like model\.layers\.0\.mlp\.weight"):
        lora_loader.normalize(path, "k", "llm.safetensors")


# ----- what a caller can make the server spend: counted before it is spent ---------------------------------------

def _peak_python_bytes(work) -> int:
    """The most memory Python allocations held while work() ran (tracemalloc): what a parser read and kept."""
    import tracemalloc

    tracemalloc.start()
    try:
        work()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def test_a_tar_long_name_header_is_counted_before_tarfile_reads_it(env, loader, lora_file, monkeypatch):
    """A 256 KiB .tar.gz whose GNU long-name header is 256 MiB, before a valid LoRA: refused at the header limit,
    holding far less than the header (tarfile alone would read all of it, then load the LoRA)."""
    from tests.helpers import floods

    monkeypatch.setenv("FLUX_LORA_MAX_BYTES", str(64 * 2**20))
    uri = data_uri(floods.long_name_targz(256 * 2**20, lora_file), "")
    failed = []

    def work():
        with pytest.raises(UserError, match=r"long-name and PAX headers come to more than 16\.0 MiB.*"
                                            r"FLUX_LORA_MAX_HEADER_BYTES") as caught:
            fetch(loader, uri)
        failed.append(caught.value)

    assert _peak_python_bytes(work) < 64 * 2**20 and failed
    assert cache_names(env) == []
    monkeypatch.setenv("FLUX_LORA_MAX_HEADER_BYTES", str(2**20))  # a long name within the limit still reads
    assert fetch(loader, data_uri(floods.long_name_targz(1000, lora_file), "")).path.read_bytes() == lora_file


def test_a_zips_directory_is_counted_from_its_end_record_before_it_is_parsed(env, loader, tmp_path):
    """A zip64 listing 1,000,000 entries (a 46 MB directory) is refused from its end record, holding a fraction of
    its directory; a directory over FLUX_LORA_MAX_HEADER_BYTES is refused the same way."""
    from tests.helpers import floods

    body = floods.zip64_of_entries(1_000_000)
    with FileServer() as srv:
        url = srv.add("/many.zip", body)
        del body

        def work():
            with pytest.raises(UserError, match=r"zip archive holds more than 1,000 files"):
                fetch(loader, url)

        assert _peak_python_bytes(work) < 16 * 2**20
        loader.settings = LoraSettings(max_header_bytes=10 * 1024)
        with pytest.raises(UserError, match=r"directory is 45\.9 KiB, over the 10\.0 KiB limit.*"
                                            r"FLUX_LORA_MAX_HEADER_BYTES"):
            loader.fetch(srv.add("/big-directory.zip", floods.zip64_of_entries(1000)), loader.tokens())
    assert cache_names(env) == []


def test_tensors_are_counted_and_the_header_sized_before_any_conversion(env, loader, monkeypatch):
    """200,000 tensors are refused by their count, before diffusers' converters would take many seconds; a header
    larger than FLUX_LORA_MAX_HEADER_BYTES is refused from its first 8 bytes."""
    from tests.helpers import floods

    with pytest.raises(UserError, match=r"header lists 200,000 tensors, over the 20,000 limit \(FLUX_LORA_MAX_TENSORS\)"):
        fetch(loader, data_uri(floods.tensor_flood(200_000), ""))
    monkeypatch.setenv("FLUX_LORA_MAX_HEADER_BYTES", str(2**20))
    huge_header = (2**30).to_bytes(8, "little") + b'{"t0": {"dtype": "F32"'
    with pytest.raises(UserError, match=r"safetensors header is 1\.0 GiB, over the 1\.0 MiB limit.*"
                                        r"FLUX_LORA_MAX_HEADER_BYTES"):
        fetch(loader, data_uri(huge_header, ""))
    assert cache_names(env) == []


def test_a_lora_whose_factors_read_in_float32_exceed_the_limit_is_refused_from_its_header(env, loader, monkeypatch):
    """Factors are read in float32 whatever their dtype (fp8 ones take four times their bytes then): that size is
    counted from the header's shapes before any tensor is read, against FLUX_LORA_MAX_FLOAT32_BYTES (default twice
    FLUX_LORA_MAX_BYTES); under the limit the same file loads."""
    import torch
    from safetensors.torch import save

    factors = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 32),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 4)}
    fp8 = save({k: v.to(torch.float8_e4m3fn) for k, v in factors.items()})
    monkeypatch.setenv("FLUX_LORA_MAX_FLOAT32_BYTES", "1000")
    with pytest.raises(UserError, match=r"take 1\.0 KiB once read in float32 .* over the 1000 bytes limit "
                                        r"\(FLUX_LORA_MAX_FLOAT32_BYTES\)"):
        fetch(loader, data_uri(fp8, ""))
    assert cache_names(env) == []
    monkeypatch.setenv("FLUX_LORA_MAX_FLOAT32_BYTES", "1024")
    assert fetch(loader, data_uri(fp8, "")).path.is_file()
    monkeypatch.delenv("FLUX_LORA_MAX_FLOAT32_BYTES")
    monkeypatch.setenv("FLUX_LORA_MAX_BYTES", "1000")
    assert LoraSettings.from_env().max_float32_bytes == 2000


@pytest.mark.parametrize("path", ["/body", "/headers"])
def test_a_host_that_drips_fails_within_the_deadline(env, loader, monkeypatch, path):
    """A byte of the body, or a header line, every 0.2 s: the fetch fails by FLUX_LORA_TIMEOUT_S (plus 2 s), however
    long the host would go on (here 20 s)."""
    import time

    from tests.helpers.floods import DripServer

    monkeypatch.setenv("FLUX_LORA_TIMEOUT_S", "2")
    with DripServer(every=0.2, lasts=20) as srv:
        started = time.monotonic()
        with pytest.raises(UserError, match="(timed out|took too long|did not finish in time)"):
            fetch(loader, srv.url(path + "/lora.safetensors"))
        assert time.monotonic() - started < 2 + 2
    assert cache_names(env) == []


def test_a_gated_file_in_the_cache_is_served_only_to_callers_the_hub_lets_read_it(env, loader, lora_file, hub):
    """The hub answers anyone about a gated repo (its metadata): once a caller with a token fetched its LoRA, a
    caller without one (or with another token) is refused, by branch or by commit, and the caller with the token
    is still served from the cache."""
    repo = hub.add_repo("me/gated", {"g.safetensors": lora_file}, gated_token=TOKEN)
    first = fetch(loader, "huggingface.co/me/gated", hf_api_token=TOKEN)
    pinned = f"https://huggingface.co/me/gated/resolve/{repo.sha}/g.safetensors"
    for reference in ("huggingface.co/me/gated", pinned):
        for tokens in ({}, {"hf_api_token": "hf_someone_else"}):
            with pytest.raises(UserError, match=r"answered 401 \(not authorized\)\. If me/gated is private or gated, "
                                                r"pass hf_api_token"):
                fetch(loader, reference, **tokens)
        again = fetch(loader, reference, hf_api_token=TOKEN)
        assert again.cached and again.key == first.key and again.path.read_bytes() == lora_file


@pytest.mark.parametrize("token", ["hf_\u00e9t\u00e9_token", "hf_abc\r\nX-Injected: 1", "hf abc", "hf_\x00abc"])
def test_a_token_no_header_can_carry_is_refused_naming_the_input_only(env, loader, lora_file, hub, token):
    """Non-ASCII, line breaks, spaces, control characters: refused before any request, by branch or by commit,
    naming the input and never the token or its length; surrounding whitespace (a pasted newline) is dropped."""
    from flux.errors import SettingsError

    repo = hub.add_repo("me/gated", {"g.safetensors": lora_file}, gated_token=TOKEN)
    for reference in ("huggingface.co/me/gated", f"huggingface.co/me/gated/resolve/{repo.sha}/g.safetensors"):
        with pytest.raises(UserError, match=r"^hf_api_token is not a token this container can send") as failed:
            fetch(loader, reference, hf_api_token=token)
        assert token not in str(failed.value) and str(len(token)) not in str(failed.value)
        with pytest.raises(UserError, match=r"^civitai_api_token is not a token"):
            fetch(loader, reference, civitai_api_token=token)
    assert hub.requests == []
    with pytest.raises(SettingsError, match=r"^HF_TOKEN is not a token this container can send"):
        LoraSettings.from_env({"HF_TOKEN": token})
    assert fetch(loader, "huggingface.co/me/gated", hf_api_token=f" {TOKEN}\r\n").path.read_bytes() == lora_file


def test_a_short_body_says_what_arrived_and_is_not_retried_without_progress(env, loader, lora_file):
    """A host that ends the body early, and sends nothing more when asked for the rest: the message counts the
    bytes that did arrive, and the download gives up at the first resume that brings none (not after every retry)."""
    import time

    half = len(lora_file) // 2
    with FileServer() as srv:
        started = time.monotonic()
        with pytest.raises(UserError, match=rf"kept dropping the connection \({half} of {len(lora_file)} bytes"):
            fetch(loader, srv.add("/short.safetensors", lora_file, truncate=half))
        assert time.monotonic() - started < 5  # the retries' pauses alone were 7.5 s
        assert len([r for r in srv.requests if r.headers.get("Range") != "bytes=0-0"]) == 2


def test_ipv6_hosts_keep_their_brackets_in_messages():
    from flux.download import redact

    assert redact("http://[::1]:8080/a.safetensors?sig=s") == "http://[::1]:8080/a.safetensors"
    assert redact("https://[2001:db8::1]/a") == "https://[2001:db8::1]/a"


def test_a_civitai_file_in_the_cache_is_served_only_to_callers_civitai_lets_download_it(env, loader, lora_file,
                                                                                        monkeypatch):
    with FileServer() as srv:
        monkeypatch.setenv("FLUX_CIVITAI_URL", srv.base)
        srv.add("/api/download/models/77", lora_file, auth=TOKEN)
        assert not fetch(loader, "civitai.com/api/download/models/77", civitai_api_token=TOKEN).cached
        with pytest.raises(UserError, match=r"answered 401 \(not authorized\)\. .*pass civitai_api_token"):
            fetch(loader, "civitai.com/api/download/models/77")
        assert fetch(loader, "civitai.com/api/download/models/77", civitai_api_token=TOKEN).cached


def test_a_compressed_body_is_decoded_in_bounded_pieces(env, loader, monkeypatch):
    """64 MiB of zeros sent gzip-encoded (about 64 KB on the wire): refused at FLUX_LORA_MAX_BYTES (32 MiB here) with
    little held at any time; httpx alone decodes each 64 KiB read whole, tens of MB at once."""
    monkeypatch.setenv("FLUX_LORA_MAX_BYTES", str(32 * 2**20))
    with FileServer() as srv:
        url = srv.add("/zeros.safetensors", bytes(64 * 2**20), encoding="gzip")

        def work():
            with pytest.raises(UserError, match=r"gzip-compressed and decodes to more than the 32\.0 MiB limit"):
                fetch(loader, url)

        assert _peak_python_bytes(work) < 16 * 2**20
    assert cache_names(env) == []
