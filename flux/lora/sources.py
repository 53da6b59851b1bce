"""LoRA references located and fetched into the on-disk cache.

    reference (str) --parse--> Ref --locate--> Source (cache key + how to fetch) --fetch--> .safetensors in the cache
                                                                                  --load--> LoraWeights (delta.py)

References (README, "LoRAs"): one class per host in flux/lora/hosts.py; the tokens sent in flux/lora/tokens.py.

Every download is unpacked (flux/lora/archives.py), read and checked (flux/lora/formats.py) in a staging folder, and
only then lands in an LRU cache under weights/loras/ (flux.cache.DiskCache) named by a hash of its key: the whole
reference (a URL's query included: two URLs that differ only there are two files) or, for the hosts above, what
identifies the file there. References that can change (an unversioned Replicate model, a Hugging Face branch, a
CivitAI model page) are resolved again at most every FLUX_LORA_RECHECK_S seconds, so a new version is picked up; the
others are cached for good. Only safetensors are ever read: pickle files are refused, never passed to torch.load.

Settings: `LoraSettings` (flux/settings.py), read once when the loader is made.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..cache import DiskCache
from ..settings import LoraSettings
from . import SAFETENSORS
from .archives import as_safetensors
from .formats import LoraWeights, normalize
from .hosts import Ref, Source, parse
from .tokens import Tokens

log = logging.getLogger(__name__)


# ----- into the cache ----------------------------------------------------------------------------------------------

# How long a host's "yes, these tokens may read this file" is trusted before a cached copy is served again.
ACCESS_RECHECK_S = 60.0

@dataclass(frozen=True)
class Fetched:
    key: str
    shown: str  # safe to log and to return: never a token or a query string
    path: Path
    cached: bool  # it was in the disk cache already
    weights: LoraWeights | None = field(default=None, repr=False, compare=False)  # read while it was checked


class LoraLoader:
    """Fetches references into the on-disk cache (remembering where unversioned ones led) and loads them. Only a
    file that reads as a LoRA enters the cache: a download is unpacked, read and checked in a staging folder first.
    settings: read from the environment when none are given (once, here)."""

    def __init__(self, settings: LoraSettings | None = None):
        self.settings = settings or LoraSettings.from_env()
        # (reference, tokens' fingerprint) -> (source, when located): a caller with other tokens locates again,
        # so a private or gated reference is never served from memory to a caller who could not read it.
        self._located: dict[tuple[str, str], tuple[Source, float]] = {}
        # (cache key, tokens' fingerprint) -> when the host last let these tokens read the file
        self._access: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    @property
    def cache(self) -> DiskCache:
        return DiskCache(self.settings.cache_dir, self.settings.cache_bytes, suffix=SAFETENSORS)

    def tokens(self, hf_api_token: str | None = None, civitai_api_token: str | None = None) -> Tokens:
        """A request's tokens, else the container's (its settings)."""
        return Tokens.of(hf_api_token, civitai_api_token, self.settings)

    def fetch(self, reference: str, tokens: Tokens) -> Fetched:
        ref = parse(reference)
        started = time.monotonic()
        source = self._locate(reference.strip(), ref, tokens)
        files = self.cache
        path = files.get(source.key)
        if path is not None:
            self._check_access(source, tokens)
            log.info("lora: %s from the cache in %.2fs", ref.shown, time.monotonic() - started)
            return Fetched(source.key, ref.shown, path, cached=True)
        with files.staging() as folder:
            raw = source.fetch(folder, tokens, self.settings)
            path = as_safetensors(raw, folder, ref.shown, self.settings)
            weights = self._read(path, source.key, ref.shown)
            path = files.put(source.key, path)
        self._granted(source, tokens)
        log.info("lora: %s fetched into the cache in %.2fs", ref.shown, time.monotonic() - started)
        return Fetched(source.key, ref.shown, path, cached=False, weights=weights)

    def _check_access(self, source: Source, tokens: Tokens) -> None:
        """A cached file a caller's token can be needed for (a gated or private Hugging Face file, a CivitAI
        download) is served only to a caller the host lets read it: asked again for each set of tokens, the answer
        trusted for ACCESS_RECHECK_S at most (FLUX_LORA_RECHECK_S when shorter), never for other tokens. Replicate's
        token is the container's own (REPLICATE_API_TOKEN), the same for every caller: what it may read was settled
        when the file was fetched."""
        if source.token not in Tokens.PER_CALLER:
            return
        with self._lock:
            when = self._access.get((source.key, tokens.fingerprint()))
        if when is not None and time.monotonic() - when < self._access_horizon:
            return
        source.check_access(tokens, self.settings)
        self._granted(source, tokens)

    @property
    def _access_horizon(self) -> float:
        return min(ACCESS_RECHECK_S, self.settings.recheck_s)

    def _granted(self, source: Source, tokens: Tokens) -> None:
        if source.token not in Tokens.PER_CALLER:
            return
        now = time.monotonic()
        with self._lock:
            for old in [k for k, when in self._access.items() if now - when >= self._access_horizon]:
                del self._access[old]
            self._access[(source.key, tokens.fingerprint())] = now

    def forget(self, fetched: Fetched) -> None:
        """Drop a fetched file from the cache (a LoRA the model refused: no file stays for a failed request)."""
        self.cache.discard(fetched.key)

    def _locate(self, reference: str, ref: Ref, tokens: Tokens) -> Source:
        if ref.pinned:
            return ref.locate(tokens, self.settings)
        memo = (reference, tokens.fingerprint())
        with self._lock:
            known = self._located.get(memo)
        recheck = self.settings.recheck_s
        if known is not None and time.monotonic() - known[1] < recheck:
            return known[0]
        source = ref.locate(tokens, self.settings)  # a failure is never remembered
        now = time.monotonic()
        with self._lock:
            for old in [k for k, (_, when) in self._located.items() if now - when >= recheck]:
                del self._located[old]
            self._located[memo] = (source, now)
        return source

    @classmethod
    def load(cls, fetched: Fetched) -> LoraWeights:
        return fetched.weights or cls._read(fetched.path, fetched.key, fetched.shown)

    @staticmethod
    def _read(path: Path, key: str, shown: str) -> LoraWeights:
        started = time.monotonic()
        weights = normalize(path, key, shown)
        log.info(
            "lora: %s read (%s layout, %s, rank %d) in %.2fs", shown, weights.layout,
            ", ".join(f"{len(weights.deltas_of(c))} {c.replace('_', ' ')} modules" for c in weights.components),
            weights.rank, time.monotonic() - started,
        )
        return weights


