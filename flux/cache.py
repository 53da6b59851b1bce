"""An on-disk LRU cache of files, bounded in total size, that rebuilds its index from the folder itself.

Entries are files named by a hash of their key (keys must never hold a secret:
callers pass redacted references), so the folder alone is the index: after a
restart every file found there is known, least recently used first (by mtime,
which every hit refreshes). New entries are built in a staging folder inside
the cache (same filesystem) and renamed into place, so a crash never leaves a
file that looks complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

STAGING_PREFIX = ".staging-"
STALE_STAGING_S = 3600  # staging folders older than this were left by a crash


class DiskCache:
    def __init__(self, root: Path, max_bytes: int, suffix: str = ""):
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.suffix = suffix

    def path_for(self, key: str) -> Path:
        return self.root / (hashlib.sha256(key.encode()).hexdigest()[:32] + self.suffix)

    def get(self, key: str) -> Path | None:
        """The entry's file, marked as just used; None on a miss."""
        path = self.path_for(key)
        try:
            os.utime(path)
        except FileNotFoundError:
            return None
        return path

    @contextlib.contextmanager
    def staging(self):
        """A scratch folder inside the cache, removed afterwards, for building an entry."""
        self.root.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.root))
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def put(self, key: str, src: Path) -> Path:
        """Move src (built in a staging folder) into the cache as key's entry, then trim the cache to its cap."""
        path = self.path_for(key)
        os.replace(src, path)
        os.utime(path)
        self._trim(keep=path)
        return path

    def discard(self, key: str) -> None:
        """Remove key's entry, if there is one."""
        self.path_for(key).unlink(missing_ok=True)

    def entries(self) -> list[tuple[Path, int, float]]:
        """(file, bytes, last use) of every entry, least recently used first."""
        found = []
        if not self.root.is_dir():
            return found
        for entry in os.scandir(self.root):
            if entry.name.startswith("."):
                self._drop_stale_staging(entry)
                continue
            if not entry.is_file() or not entry.name.endswith(self.suffix):
                continue
            stat = entry.stat()
            found.append((Path(entry.path), stat.st_size, stat.st_mtime))
        return sorted(found, key=lambda e: e[2])

    def _trim(self, keep: Path) -> None:
        entries = self.entries()
        total = sum(size for _, size, _ in entries)
        for path, size, _ in entries:
            if total <= self.max_bytes:
                break
            if path == keep:
                continue
            path.unlink(missing_ok=True)
            total -= size
            log.info("cache: evicted %s (%.1f MiB) to stay under %.1f GiB", path.name, size / 2**20, self.max_bytes / 2**30)
        if total > self.max_bytes:
            log.warning("cache: %s alone is over the %.1f GiB cap; kept for this use", keep.name, self.max_bytes / 2**30)

    @staticmethod
    def _drop_stale_staging(entry: os.DirEntry) -> None:
        if entry.name.startswith(STAGING_PREFIX) and time.time() - entry.stat().st_mtime > STALE_STAGING_S:
            shutil.rmtree(entry.path, ignore_errors=True)
