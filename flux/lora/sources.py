"""LoRA references located and fetched into the on-disk cache.

    reference (str) --parse--> Ref --locate--> Source (cache key + how to fetch) --fetch--> .safetensors in the cache
                                                                                  --load--> formats.LoraWeights

References (README, "LoRAs"):
  Replicate    owner/model, owner/model/version, owner/model/versions/<id>, owner/model:<id>, replicate.com/... URLs:
               the trained weights of a Replicate FLUX fine-tune (<replicate_url>/owner/model[/versions/id]/_weights,
               a .tar holding one .safetensors). REPLICATE_API_TOKEN (environment) is sent to Replicate if set.
  Hugging Face huggingface.co/owner/repo (the repo's one .safetensors), huggingface.co/owner/repo/<file>.safetensors,
               https://huggingface.co/owner/repo/resolve/<revision>/<file> (and /blob/ URLs). Token: hf_api_token or
               HF_TOKEN. Built on HF_ENDPOINT.
  CivitAI      civitai.com/models/<id>[/<name>][?modelVersionId=<v>], civitai.com/api/download/models/<v>.
               Token: civitai_api_token or CIVITAI_API_TOKEN, sent as a header (never in a URL).
  URLs         any http(s) URL of a .safetensors file (signed URLs with a query string too) or of a .tar or .zip
               holding one.
  data: URIs   base64 of a .safetensors file or of a .tar or .zip holding one.

Every download is unpacked (flux/lora/archives.py), read and checked (flux/lora/formats.py) in a staging folder, and
only then lands in an LRU cache under weights/loras/ (flux.cache.DiskCache) named by a hash of its key: the whole
reference (a URL's query included: two URLs that differ only there are two files) or, for the hosts above, what
identifies the file there. References that can change (an unversioned Replicate model, a Hugging Face branch, a
CivitAI model page) are resolved again at most every FLUX_LORA_RECHECK_S seconds, so a new version is picked up; the
others are cached for good. Only safetensors are ever read: pickle files are refused, never passed to torch.load.

Settings: `LoraSettings` (flux/settings.py), read once when the loader is made.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qs, unquote_to_bytes, urlsplit

from .. import download as dl
from .. import netguard
from ..cache import DiskCache
from ..errors import UserError
from ..settings import LoraSettings, sendable_token
from . import PICKLE_SUFFIXES, SAFETENSORS, WHAT, LoraError, listing, pickle_message
from .archives import as_safetensors
from .formats import LoraWeights, normalize

log = logging.getLogger(__name__)


def limits(settings: LoraSettings) -> dl.Limits:
    # A server that goes silent is given up on within the total budget, not after minutes of per-read timeouts.
    return dl.Limits(max_bytes=settings.max_bytes, total_timeout=settings.timeout_s,
                     read_timeout=min(dl.Limits.read_timeout, settings.timeout_s))

@dataclass(frozen=True)
class Tokens:
    """Credentials for the hosts LoRAs come from. Never logged, never in a message, a URL or a file name."""

    hf: str | None = field(default=None, repr=False)
    civitai: str | None = field(default=None, repr=False)
    replicate: str | None = field(default=None, repr=False)

    PER_CALLER = ("hf", "civitai")  # the fields a request may bring its own value for

    def fingerprint(self) -> str:
        """Tells token sets apart without holding them: a keyed hash whose key lives in this process only."""
        return hmac.new(_PROCESS_KEY, repr((self.hf, self.civitai, self.replicate)).encode(), "sha256").hexdigest()

    @classmethod
    def of(cls, hf_api_token: str | None = None, civitai_api_token: str | None = None,
           settings: LoraSettings = LoraSettings()) -> "Tokens":
        """The request's tokens (surrounding spaces and line breaks dropped), else the ones the container was given
        (its settings). A token that cannot be sent in an HTTP header is refused naming the input, never its value
        or its length."""
        return cls(
            hf=sendable_token(hf_api_token, "hf_api_token", LoraError) or settings.hf_token or None,
            civitai=sendable_token(civitai_api_token, "civitai_api_token", LoraError) or settings.civitai_token or None,
            replicate=settings.replicate_token or None,
        )



_PROCESS_KEY = os.urandom(32)


def _bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}



# ----- references --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    """A located LoRA: the cache key of its content and where to fetch it. It holds no token: the request's
    tokens are passed to fetch(), so a located reference can be remembered and shared between requests."""

    key: str  # no secret in it: it names the cache file (hashed) and the loaded adapter
    url: str | None = field(default=None, repr=False)  # may hold a signature: never logged
    token: str | None = None  # the Tokens field that authorizes the download ("hf", "civitai", "replicate")
    auth_hint: str = ""  # ends a 401/403 message: which input to pass
    data: Callable[[Path], Path] | None = field(default=None, repr=False, compare=False)  # data: URIs

    def fetch(self, folder: Path, tokens: Tokens, settings: LoraSettings) -> Path:
        if self.data is not None:
            return self.data(folder)
        headers = _bearer(getattr(tokens, self.token)) if self.token else {}
        return dl.download(self.url, folder / "download", what=WHAT, headers=headers, limits=limits(settings),
                           auth_hint=self.auth_hint, space_hint=" (or lower FLUX_LORA_CACHE_GB so the cache leaves room)")

    def check_access(self, tokens: Tokens, settings: LoraSettings) -> None:
        """Whether the host lets these tokens read the file (one request for its first byte): a DownloadError saying
        which token to pass if not. Hosts that gate a file often answer anyone about it (Hugging Face's metadata is
        public for a gated repo), so only asking for the file itself tells."""
        dl.probe(self.url, what=WHAT, headers=_bearer(getattr(tokens, self.token)), limits=limits(settings),
                 auth_hint=self.auth_hint)


class Ref:
    shown: str  # safe to log
    pinned: bool  # True when the reference names one immutable file

    def locate(self, tokens: Tokens, settings: LoraSettings) -> Source:
        raise NotImplementedError


@dataclass(frozen=True)
class ReplicateRef(Ref):
    owner: str
    model: str
    version: str | None = None

    @property
    def shown(self) -> str:
        return f"{self.owner}/{self.model}" + (f"/versions/{self.version}" if self.version else "")

    @property
    def pinned(self) -> bool:
        return self.version is not None

    def locate(self, tokens: Tokens, settings: LoraSettings) -> Source:
        url = f"{settings.replicate_url}/{self.shown}/_weights"
        hint = (f"{self.shown} is private: only public Replicate models load here (or ones REPLICATE_API_TOKEN, "
                "set where this container runs, can read).")
        if self.version:
            return Source(f"replicate:{self.shown}", url, "replicate", hint)
        # Unversioned: where _weights redirects names the latest version's file; the key follows it.
        try:
            found = dl.probe(url, what=WHAT, headers=_bearer(tokens.replicate), limits=limits(settings), auth_hint=hint)
        except dl.DownloadError as exc:
            raise _not_found(exc, f"Replicate model {self.shown} was not found or has no trained LoRA weights. "
                             "Check the owner/model[/version] reference.") from None
        key = f"replicate:{self.shown}@{dl.redact(found.url)}#{found.etag or _digest(found.url)}"
        return Source(key, found.url, "replicate" if dl.same_origin(found.url, url) else None, hint)


@dataclass(frozen=True)
class HuggingFaceRef(Ref):
    repo: str
    revision: str = "main"
    path: str | None = None  # None: the repo's one .safetensors

    @property
    def shown(self) -> str:
        return f"huggingface.co/{self.repo}" + (f"/{self.path}" if self.path else "") + (
            f" (revision {self.revision})" if self.revision != "main" else "")

    @property
    def pinned(self) -> bool:
        return self.path is not None and re.fullmatch(r"[0-9a-f]{40}", self.revision) is not None

    def locate(self, tokens: Tokens, settings: LoraSettings) -> Source:
        from huggingface_hub import hf_hub_url

        hint = f"If {self.repo} is private or gated, pass hf_api_token (a Hugging Face token that can read it)."
        revision, path = self.revision, self.path
        if not self.pinned:
            revision, files = self._commit_and_files(tokens, settings.hf_endpoint)
            path = path or self._only_safetensors(files)
            if path not in files:
                raise LoraError(f"{self.shown}: the repo has no file {path!r} (it has: {listing(files)}).")
        if path.lower().endswith(PICKLE_SUFFIXES):
            raise LoraError(pickle_message(f"{self.repo}/{path}"))
        url = hf_hub_url(self.repo, path, revision=revision, endpoint=settings.hf_endpoint)
        return Source(f"hf:{self.repo}@{revision}/{path}", url, "hf", hint)

    def _commit_and_files(self, tokens: Tokens, endpoint: str) -> tuple[str, list[str]]:
        import httpx
        from huggingface_hub import HfApi
        from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

        netguard.install_for_huggingface_hub()
        try:
            info = HfApi(endpoint=endpoint, token=tokens.hf or False).model_info(self.repo, revision=self.revision)
        except GatedRepoError:
            raise LoraError(f"{self.repo} is gated: accept its terms on huggingface.co with your account, then pass "
                            "hf_api_token (a token of that account).") from None
        except RepositoryNotFoundError:
            raise LoraError(f"Hugging Face repo {self.repo} was not found. Check the reference; if the repo is "
                            "private, pass hf_api_token (a token that can read it).") from None
        except RevisionNotFoundError:
            raise LoraError(f"{self.repo} has no revision {self.revision!r}. Check the reference.") from None
        except HfHubHTTPError as exc:
            status = getattr(getattr(exc, "response", None), "status_code", "?")
            raise LoraError(f"Hugging Face answered HTTP {status} for {self.repo}; try again later.") from None
        except httpx.TransportError as exc:
            raise LoraError(f"Could not reach Hugging Face for {self.repo} ({type(exc).__name__}); try again later.") from None
        return info.sha, [s.rfilename for s in info.siblings or []]

    def _only_safetensors(self, files: list[str]) -> str:
        found = [f for f in files if f.endswith(SAFETENSORS)]
        if len(found) == 1:
            return found[0]
        if found:
            raise LoraError(
                f"huggingface.co/{self.repo} holds {len(found)} .safetensors files: {listing(found)}. Name one: "
                f"huggingface.co/{self.repo}/{found[0]}"
            )
        pickles = [f for f in files if f.lower().endswith(PICKLE_SUFFIXES)]
        raise LoraError(f"huggingface.co/{self.repo} holds no .safetensors file"
                        + (f" (only pickle files: {listing(pickles)}, which are never loaded)." if pickles else "."))


@dataclass(frozen=True)
class CivitaiRef(Ref):
    model_id: str | None = None
    version_id: str | None = None

    @property
    def shown(self) -> str:
        if self.model_id:
            return f"civitai.com/models/{self.model_id}" + (f"?modelVersionId={self.version_id}" if self.version_id else "")
        return f"civitai.com/api/download/models/{self.version_id}"

    @property
    def pinned(self) -> bool:
        return self.version_id is not None

    def locate(self, tokens: Tokens, settings: LoraSettings) -> Source:
        hint = "CivitAI asks for a token to download this model: pass civitai_api_token."
        version = self.version_id or self._latest_version(_bearer(tokens.civitai), hint, settings)
        url = f"{settings.civitai_url}/api/download/models/{version}?type=Model&format=SafeTensor"
        return Source(f"civitai:{version}", url, "civitai", hint)

    def _latest_version(self, headers: dict, hint: str, settings: LoraSettings) -> str:
        try:  # an API answer: 1 MiB at most, within the LoRA fetch's time
            info = dl.fetch_json(f"{settings.civitai_url}/api/v1/models/{self.model_id}", what=WHAT, headers=headers,
                                 limits=replace(limits(settings), max_bytes=dl.MiB), auth_hint=hint)
        except dl.DownloadError as exc:
            raise _not_found(exc, f"CivitAI model {self.model_id} was not found. Check the id in the URL.") from None
        if not isinstance(info, dict):
            raise LoraError(f"CivitAI answered something unexpected for model {self.model_id}; try again later.")
        kind = str(info.get("type", "LORA"))
        if kind.upper() not in ("LORA", "LOCON", "DORA"):
            raise LoraError(f"CivitAI model {self.model_id} is a {kind}, not a LoRA.")
        versions = info.get("modelVersions") or []
        if not versions or "id" not in versions[0]:
            raise LoraError(f"CivitAI model {self.model_id} has no downloadable version.")
        return str(versions[0]["id"])  # CivitAI lists the newest version first


@dataclass(frozen=True)
class UrlRef(Ref):
    url: str = field(repr=False)  # its query may hold a signature: never logged

    @property
    def shown(self) -> str:
        return dl.redact(self.url)

    pinned = True

    def locate(self, tokens: Tokens, settings: LoraSettings) -> Source:
        if urlsplit(self.url).path.lower().endswith(PICKLE_SUFFIXES):
            raise LoraError(pickle_message(self.shown))
        # The whole URL is the key (hashed: its query may hold a signature): two URLs that differ only in their query
        # are two files. A re-signed URL of a file already cached is fetched again.
        return Source(f"url:{_digest(self.url)}", self.url, None, "If the file needs a login, use a signed URL.")


@dataclass(frozen=True)
class DataRef(Ref):
    uri: str = field(repr=False)

    @property
    def shown(self) -> str:
        return f"data: URI ({len(self.uri)} characters)"

    pinned = True

    def locate(self, tokens: Tokens, settings: LoraSettings) -> Source:
        header, comma, payload = self.uri[5:].partition(",")
        if not comma:
            raise LoraError("The LoRA data: URI has no ',' before its data.")
        if len(payload) * 3 // 4 > settings.max_bytes:
            raise LoraError(f"The LoRA data: URI is over the {settings.max_bytes / 2**20:.0f} MiB limit.")

        def fetch(folder: Path) -> Path:
            try:
                body = (base64.b64decode("".join(payload.split()), validate=True) if header.endswith(";base64")
                        else unquote_to_bytes(payload))
            except (binascii.Error, ValueError):
                raise LoraError("The LoRA data: URI is not valid base64.") from None
            path = folder / "download"
            path.write_bytes(body)
            return path

        return Source(f"data:{_digest(self.uri)}", data=fetch)


def _digest(text: str) -> str:
    """What a key holds of a reference that may carry a secret (a signed query, a data: URI): its hash."""
    return hashlib.sha256(text.encode()).hexdigest()


_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
_OWNER = r"[A-Za-z0-9][A-Za-z0-9_-]*"  # no dots: "host.name/x" is a URL without its scheme, not an owner
_REPLICATE = re.compile(
    rf"^(?:(?:https?://)?(?:www\.)?replicate\.com/)?(?P<owner>{_OWNER})/(?P<model>{_SEGMENT})"
    rf"(?:(?:/versions)?/(?P<version>[A-Za-z0-9]+)|:(?P<colon>[A-Za-z0-9]+))?/?$"
)
_HF = re.compile(r"^(?:https?://)?(?:www\.)?(?:huggingface\.co|hf\.co)/(?P<rest>[^?#]*)(?:[?#].*)?$")
_CIVITAI = re.compile(r"^(?:https?://)?(?:www\.)?civitai\.com/(?P<rest>[^?#]*)(?:\?(?P<query>[^#]*))?(?:#.*)?$")
ACCEPTED = (
    "Use a Replicate model (owner/model or owner/model/version), a Hugging Face reference "
    "(huggingface.co/owner/repo[/file.safetensors]), a CivitAI URL (civitai.com/models/<id>), an https URL of a "
    ".safetensors file, or a data: URI."
)


def parse(text: str) -> Ref:
    """The reference a user wrote, understood; a UserError names the accepted forms otherwise."""
    text = text.strip()
    if text.startswith("data:"):
        return DataRef(text)
    if m := _HF.match(text):
        return _hugging_face(m.group("rest").strip("/"), text)
    if m := _CIVITAI.match(text):
        return _civitai(m.group("rest").strip("/"), parse_qs(m.group("query") or ""))
    if m := _REPLICATE.match(text):
        return ReplicateRef(m.group("owner"), m.group("model"), m.group("version") or m.group("colon"))
    if re.match(r"^https?://", text, re.IGNORECASE):
        return UrlRef(text)
    raise LoraError(f"Cannot read the LoRA reference {dl.shown(text)!r}. {ACCEPTED}")


def _hugging_face(rest: str, text: str) -> HuggingFaceRef:
    parts = [p for p in rest.split("/") if p]
    if len(parts) < 2 or parts[0] in ("datasets", "spaces"):
        raise LoraError(f"{dl.redact(text)!r} is not a Hugging Face model reference: use huggingface.co/owner/repo "
                        "or huggingface.co/owner/repo/file.safetensors.")
    repo = "/".join(parts[:2])
    if len(parts) == 2:
        return HuggingFaceRef(repo)
    if parts[2] in ("resolve", "blob") and len(parts) >= 5:
        return HuggingFaceRef(repo, parts[3], "/".join(parts[4:]))
    if parts[2] == "tree" and len(parts) == 4:
        return HuggingFaceRef(repo, parts[3])
    return HuggingFaceRef(repo, "main", "/".join(parts[2:]))


def _civitai(rest: str, query: dict) -> CivitaiRef:
    if m := re.fullmatch(r"models/(\d+)(?:/.*)?", rest):
        version = (query.get("modelVersionId") or [None])[0]
        return CivitaiRef(model_id=m.group(1), version_id=version if version and version.isdigit() else None)
    if m := re.fullmatch(r"api/download/models/(\d+)", rest):
        return CivitaiRef(version_id=m.group(1))
    raise LoraError("CivitAI references look like civitai.com/models/<id>[/<name>] or "
                    "civitai.com/api/download/models/<version id>.")


def _not_found(exc: dl.DownloadError, message: str) -> UserError:
    """A 404 said the way the reference's kind says it; any other failure as the downloader worded it."""
    return LoraError(message) if exc.status == 404 else exc





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


