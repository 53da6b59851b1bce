"""Finding and fetching weights: local folders, .tar URLs and Hugging Face repos, each from local servers."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from flux import progress, variants, weights
from flux.fakes import tiny
from flux.errors import UserError
from tests.helpers.http import FileServer, HubServer
from tests.helpers.weights_tar import digests, tar_of




def test_defaults(monkeypatch):
    for name in ("FLUX_WEIGHTS", "COG_WEIGHTS", "FLUX_SAFETY_CHECKER", "FLUX_SAFETY_SECOND",
                 *(v.setting for v in variants.VARIANTS.values())):
        monkeypatch.delenv(name, raising=False)
    every = {v.name: "tiny" for v in variants.VARIANTS.values()}
    assert weights.sources(has_cuda=False) == weights.Sources(every, "tiny", "tiny")
    assert weights.sources(has_cuda=True) == weights.Sources(  # the public defaults: tests/test_public_weights.py
        {v.name: weights.public_url(v) for v in variants.VARIANTS.values()}, weights.SAFETY_REPO,
        weights.SAFETY_SECOND_REPO)
    monkeypatch.setenv("COG_WEIGHTS", "/models/flux")
    assert weights.sources(has_cuda=True).base == "/models/flux"
    monkeypatch.setenv("FLUX_WEIGHTS", "me/my-flux")
    assert weights.sources(has_cuda=False).base == "me/my-flux"
    for v in variants.ON_FIRST_USE:  # not tiny
        assert weights.sources(has_cuda=False).variants[v.name] == weights.public_url(v)
    monkeypatch.setenv("FLUX_KREA_DEV_WEIGHTS", "/models/krea")
    assert weights.sources(has_cuda=True).variants["krea-dev"] == "/models/krea"


def test_tiny_build_is_deterministic_across_processes(tmp_path):
    """Byte-identical files, tokenizers included, whichever process builds it (tests compare images across servers)."""
    import subprocess
    import sys

    a = tiny.ensure_pipeline(tmp_path / "a")
    subprocess.run([sys.executable, "-c", f"import flux; from flux.fakes import tiny; from pathlib import Path; "
                    f"tiny.ensure_pipeline(Path({str(tmp_path / 'b')!r}))"], check=True, capture_output=True)
    b = tmp_path / "b"
    assert digests(a) == digests(b)
    assert {"tokenizer/tokenizer.json", "tokenizer_2/tokenizer.json", "transformer/config.json"} <= set(digests(a))


def test_local_folder(tiny_dev, weights_root):
    assert weights.locate(str(tiny_dev), "dev") == tiny_dev


def test_missing_local_folder(weights_root):
    with pytest.raises(UserError, match="does not exist"):
        weights.locate("/no/such/flux", "dev")


def test_folder_without_the_pipeline(tmp_path, weights_root):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="missing model_index.json"):
        weights.locate(str(tmp_path / "empty"), "dev")


def test_unrecognised_source(weights_root):
    with pytest.raises(UserError, match="not a folder, a Hugging Face repo id"):
        weights.locate("ftp:/what", "dev")


def test_tar_url_downloaded_in_parallel_and_extracted_once(tiny_dev, weights_root, monkeypatch, caplog):
    import dataclasses

    # 64 KiB parts, and the tiny FLUX is small: show its progress too
    monkeypatch.setattr(weights, "TAR_LIMITS", dataclasses.replace(weights.TAR_LIMITS, part_size=64 * 1024,
                                                                   progress_bytes=64 * 1024))
    caplog.set_level("INFO", logger="flux")
    body = tar_of(tiny_dev)
    with FileServer() as srv:
        url = srv.add("/weights/flux-dev.tar", body) + "?signature=SECRET"
        path = weights.locate(url, "dev")
        meter = [r.getMessage() for r in caplog.records if r.name == "flux.progress"]
        assert meter and meter[-1].startswith("dev weights: ") and "(100%)" in meter[-1] and "/s" in meter[-1]
        assert len(meter) <= 21 and "SECRET" not in caplog.text  # every 5% at most, parts in parallel
        assert (path / "model_index.json").is_file() and (path / "transformer").is_dir()
        assert len(srv.ranged_gets()) > 1, "expected parallel ranged requests"
        count = len(srv.requests)
        assert weights.locate(url, "dev") == path  # already on disk: no request at all
        assert len(srv.requests) == count
    assert "SECRET" not in str(path)


def _small_parts(original_init):
    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        object.__setattr__(self, "part_size", 64 * 1024)
        object.__setattr__(self, "progress_bytes", 64 * 1024)  # the tiny FLUX is small: show its progress too
    return init


def test_tar_url_server_without_ranges(tiny_dev, weights_root):
    with FileServer() as srv:
        url = srv.add("/w.tar", tar_of(tiny_dev), no_ranges=True)
        path = weights.locate(url, "dev")
        assert (path / "vae" / "config.json").is_file()


# from the staging folder (weights/url/.<folder>-*/unpacked), "../../../../" is tmp_path, where an escape would land
@pytest.mark.parametrize("member", ["../../../../evil.txt", "/etc/evil.txt"])
def test_tar_with_unsafe_paths_is_refused(weights_root, member, tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(member)
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    with FileServer() as srv:
        url = srv.add("/evil.tar", buf.getvalue())
        with pytest.raises(UserError, match="unsafe path"):
            weights.locate(url, "dev")
    assert not (tmp_path / "evil.txt").exists()
    assert not list((weights_root / "url").glob("*/model_index.json"))


def test_tar_with_a_link_is_refused(weights_root):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("model_index.json")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)
    with FileServer() as srv:
        with pytest.raises(UserError, match="link or special file"):
            weights.locate(srv.add("/link.tar", buf.getvalue()), "dev")


def test_tar_url_404(weights_root):
    with FileServer() as srv:
        with pytest.raises(UserError, match="not found"):
            weights.locate(srv.url("/missing.tar"), "dev")


def test_truncated_tar_download_leaves_nothing(tiny_dev, weights_root):
    body = tar_of(tiny_dev)
    with FileServer() as srv:
        url = srv.add("/cut.tar", body, no_ranges=True, truncate=len(body) // 2)
        with pytest.raises(UserError, match="dropping the connection"):
            weights.locate(url, "dev")
    leftovers = [p for p in weights_root.rglob("*") if p.is_file()]
    assert leftovers == []


def hub_files(folder: Path) -> dict[str, bytes]:
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    files = {k: v for k, v in files.items() if not k.startswith(".")}
    files["flux1-dev.safetensors"] = b"single-file checkpoint we must not download"
    return files


def test_hugging_face_repo(tiny_dev, weights_root, monkeypatch, caplog):
    caplog.set_level("INFO", logger="flux")
    with HubServer() as hub:
        hub.add_repo("black-forest-labs/FLUX.1-dev", hub_files(tiny_dev), gated_token="hf_secret")
        monkeypatch.setenv("HF_ENDPOINT", hub.base)
        monkeypatch.setenv("HF_TOKEN", "hf_secret")
        path = weights.locate("black-forest-labs/FLUX.1-dev", "dev")
        meter = [r.getMessage() for r in caplog.records if r.name == "flux.progress"]
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and ".cache" not in f.parts and f.name != ".complete")
        assert meter and meter[-1].startswith("dev weights: ") and "(100%)" in meter[-1]
        assert progress.human_bytes(size) in meter[-1] and "hf_secret" not in caplog.text
        assert (path / "transformer" / "config.json").is_file()
        assert not (path / "flux1-dev.safetensors").exists()  # only what diffusers loads
        count = len(hub.requests)
        assert weights.locate("black-forest-labs/FLUX.1-dev", "dev") == path
        assert len(hub.requests) == count  # complete on disk: no network call


def test_gated_repo_without_token_says_what_to_do(tiny_dev, weights_root, monkeypatch):
    with HubServer() as hub:
        hub.add_repo("black-forest-labs/FLUX.1-dev", hub_files(tiny_dev), gated_token="hf_secret")
        monkeypatch.setenv("HF_ENDPOINT", hub.base)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        with pytest.raises(UserError, match="gated: accept its license.*HF_TOKEN is not set"):
            weights.locate("black-forest-labs/FLUX.1-dev", "dev")


def test_unknown_repo(weights_root, monkeypatch):
    with HubServer() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.base)
        with pytest.raises(UserError, match="was not found on Hugging Face"):
            weights.locate("nobody/nothing", "dev")


def test_hub_unreachable_is_a_clear_error(weights_root, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(UserError, match="Could not reach Hugging Face"):
        weights.locate("black-forest-labs/FLUX.1-dev", "dev")
