""".tar weights fetched member by member (flux/tarstream.py), from FileServer on 127.0.0.1: the files, parallel
ranged parts, every member checked before any data is fetched, an interrupted server, and the disk it takes at its
peak."""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import pytest

from flux import download as dl
from flux import tarstream, weights
from flux.errors import UserError
from tests.helpers.http import FileServer, OnDisk
from tests.helpers.weights_tar import digests, loaded_bytes, replicate_tar, tar_of

KiB = 1024
SMALL = dl.Limits(max_bytes=weights.MAX_TAR_BYTES, part_size=64 * KiB, workers=4, retries=1)


@pytest.fixture(autouse=True)
def small_parts(monkeypatch):
    monkeypatch.setattr(weights, "TAR_LIMITS", SMALL)


def ranges(srv: FileServer) -> list[tuple[int, int]]:
    return [tuple(map(int, r.removeprefix("bytes=").split("-"))) for r in srv.ranged_gets()]


def test_the_files_are_the_archive_s_fetched_in_parallel_ranged_parts(tiny_dev, tmp_path):
    body = tar_of(tiny_dev)
    assert len(body) > 8 * SMALL.part_size  # many parts, more than the workers
    with FileServer() as srv:
        files = tarstream.extract_url(srv.add("/w.tar", body), tmp_path / "out", max_bytes=len(body), limits=SMALL)
        parts = ranges(srv)
    assert digests(tmp_path / "out" / "FLUX.1-dev") == digests(tiny_dev)
    assert sorted(p.relative_to(tmp_path / "out" / "FLUX.1-dev").as_posix() for p in files if p.name[0] != ".") \
        == sorted(digests(tiny_dev))  # wanted=None: every member, markers too
    data = [(first, last) for first, last in parts if last - first + 1 > 2 * tarfile.BLOCKSIZE]
    assert len(data) > 8 and len(set(data)) == len(data)  # each part once
    assert max(last - first + 1 for first, last in parts) <= SMALL.part_size
    assert list((tmp_path / "out").iterdir()) == [tmp_path / "out" / "FLUX.1-dev"]  # no archive kept beside


def test_locate_streams_and_marks_complete_once(tiny_dev, weights_root):
    with FileServer() as srv:
        url = srv.add("/weights/flux-dev.tar", tar_of(tiny_dev)) + "?signature=SECRET"
        path = weights.locate(url, "dev")
        assert (path / ".complete").is_file() and digests(path) == digests(tiny_dev)
        count = len(srv.requests)
        assert weights.locate(url, "dev") == path and len(srv.requests) == count  # complete: no request
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no staging left


def unsafe(kind: str) -> tarfile.TarInfo:
    # from the staging folder (weights/url/.<folder>-*/unpacked), "FLUX.1-dev/" and five ".." reach tmp_path
    names = {"dotdot": "FLUX.1-dev/../../../../../evil.txt", "absolute": "/tmp/evil.txt"}
    info = tarfile.TarInfo(names.get(kind, "FLUX.1-dev/x"))
    if kind in ("dotdot", "absolute"):
        info.size = 4
    elif kind == "symlink":
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    elif kind == "hardlink":
        info.type, info.linkname = tarfile.LNKTYPE, "FLUX.1-dev/model_index.json"
    elif kind == "device":
        info.type = tarfile.CHRTYPE
    return info


@pytest.mark.parametrize("kind,message", [("dotdot", "unsafe path"), ("absolute", "unsafe path"),
                                          ("symlink", "link or special"), ("hardlink", "link or special"),
                                          ("device", "link or special")])
def test_an_unsafe_member_after_good_ones_is_refused_before_any_data_is_fetched(tiny_dev, weights_root, tmp_path,
                                                                             kind, message):
    body = tar_of(tiny_dev, extra=[unsafe(kind)])
    with FileServer() as srv:
        url = srv.add("/evil.tar", body)
        with pytest.raises(UserError, match=message):
            weights.locate(url, "dev")
        # refused from the headers: no member's data fetched
        assert all(last - first + 1 <= 2 * tarfile.BLOCKSIZE for first, last in ranges(srv))
    assert not (tmp_path / "evil.txt").exists() and not Path("/tmp/evil.txt").exists()
    assert [p for p in weights_root.rglob("*") if p.is_file()] == []


def test_the_size_cap_counts_every_member(tiny_dev, tmp_path):
    body = tar_of(tiny_dev)
    unpacked = sum(p.stat().st_size for p in tiny_dev.rglob("*") if p.is_file())
    with FileServer() as srv:
        with pytest.raises(UserError, match="unpacks to more than"):
            tarstream.extract_url(srv.add("/w.tar", body), tmp_path / "out", max_bytes=unpacked - 1, limits=SMALL)


def test_an_interrupted_server_leaves_nothing_that_looks_complete(tiny_dev, weights_root):
    body = tar_of(tiny_dev)
    with FileServer() as srv:
        url = srv.add("/cut.tar", body, truncate=len(body) * 2 // 3, reset=True)
        with pytest.raises(UserError, match="dropping the connection"):
            weights.locate(url, "dev")
    assert [p for p in weights_root.rglob("*") if p.is_file()] == []
    assert not list(weights_root.rglob(".complete"))


def test_staging_left_by_a_killed_boot_is_removed_and_the_fetch_starts_over(tiny_dev, weights_root):
    with FileServer() as srv:
        url = srv.add("/w.tar", tar_of(tiny_dev))
        dest = weights_root / "url" / weights._url_folder(url)
        stale = dest.parent / f".{dest.name}-killed" / "unpacked" / "FLUX.1-dev"
        stale.mkdir(parents=True)
        (stale / "model_index.json").write_text("{}")  # half of an earlier extraction
        assert weights.locate(url, "dev") == dest
    assert sorted(p.name for p in dest.parent.iterdir()) == [dest.name]
    assert digests(dest) == digests(tiny_dev)


@pytest.fixture
def disk_peak(monkeypatch, tmp_path):
    """The bytes on disk under tmp_path, measured after each file tarfile writes (disk only grows there, and a
    downloaded archive is on disk by then): their maximum."""
    peak = [0]
    original = tarfile.TarFile.makefile

    def makefile(self, tarinfo, targetpath):
        original(self, tarinfo, targetpath)
        peak[0] = max(peak[0], sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file()))

    monkeypatch.setattr(tarfile.TarFile, "makefile", makefile)
    return peak


def test_peak_disk_is_what_is_unpacked_not_twice_it(tiny_dev, weights_root, disk_peak):
    body = tar_of(tiny_dev)
    with FileServer() as srv:
        ranged = weights.locate(srv.add("/w.tar", body), "dev")  # ranged: the members written in place, no archive
        streamed = sum(p.stat().st_size for p in weights_root.rglob("*") if p.is_file())
        shutil.rmtree(ranged)
        disk_peak[0] = 0
        weights.locate(srv.add("/plain.tar", body, no_ranges=True), "dev")  # no ranges: downloaded, then extracted
        whole = disk_peak[0]
        plain = [r.headers.get("Range") for r in srv.requests if r.path == "/plain.tar"]
    assert plain == ["bytes=0-0", "bytes=0-0", None]  # a probe for ranges, one for the whole file, the file
    assert streamed <= 1.1 * len(body)
    assert whole >= 1.9 * len(body)  # the measure sees the archive when it is there


@pytest.mark.parametrize("top", [True, False], ids=["top-folder", "no-top-folder"])
def test_only_the_layout_s_members_are_fetched_from_a_tar_with_an_unread_gib(tiny_dev, weights_root, tmp_path,
                                                                            caplog, top):
    caplog.set_level("INFO", logger="flux")
    archive = replicate_tar(tmp_path / "files.tar", tiny_dev, top=top)
    assert archive.stat().st_size > 2**30 and archive.stat().st_blocks * 512 < 64 * 2**20  # sparse on disk
    with FileServer() as srv:
        path = weights.locate(srv.add("/FLUX.1-dev/files.tar", OnDisk(archive)), "dev")
        fetched = sum(last - first + 1 for first, last in ranges(srv))
        whole = [r for r in srv.requests if "Range" not in r.headers]
    assert digests(path) == digests(tiny_dev) and (path / ".complete").is_file()
    assert not whole and not (path / "flux1-single-file.safetensors").exists()
    loaded = loaded_bytes(path)
    assert fetched <= 1.05 * loaded, f"{fetched} bytes fetched for {loaded} loaded"
    assert "not flux1-single-file.safetensors" in caplog.text
