"""LoRA references in, validated and normalized LoRA weights out.

    reference (str) --parse--> Ref --locate--> Source (cache key + how to fetch) --fetch--> .safetensors in the cache
                                                                                  --load--> flux.lora.LoraWeights

References (README, "LoRAs"):
  Replicate    owner/model, owner/model/version, owner/model/versions/<id>, owner/model:<id>, replicate.com/... URLs:
               the trained weights of a Replicate FLUX fine-tune ({FLUX_REPLICATE_URL}/owner/model[/versions/id]/_weights,
               a .tar holding one .safetensors). REPLICATE_API_TOKEN (environment) is sent to Replicate if set.
  Hugging Face huggingface.co/owner/repo (the repo's one .safetensors), huggingface.co/owner/repo/<file>.safetensors,
               https://huggingface.co/owner/repo/resolve/<revision>/<file> (and /blob/ URLs). Token: hf_api_token or
               HF_TOKEN. Built on HF_ENDPOINT.
  CivitAI      civitai.com/models/<id>[/<name>][?modelVersionId=<v>], civitai.com/api/download/models/<v>.
               Token: civitai_api_token or CIVITAI_API_TOKEN, sent as a header (never in a URL). Built on FLUX_CIVITAI_URL.
  URLs         any http(s) URL of a .safetensors file (signed URLs with a query string too) or of a .tar or .zip
               holding one.
  data: URIs   base64 of a .safetensors file or of a .tar or .zip holding one.

Every file is unpacked (an archive read as a stream: at most MAX_MEMBERS members and
FLUX_LORA_MAX_BYTES of content, counted while reading), read and checked in a staging
folder, and only then lands in an LRU cache under weights/loras/ (flux.cache.DiskCache)
named by a hash of its key: the whole reference (a URL's query included: two URLs that
differ only there are two files) or, for the hosts above, what identifies the file
there. References that can change (an unversioned Replicate model, a Hugging Face
branch, a CivitAI model page) are resolved again at most every FLUX_LORA_RECHECK_S
seconds, so a new version is picked up; the others are cached for good. Only
safetensors are ever read: pickle files (.bin, .ckpt, .pt, a torch.save zip) are
refused, never passed to torch.load.

Formats: every layout becomes per-layer factors (flux.lora.Delta), which flux/lora.py
fuses one way. diffusers' FluxLoraLoaderMixin.lora_state_dict turns the key names of
the layouts in use (diffusers/PEFT, ai-toolkit, kohya/sd-scripts, XLabs, BFL-native as
ComfyUI writes it) into diffusers/PEFT keys; each lora_A/lora_B pair becomes a Delta
scaled as PEFT would scale it (lora_alpha / r from the adapter metadata, or the file's
alphas). The adapter metadata is read for those numbers only, each checked: nothing in
a file configures the serving model. It routes only what diffusers cannot do for
FLUX.1: BFL names with PEFT's lora_A/lora_B (BFL's own trainer, and fal's under
`base_model.model.`, whose diffusers converter is written for FLUX.1's full block
counts) go to the ComfyUI form diffusers converts at any size, and LyCORIS LoKr/LoHa
files become Deltas per diffusers module (a fused BFL qkv/linear1 split by rows). Every
tensor must be finite and floating-point, every Delta fusable (flux.lora.Delta.problem)
before the LoRA is cached or used; DoRA is refused.

Settings (environment, read on every call):
  FLUX_LORA_MAX_BYTES   largest LoRA download (default 2 GiB)
  FLUX_LORA_CACHE_GB    size cap of the on-disk LoRA cache (default 20)
  FLUX_LORA_TIMEOUT_S   longest a LoRA download may take (default 600)
  FLUX_LORA_RECHECK_S   how long a resolved unversioned reference is trusted (default 300)
  FLUX_REPLICATE_URL, FLUX_CIVITAI_URL, HF_ENDPOINT   where replicate.com, civitai.com and huggingface.co are
"""

from __future__ import annotations

import base64
import binascii
import collections
import hashlib
import hmac
import json
import logging
import lzma
import math
import os
import re
import tarfile
import threading
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable
from urllib.parse import parse_qs, unquote_to_bytes, urlsplit

import torch

from flux import download as dl
from flux import netguard
from flux.cache import DiskCache
from flux.errors import UserError
from flux.lora import COMPONENTS, FACTORS, TRANSFORMER, Delta, LoraWeights
from flux.progress import human_bytes
from flux.weights import shown as shown_reference
from flux.weights import weights_dir

log = logging.getLogger("flux.lora_loader")

GiB = 1024**3
SAFETENSORS = ".safetensors"
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
WHAT = "LoRA"


class LoraError(UserError):
    """A LoRA could not be fetched or used; the message says what to change."""


# ----- settings ----------------------------------------------------------------------------------------------------

def _number(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    try:
        return float(raw) if raw else default
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None


def max_bytes() -> int:
    return int(_number("FLUX_LORA_MAX_BYTES", 2 * GiB))


def cache_bytes() -> int:
    return int(_number("FLUX_LORA_CACHE_GB", 20) * GiB)


def recheck_seconds() -> float:
    return _number("FLUX_LORA_RECHECK_S", 300)


def limits() -> dl.Limits:
    total = _number("FLUX_LORA_TIMEOUT_S", 600)
    # A server that goes silent is given up on within the total budget, not after minutes of per-read timeouts.
    return dl.Limits(max_bytes=max_bytes(), total_timeout=total, read_timeout=min(dl.Limits.read_timeout, total))


def replicate_url() -> str:
    return (os.environ.get("FLUX_REPLICATE_URL") or "https://replicate.com").rstrip("/")


def civitai_url() -> str:
    return (os.environ.get("FLUX_CIVITAI_URL") or "https://civitai.com").rstrip("/")


def hf_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def cache() -> DiskCache:
    return DiskCache(weights_dir() / "loras", cache_bytes(), suffix=SAFETENSORS)


@dataclass(frozen=True)
class Tokens:
    """Credentials for the hosts LoRAs come from. Never logged, never in a message, a URL or a file name."""

    hf: str | None = field(default=None, repr=False)
    civitai: str | None = field(default=None, repr=False)
    replicate: str | None = field(default=None, repr=False)

    def fingerprint(self) -> str:
        """Tells token sets apart without holding them: a keyed hash whose key lives in this process only."""
        return hmac.new(_PROCESS_KEY, repr((self.hf, self.civitai, self.replicate)).encode(), "sha256").hexdigest()

    @classmethod
    def of(cls, hf_api_token: str | None = None, civitai_api_token: str | None = None) -> "Tokens":
        """The request's tokens, else the environment's."""
        return cls(
            hf=hf_api_token or os.environ.get("HF_TOKEN") or None,
            civitai=civitai_api_token or os.environ.get("CIVITAI_API_TOKEN") or None,
            replicate=os.environ.get("REPLICATE_API_TOKEN") or None,
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

    def fetch(self, folder: Path, tokens: Tokens) -> Path:
        if self.data is not None:
            return self.data(folder)
        headers = _bearer(getattr(tokens, self.token)) if self.token else {}
        return dl.download(self.url, folder / "download", what=WHAT, headers=headers, limits=limits(),
                           auth_hint=self.auth_hint, space_hint=" (or lower FLUX_LORA_CACHE_GB so the cache leaves room)")


class Ref:
    shown: str  # safe to log
    pinned: bool  # True when the reference names one immutable file

    def locate(self, tokens: Tokens) -> Source:
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

    def locate(self, tokens: Tokens) -> Source:
        url = f"{replicate_url()}/{self.shown}/_weights"
        hint = (f"{self.shown} is private: only public Replicate models load here (or ones REPLICATE_API_TOKEN, "
                "set where this container runs, can read).")
        if self.version:
            return Source(f"replicate:{self.shown}", url, "replicate", hint)
        # Unversioned: where _weights redirects names the latest version's file; the key follows it.
        try:
            found = dl.probe(url, what=WHAT, headers=_bearer(tokens.replicate), limits=limits(), auth_hint=hint)
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

    def locate(self, tokens: Tokens) -> Source:
        from huggingface_hub import hf_hub_url

        hint = f"If {self.repo} is private or gated, pass hf_api_token (a Hugging Face token that can read it)."
        revision, path = self.revision, self.path
        if not self.pinned:
            revision, files = self._commit_and_files(tokens)
            path = path or self._only_safetensors(files)
            if path not in files:
                raise LoraError(f"{self.shown}: the repo has no file {path!r} (it has: {_listing(files)}).")
        if path.lower().endswith(PICKLE_SUFFIXES):
            raise LoraError(_pickle_message(f"{self.repo}/{path}"))
        url = hf_hub_url(self.repo, path, revision=revision, endpoint=hf_endpoint())
        return Source(f"hf:{self.repo}@{revision}/{path}", url, "hf", hint)

    def _commit_and_files(self, tokens: Tokens) -> tuple[str, list[str]]:
        import httpx
        from huggingface_hub import HfApi
        from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

        netguard.install_for_huggingface_hub()
        try:
            info = HfApi(endpoint=hf_endpoint(), token=tokens.hf or False).model_info(self.repo, revision=self.revision)
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
                f"huggingface.co/{self.repo} holds {len(found)} .safetensors files: {_listing(found)}. Name one: "
                f"huggingface.co/{self.repo}/{found[0]}"
            )
        pickles = [f for f in files if f.lower().endswith(PICKLE_SUFFIXES)]
        raise LoraError(f"huggingface.co/{self.repo} holds no .safetensors file"
                        + (f" (only pickle files: {_listing(pickles)}, which are never loaded)." if pickles else "."))


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

    def locate(self, tokens: Tokens) -> Source:
        hint = "CivitAI asks for a token to download this model: pass civitai_api_token."
        version = self.version_id or self._latest_version(_bearer(tokens.civitai), hint)
        url = f"{civitai_url()}/api/download/models/{version}?type=Model&format=SafeTensor"
        return Source(f"civitai:{version}", url, "civitai", hint)

    def _latest_version(self, headers: dict, hint: str) -> str:
        try:
            info = dl.fetch_json(f"{civitai_url()}/api/v1/models/{self.model_id}", what=WHAT, headers=headers,
                                 auth_hint=hint)
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

    def locate(self, tokens: Tokens) -> Source:
        if urlsplit(self.url).path.lower().endswith(PICKLE_SUFFIXES):
            raise LoraError(_pickle_message(self.shown))
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

    def locate(self, tokens: Tokens) -> Source:
        header, comma, payload = self.uri[5:].partition(",")
        if not comma:
            raise LoraError("The LoRA data: URI has no ',' before its data.")
        if len(payload) * 3 // 4 > max_bytes():
            raise LoraError(f"The LoRA data: URI is over the {max_bytes() / 2**20:.0f} MiB limit.")

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
    raise LoraError(f"Cannot read the LoRA reference {shown_reference(text)!r}. {ACCEPTED}")


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


def _listing(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "") if names else "nothing"


def _pickle_message(shown: str) -> str:
    return (f"{shown} is a pickle checkpoint (.bin/.ckpt/.pt), which is never loaded because it can run code. "
            "Use the LoRA's .safetensors file.")


# ----- into the cache ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Fetched:
    key: str
    shown: str  # safe to log and to return: never a token or a query string
    path: Path
    cached: bool  # it was in the disk cache already
    weights: LoraWeights | None = field(default=None, repr=False, compare=False)  # read while it was checked


class LoraLoader:
    """Fetches references into the on-disk cache (remembering where unversioned ones led) and loads them. Only a
    file that reads as a LoRA enters the cache: a download is unpacked, read and checked in a staging folder first."""

    def __init__(self):
        # (reference, tokens' fingerprint) -> (source, when located): a caller with other tokens locates again,
        # so a private or gated reference is never served from memory to a caller who could not read it.
        self._located: dict[tuple[str, str], tuple[Source, float]] = {}
        self._lock = threading.Lock()

    def fetch(self, reference: str, tokens: Tokens) -> Fetched:
        ref = parse(reference)
        started = time.monotonic()
        source = self._locate(reference.strip(), ref, tokens)
        files = cache()
        path = files.get(source.key)
        if path is not None:
            log.info("lora: %s from the cache in %.2fs", ref.shown, time.monotonic() - started)
            return Fetched(source.key, ref.shown, path, cached=True)
        with files.staging() as folder:
            raw = source.fetch(folder, tokens)
            path = _as_safetensors(raw, folder, ref.shown)
            weights = self._read(path, source.key, ref.shown)
            path = files.put(source.key, path)
        log.info("lora: %s fetched into the cache in %.2fs", ref.shown, time.monotonic() - started)
        return Fetched(source.key, ref.shown, path, cached=False, weights=weights)

    @staticmethod
    def forget(fetched: Fetched) -> None:
        """Drop a fetched file from the cache (a LoRA the model refused: no file stays for a failed request)."""
        cache().discard(fetched.key)

    def _locate(self, reference: str, ref: Ref, tokens: Tokens) -> Source:
        if ref.pinned:
            return ref.locate(tokens)
        memo = (reference, tokens.fingerprint())
        with self._lock:
            known = self._located.get(memo)
        if known is not None and time.monotonic() - known[1] < recheck_seconds():
            return known[0]
        source = ref.locate(tokens)  # a failure is never remembered
        now = time.monotonic()
        with self._lock:
            for old in [k for k, (_, when) in self._located.items() if now - when >= recheck_seconds()]:
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


# An archive of a LoRA holds the LoRA and a few files beside it (a trainer's config, sample images): more members
# than this is refused while reading, before the time it would take to go through them.
MAX_MEMBERS = 1000


def _as_safetensors(raw: Path, folder: Path, shown: str) -> Path:
    """The one .safetensors file a download holds (itself, or the one in its .tar or .zip), checked to be one."""
    path = raw
    if _is_tar(raw):
        path = _from_tar(raw, folder / "lora.safetensors", shown)
    elif zipfile.is_zipfile(raw):
        path = _from_zip(raw, folder / "lora.safetensors", shown)
    if path != raw:
        raw.unlink()
    _check_safetensors(path, shown)
    return path


def _is_tar(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except (EOFError, zlib.error, lzma.LZMAError, OSError):  # a compressed stream that is not a tar
        return False


def _member_problem(name: str, regular: bool) -> str | None:
    if name.startswith("/") or ".." in PurePosixPath(name).parts:
        return f"holds an unsafe path ({_short(name)!r})"
    if not regular:
        return f"holds a link or special file ({_short(name)!r})"
    return None


def _from_tar(raw: Path, dest: Path, shown: str) -> Path:
    """The archive read as a stream, one member at a time: at most MAX_MEMBERS members and max_bytes() of content
    (counted from each member's header before its content is read); the one .safetensors written to dest."""
    names, found, total = [], [], 0
    try:
        with tarfile.open(raw, mode="r|*") as tar:
            for member in tar:
                if len(names) == MAX_MEMBERS:
                    raise LoraError(_too_many(shown, "tar"))
                problem = _member_problem(member.name, member.isfile() or member.isdir())
                if problem:
                    raise LoraError(f"{shown}: the archive {problem}; refusing to read it.")
                total += member.size
                if total > max_bytes():
                    raise LoraError(_too_big(shown))
                names.append(member.name)
                if member.isfile() and member.name.endswith(SAFETENSORS):
                    found.append(member.name)
                    if len(found) == 1:
                        _copy(tar.extractfile(member), dest, shown)
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError) as exc:
        log.info("lora: %s: reading the tar archive failed (%s)", shown, type(exc).__name__)
        raise LoraError(f"{shown}: the .tar archive is damaged or truncated: check the file.") from None
    except OSError as exc:
        if exc.errno is not None:  # the disk, not the archive
            raise
        raise LoraError(f"{shown}: the .tar archive is damaged or truncated: check the file.") from None
    return _the_one(shown, names, found, dest)


def _from_zip(raw: Path, dest: Path, shown: str) -> Path:
    """A zip read like a tar: at most MAX_MEMBERS members, max_bytes() of content (counted as it is unpacked, not as
    the zip announces it); the one .safetensors written to dest. A zip of a pickle (torch.save) is refused as one."""
    try:
        with zipfile.ZipFile(raw) as archive:
            members = archive.infolist()
            if len(members) > MAX_MEMBERS:
                raise LoraError(_too_many(shown, "zip"))
            for member in members:
                problem = _member_problem(member.filename, (member.external_attr >> 28) != 0o12)  # not a symlink
                if problem:
                    raise LoraError(f"{shown}: the zip archive {problem}; refusing to read it.")
            names = [m.filename for m in members]
            found = [m for m in members if not m.is_dir() and m.filename.endswith(SAFETENSORS)]
            if not found and any(PurePosixPath(n).name == "data.pkl" for n in names):
                raise LoraError(_pickle_message(shown))
            if len(found) == 1:
                with archive.open(found[0]) as source:
                    _copy(source, dest, shown)
    except UserError:
        raise
    except zipfile.BadZipFile:
        raise LoraError(f"{shown}: the .zip archive is damaged or truncated: check the file.") from None
    except (zlib.error, EOFError, NotImplementedError, RuntimeError, ValueError) as exc:
        log.info("lora: %s: reading the zip archive failed (%s)", shown, type(exc).__name__)
        raise LoraError(f"{shown}: the .zip archive is damaged, encrypted or compressed in a way this loader does "
                        "not read: use a .safetensors file or a plain .zip.") from None
    return _the_one(shown, names, [m.filename for m in found], dest)


def _the_one(shown: str, names: list[str], found: list[str], dest: Path) -> Path:
    if not found:
        pickles = [n for n in names if n.lower().endswith(PICKLE_SUFFIXES)]
        raise LoraError(f"{shown}: the archive holds no .safetensors file (it holds: {_listing(names)})"
                        + (". Pickle files are never loaded." if pickles else "."))
    if len(found) > 1:
        raise LoraError(f"{shown}: the archive holds several .safetensors files ({_listing(found)}); expected one LoRA.")
    return dest


def _copy(source, dest: Path, shown: str) -> None:
    """Unpack one member, stopping at max_bytes() of what it really unpacks to."""
    written, limit = 0, max_bytes()
    with open(dest, "wb") as out:
        while chunk := source.read(dl.MiB):
            written += len(chunk)
            if written > limit:
                raise LoraError(_too_big(shown))
            out.write(chunk)


def _too_many(shown: str, kind: str) -> str:
    return (f"{shown}: the {kind} archive holds more than {MAX_MEMBERS:,} files; a LoRA's archive holds the "
            ".safetensors file and a few files beside it. Send the .safetensors file itself.")


def _too_big(shown: str) -> str:
    return (f"{shown}: the archive unpacks to more than {human_bytes(max_bytes())}, the LoRA size limit "
            "(FLUX_LORA_MAX_BYTES). Send the .safetensors file itself.")


def _check_safetensors(path: Path, shown: str) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, "pt") as f:
            if not list(f.keys()):
                raise LoraError(f"{shown} is an empty safetensors file.")
        return
    except (SafetensorError, OSError, ValueError):
        pass
    with open(path, "rb") as fh:
        head = fh.read(64)
    if head.lstrip()[:1] == b"<":
        raise LoraError(f"{shown} is a web page, not a safetensors file: use the file's direct download URL.")
    if head[:4] == b"PK\x03\x04":
        raise LoraError(f"{shown} is a .zip archive that cannot be read (damaged or truncated); a torch checkpoint "
                        "(.pt/.ckpt, a zip of a pickle) is never loaded either. Use the LoRA's .safetensors file.")
    if head[:1] == b"\x80":
        raise LoraError(_pickle_message(shown))
    raise LoraError(f"{shown} is not a safetensors file (or it is truncated): check the URL.")


# ----- into diffusers' keys ----------------------------------------------------------------------------------------

_BFL_ROOTS = ("double_blocks.", "single_blocks.", "img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.",
              "final_layer.")
# diffusers' kohya converter leaves the transformer's top-level modules without their "transformer." prefix, and
# diffusers then skips them without a word: they get it back here.
_TRANSFORMER_ROOTS = ("x_embedder.", "context_embedder.", "time_text_embed.", "norm_out.", "proj_out.",
                      "transformer_blocks.", "single_transformer_blocks.")


def layout(keys: list[str], metadata: dict | None) -> str:
    """The name of the layout a LoRA file is written in, for the logs and for the routing diffusers cannot do (the
    order follows diffusers' own detection). "unknown" refuses nothing: diffusers decides."""
    kinds = {kind for k in keys for kind, names in _LYCORIS.items() if kind != "lora" and _suffix(k) in names}
    if kinds:
        return kinds.pop() if len(kinds) == 1 else "lycoris"
    if any(k.startswith("base_model.model.") and _strip_bfl_prefix(k).startswith(_BFL_ROOTS) for k in keys):
        return "fal"
    if any(k.startswith(("lora_unet_", "lora_te", "lora_transformer_")) for k in keys):
        return "kohya"
    if any(".lora_down.weight" in k for k in keys) and any(k.startswith("diffusion_model.") for k in keys):
        return "bfl"
    if any("processor" in k for k in keys):
        return "xlabs"
    if any("query_norm.scale" in k for k in keys):
        return "bfl-control"
    if any(_strip_bfl_prefix(k).startswith(_BFL_ROOTS) for k in keys):
        return "bfl-peft" if any(".lora_A." in k for k in keys) else "bfl"
    if any(k.startswith(("transformer.", "text_encoder.")) for k in keys):
        return "diffusers" if metadata and "lora_adapter_metadata" in metadata else "ai-toolkit"
    return "unknown"


def _strip_bfl_prefix(key: str) -> str:
    for prefix in ("diffusion_model.", "model.diffusion_model.", "transformer.", "base_model.model."):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _bfl_to_comfy(state_dict: dict) -> dict:
    """BFL module names with PEFT's lora_A/lora_B (or no prefix) renamed to the ComfyUI form diffusers converts."""
    out = {}
    for key, value in state_dict.items():
        key = "diffusion_model." + _strip_bfl_prefix(key)
        out[key.replace(".lora_A.weight", ".lora_down.weight").replace(".lora_B.weight", ".lora_up.weight")] = value
    return out


FORMATS = ("diffusers/PEFT, ai-toolkit, kohya/sd-scripts, XLabs, BFL-native (ComfyUI, BFL's and fal's trainers), "
           "LyCORIS LoKr and LoHa")


def _unreadable(shown: str, keys: list[str], why: str = "") -> LoraError:
    """What the file holds and what is accepted; `why` says what was recognised, if anything."""
    if why:
        return LoraError(f"{shown} {why} (its keys look like {', '.join(_short(k) for k in keys[:4])}). This loader "
                         f"reads FLUX LoRAs in these layouts: {FORMATS}.")
    return LoraError(
        f"{shown} is not a FLUX LoRA in any layout this loader reads ({FORMATS}): its keys look like "
        f"{', '.join(_short(k) for k in keys[:4])}. Use a LoRA trained for FLUX.1-dev, as a .safetensors file in one "
        "of these layouts."
    )


def _short(text: str, limit: int = 80) -> str:
    """A name from the file, cut to a length a message can carry."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def normalize(path: Path, key: str, shown: str) -> LoraWeights:
    """A safetensors LoRA file as per-layer factors (flux.lora.Delta per "<component>.<module>"), each checked to be
    fusable (matrices of finite numbers that multiply out, rank at least 1, a finite scale); refused with a message
    that says what to change if it cannot be. Key names go through diffusers' own converters; the file's adapter
    metadata is read only for the numbers that scale the LoRA (as PEFT would scale it), never as a configuration."""
    tensors, header = _read(path, shown)
    keys = list(tensors)
    kind = layout(keys, header)
    if kind == "bfl-control":
        raise LoraError(f"{shown} is a FLUX Control LoRA (Canny/Depth): it needs a control image, which this model "
                        "does not take.")
    dropped = [k for k in keys if "t5xxl" in k or k.startswith("lora_te2_")]
    if dropped:
        log.warning("lora: %s carries T5 text-encoder weights (%d tensors); diffusers' FLUX loader has no T5 LoRA "
                    "support, so they are not applied", shown, len(dropped))
    tensors = _numbers(tensors, shown)
    dora = next((k for k in keys if k.endswith((".dora_scale", "lora_magnitude_vector"))), None)
    if dora is not None:
        raise LoraError(f"{shown} is a DoRA ({_short(dora)}): this loader applies LoRA, LoKr and LoHa weights, not "
                        "DoRA's weight decomposition. Use the LoRA without DoRA.")
    if kind in ("lokr", "loha", "lycoris"):
        deltas = _lycoris(tensors, shown, kind)
    else:
        deltas = _low_rank(tensors, header, kind, shown)
    for delta in deltas.values():
        problem = delta.problem()
        if problem:
            raise LoraError(f"{shown} cannot be used: {_short(delta.source)} {problem}. Use an intact LoRA file.")
    return LoraWeights(key=key, shown=shown, layout=kind, deltas=deltas)


def _read(path: Path, shown: str) -> tuple[dict, dict]:
    """The file's tensors (on the CPU) and its header's metadata."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(path, "pt") as f:
            header = f.metadata() or {}
        return load_file(path), header
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError):
        raise LoraError(f"{shown} is not a safetensors file this loader can read (its header or tensors are "
                        "damaged, or use a type torch has no place for): check the file.") from None


def _numbers(tensors: dict, shown: str) -> dict:
    """The tensors, refused unless each is floating-point and finite; an alpha may be a one-element integer (as
    float32 then, which diffusers' converters take)."""
    out = {}
    for name, value in tensors.items():
        if name.endswith(".alpha"):
            if value.numel() != 1:
                raise LoraError(f"{shown}: {_short(name)} holds {value.numel()} numbers; an alpha is one number.")
            if not value.is_floating_point():
                if value.dtype.is_complex or value.dtype == torch.bool:
                    raise LoraError(f"{shown}: {_short(name)} is a {str(value.dtype).removeprefix('torch.')}, not a "
                                    "number an alpha can be.")
                value = value.to(torch.float32)
        elif value.numel() == 0:
            raise LoraError(f"{shown}: {_short(name)} is empty (shape {tuple(value.shape)}): a LoRA of rank 0 changes "
                            "nothing. Use an intact LoRA file.")
        elif not value.is_floating_point():
            raise LoraError(f"{shown}: {_short(name)} holds {str(value.dtype).removeprefix('torch.')} values, not "
                            "floating-point numbers: it is not LoRA weights. Use an intact LoRA file.")
        if value.numel() and not bool(torch.isfinite(value).all()):
            raise LoraError(f"{shown}: {_short(name)} holds numbers that are not finite (NaN or infinity): the file is "
                            "damaged or was saved from a diverged training run. Use another LoRA file.")
        out[name] = value
    return out


def _low_rank(tensors: dict, header: dict, kind: str, shown: str) -> dict[str, Delta]:
    """A low-rank LoRA in any layout diffusers converts, as one "lora" Delta per module, scaled as PEFT would."""
    from diffusers import FluxPipeline
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    config = _adapter_metadata(header, shown)
    source = dict(tensors)  # diffusers' converters pop what they convert
    if kind in ("bfl", "bfl-peft", "fal") and not any(k.startswith("diffusion_model.") and ".lora_down." in k
                                                      for k in tensors):
        source = _bfl_to_comfy(source)
    try:
        state_dict, alphas = FluxPipeline.lora_state_dict(source, return_alphas=True)
        state_dict = {("transformer." + k if k.startswith(_TRANSFORMER_ROOTS) else k): v for k, v in state_dict.items()}
        alphas = {("transformer." + k if k.startswith(_TRANSFORMER_ROOTS) else k): v for k, v in (alphas or {}).items()}
        parts = {}
        for component in COMPONENTS:
            part = {k[len(component) + 1:]: v for k, v in state_dict.items() if k.startswith(component + ".")}
            if part and not any(".lora_A." in k for k in part):
                part = (convert_unet_state_dict_to_peft(part) if component == TRANSFORMER
                        else convert_state_dict_to_peft(convert_state_dict_to_diffusers(part)))
            parts[component] = part
    except MemoryError:
        raise
    except Exception as exc:  # diffusers' converters fail with whatever the keys trip: the user gets the keys
        log.info("lora: %s: diffusers' converter for the %s layout failed (%s)", shown, kind, type(exc).__name__)
        what = f"a {kind} LoRA" if kind != "unknown" else "a LoRA"
        raise LoraError(
            f"{shown} looks like {what} but its keys do not fit FLUX.1 (e.g. {', '.join(_short(k) for k in list(tensors)[:4])}): "
            f"it was made for a different model, or is damaged. This loader reads FLUX LoRAs in these layouts: "
            f"{FORMATS}."
        ) from None
    leftover = [k for k in state_dict if not k.startswith(tuple(c + "." for c in COMPONENTS))]
    if leftover or not any(parts.values()):
        raise _unreadable(shown, leftover or list(tensors))
    deltas = {}
    for component, part in parts.items():
        modules = _pairs(part, component, shown)
        for module, scale in _scales(component, modules, config, alphas, shown).items():
            a, b = modules[module]
            deltas[f"{component}.{module}"] = Delta("lora", {"lora_up": b, "lora_down": a}, scale, f"{component}.{module}")
    return deltas


_PAIR = {".lora_A.weight": 0, ".lora_B.weight": 1}


def _pairs(part: dict, component: str, shown: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (A, B) from PEFT keys; anything else in the file (a bias, a full weight) is refused by name."""
    found: dict[str, list] = {}
    for key, value in part.items():
        suffix = next((s for s in _PAIR if key.endswith(s)), None)
        if suffix is None:
            what = ("a bias for lora_B (PEFT's lora_bias), which this loader does not apply" if key.endswith(".lora_B.bias")
                    else "a weight that is not part of a low-rank pair (lora_A / lora_B): a LoRA changes layers only "
                    "through such pairs")
            raise LoraError(f"{shown} holds {component}.{_short(key)}, {what}. Use a LoRA of low-rank pairs only.")
        found.setdefault(key[: -len(suffix)], [None, None])[_PAIR[suffix]] = value
    incomplete = [m for m, (a, b) in found.items() if a is None or b is None]
    if incomplete:
        raise LoraError(f"{shown} is not a valid LoRA: {component}.{_short(incomplete[0])} lacks a matching "
                        "lora_A/lora_B pair.")
    return {m: (a, b) for m, (a, b) in found.items()}


# PEFT's LoraConfig fields that scale a LoRA, read from a file's adapter metadata as numbers (the rest is not read).
_SCALE_FIELDS = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora")


def _adapter_metadata(header: dict, shown: str) -> dict | None:
    """diffusers' adapter metadata from the file's header (`lora_adapter_metadata`, JSON), checked to be an object."""
    raw = header.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except ValueError:
        raise LoraError(f"{shown}: its adapter metadata (lora_adapter_metadata in the safetensors header) is not "
                        "valid JSON. Save the LoRA again, or remove that metadata.") from None
    if not isinstance(config, dict):
        raise LoraError(f"{shown}: its adapter metadata (lora_adapter_metadata in the safetensors header) is not a "
                        "JSON object of settings. Save the LoRA again, or remove that metadata.")
    return config


def _scales(component: str, modules: dict, config: dict | None, alphas: dict, shown: str) -> dict[str, float]:
    """Each module's scale, as PEFT would give it: lora_alpha / r (alpha / sqrt(r) with use_rslora), r and alpha
    from the adapter metadata (its rank_pattern and alpha_pattern matched as PEFT does: the module's name or a
    suffix of it), else from the file's alpha tensors (diffusers' network alphas), else 1. The metadata's rank must
    be the weights' rank: PEFT would fail on any other."""
    from peft import LoraConfig

    fields = {k[len(component) + 1:]: v for k, v in (config or {}).items() if k.startswith(component + ".")}
    ranks = {m: a.shape[0] for m, (a, _) in modules.items()}
    if fields:
        defaults = LoraConfig.__dataclass_fields__
        unused = sorted(k for k in fields if k not in _SCALE_FIELDS)
        if unused:
            log.info("lora: %s: adapter metadata %s not used (this loader fuses the file's low-rank pairs only)",
                     shown, ", ".join(_short(k, 40) for k in unused[:6]))
        if fields.get("use_dora"):
            raise LoraError(f"{shown}: its adapter metadata asks for DoRA (use_dora): this loader applies LoRA weights, "
                            "not DoRA's weight decomposition. Use the LoRA without DoRA.")
        r = _metadata_rank(fields.get("r", defaults["r"].default), "r", shown)
        alpha = _metadata_number(fields.get("lora_alpha", defaults["lora_alpha"].default), "lora_alpha", shown)
        rank_pattern = _pattern(fields.get("rank_pattern"), "rank_pattern", shown, _metadata_rank)
        alpha_pattern = _pattern(fields.get("alpha_pattern"), "alpha_pattern", shown, _metadata_number)
        rslora = fields.get("use_rslora") or False
        if not isinstance(rslora, bool):
            raise LoraError(f"{shown}: its adapter metadata gives use_rslora={_short(repr(rslora), 40)}, not true or false.")
        scales = {}
        for module, rank in ranks.items():
            own_r = _matching(rank_pattern, module, r)
            if own_r != rank:
                raise LoraError(f"{shown}: its adapter metadata gives rank {own_r} for {component}.{_short(module)}, but "
                                f"its weights have rank {rank}: the metadata does not belong to these weights. Save "
                                "the LoRA again, or remove the metadata.")
            own_alpha = _matching(alpha_pattern, module, alpha)
            scales[module] = own_alpha / (math.sqrt(rank) if rslora else rank)
        return scales
    own = {k.removesuffix(".alpha").split(".lora_A.")[0][len(component) + 1:]: float(v)
           for k, v in alphas.items() if k.startswith(component + ".")}
    if not own:
        return dict.fromkeys(modules, 1.0)
    common = collections.Counter(own.values()).most_common(1)[0][0]  # diffusers' lora_alpha for modules without one
    return {m: own.get(m, common) / rank if rank else math.nan for m, rank in ranks.items()}  # rank 0: refused later


def _metadata_number(value, name: str, shown: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LoraError(f"{shown}: its adapter metadata gives {name}={_short(repr(value), 40)}, not a finite number. "
                        "Save the LoRA again, or remove the metadata.")
    return float(value)


def _metadata_rank(value, name: str, shown: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LoraError(f"{shown}: its adapter metadata gives rank {name}={_short(repr(value), 40)}; a rank is a whole "
                        "number of at least 1. Save the LoRA again, or remove the metadata.")
    return value


_MODULE_NAME = re.compile(r"[A-Za-z0-9_.]+")


def _pattern(value, name: str, shown: str, check) -> dict:
    """A rank_pattern / alpha_pattern: module names (PEFT reads them as regular expressions; here only names are
    taken, never an expression from a file) to numbers."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise LoraError(f"{shown}: its adapter metadata gives {name} as {type(value).__name__}, not an object of module "
                        "names. Save the LoRA again, or remove the metadata.")
    for key in value:
        if not _MODULE_NAME.fullmatch(key):
            raise LoraError(f"{shown}: its adapter metadata has {name} key {_short(repr(key), 60)}, which is not a module "
                            "name (a regular expression is not read from a file). Save the LoRA again with module names.")
    return {key: check(v, f"{name}[{_short(key, 40)}]", shown) for key, v in value.items()}


def _matching(pattern: dict, module: str, default):
    """PEFT's pattern rule: the first key equal to the module's name or to a dotted suffix of it."""
    for key, value in pattern.items():
        if module == key or module.endswith("." + key):
            return value
    return default


# ----- LyCORIS: LoKr and LoHa ----------------------------------------------------------------------------------------

# The tensors of one module per kind (LyCORIS' names); "lora" is a plain LoRA pair, which LyCORIS files mix in.
_LYCORIS = {"lokr": FACTORS["lokr"], "loha": FACTORS["loha"], "lora": ("lora_down.weight", "lora_up.weight")}
# Parts of LyCORIS that FLUX's Linear layers have no use for or that this loader does not apply.
_LYCORIS_UNSUPPORTED = {"lokr_t1": "a Tucker core (conv layers)", "lokr_t2": "a Tucker core (conv layers)",
                        "hada_t1": "a Tucker core (conv layers)", "hada_t2": "a Tucker core (conv layers)",
                        "dora_scale": "DoRA weight decomposition"}
_LYCORIS_SUFFIXES = sorted({s for names in _LYCORIS.values() for s in names} | set(_LYCORIS_UNSUPPORTED) | {"alpha"},
                           key=len, reverse=True)


def _suffix(key: str) -> str | None:
    return next((s for s in _LYCORIS_SUFFIXES if key.endswith("." + s)), None)


# BFL module -> the diffusers modules it stands for and the share of the rows each takes (None: the whole).
_BFL_DOUBLE = {
    "img_attn.qkv": (("attn.to_q", "attn.to_k", "attn.to_v"), (1, 1, 1)),
    "img_attn.proj": (("attn.to_out.0",), None),
    "img_mlp.0": (("ff.net.0.proj",), None),
    "img_mlp.2": (("ff.net.2",), None),
    "img_mod.lin": (("norm1.linear",), None),
    "txt_attn.qkv": (("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), (1, 1, 1)),
    "txt_attn.proj": (("attn.to_add_out",), None),
    "txt_mlp.0": (("ff_context.net.0.proj",), None),
    "txt_mlp.2": (("ff_context.net.2",), None),
    "txt_mod.lin": (("norm1_context.linear",), None),
}
_BFL_SINGLE = {
    "linear1": (("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), (1, 1, 1, 4)),  # FLUX's MLP is 4x the width
    "linear2": (("proj_out",), None),
    "modulation.lin": (("norm.linear",), None),
}
_BFL_GLOBAL = {
    "img_in": "x_embedder", "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",  # BFL's halves are (scale, shift), diffusers' (shift, scale)
}
_DIFFUSERS_BLOCK = {m for table in (_BFL_DOUBLE, _BFL_SINGLE) for ms, _ in table.values() for m in ms}
_DIFFUSERS_GLOBAL = set(_BFL_GLOBAL.values())
_CLIP = re.compile(r"text_model_encoder_layers_(\d+)_(self_attn_[qkv]_proj|self_attn_out_proj|mlp_fc[12])")


def _flat(name: str) -> str:
    return name.replace(".", "_")


def _lycoris_targets(module: str) -> list[tuple[str, tuple[int, ...] | None, bool]] | None:
    """A LyCORIS module name (kohya's BFL names, LyCORIS' diffusers names, dotted or not) -> the diffusers modules it
    stands for ("<component>.<module>"), each with the row shares of a fused module and whether it is the final
    modulation (halves swapped); None if it names nothing FLUX.1 has."""
    for prefix in ("lora_te1_", "lora_te_", "lycoris_te1_", "lycoris_te_", "text_encoder.", "text_encoders.clip_l.transformer."):
        if module.startswith(prefix):
            m = _CLIP.fullmatch(_flat(module[len(prefix):]))
            if m is None:
                return None
            part = m.group(2).replace("self_attn_", "self_attn.").replace("mlp_", "mlp.")
            return [(f"text_encoder.text_model.encoder.layers.{m.group(1)}.{part}", None, False)]
    for prefix in ("lora_unet_", "lycoris_", "lora_transformer_", "model.diffusion_model.", "diffusion_model.",
                   "base_model.model.", "transformer."):
        if module.startswith(prefix):
            module = module[len(prefix):]
            break
    flat = _flat(module)
    if m := re.fullmatch(r"(double|single)_blocks_(\d+)_(.+)", flat):
        table = _BFL_DOUBLE if m.group(1) == "double" else _BFL_SINGLE
        block = "transformer_blocks" if m.group(1) == "double" else "single_transformer_blocks"
        found = next((v for b, v in table.items() if _flat(b) == m.group(3)), None)
        if found is None:
            return None
        names, shares = found
        return [(f"transformer.{block}.{m.group(2)}.{n}", shares, False) for n in names]
    if m := re.fullmatch(r"(single_transformer_blocks|transformer_blocks)_(\d+)_(.+)", flat):
        name = next((d for d in _DIFFUSERS_BLOCK if _flat(d) == m.group(3)), None)
        return [(f"transformer.{m.group(1)}.{m.group(2)}.{name}", None, False)] if name else None
    if bfl := next((b for b in _BFL_GLOBAL if _flat(b) == flat), None):
        return [(f"transformer.{_BFL_GLOBAL[bfl]}", None, bfl == "final_layer.adaLN_modulation.1")]
    name = next((d for d in _DIFFUSERS_GLOBAL if _flat(d) == flat), None)
    return [(f"transformer.{name}", None, False)] if name else None


def _lycoris(tensors: dict, shown: str, kind: str) -> dict[str, Delta]:
    """A LyCORIS file as one Delta per diffusers module, checked to be complete and consistent."""
    grouped: dict[str, dict[str, object]] = {}
    for name, value in tensors.items():
        suffix = _suffix(name)
        if suffix is None:
            raise _unreadable(shown, [name], f"looks like a LyCORIS file but {_short(name)!r} is no LoKr, LoHa or LoRA "
                              "tensor")
        grouped.setdefault(name[: -len(suffix) - 1], {})[suffix] = value
    deltas = {}
    for module, parts in grouped.items():
        if module.startswith("lora_te2_") or "t5xxl" in module:
            continue  # T5: logged by normalize()
        unsupported = [_LYCORIS_UNSUPPORTED[s] for s in parts if s in _LYCORIS_UNSUPPORTED]
        if unsupported:
            raise LoraError(f"{shown}: {_short(module)} uses {unsupported[0]}, which this loader does not apply to "
                            "FLUX's linear layers.")
        what = next((k for k, names in _LYCORIS.items() if any(s in parts for s in names)), None)
        if what is None:
            continue  # an alpha alone
        targets = _lycoris_targets(module)
        if targets is None:
            raise _unreadable(shown, [module], f"is a {kind} file for another model: {_short(module)!r} names no layer "
                              "FLUX.1 has")
        factors = {s.removesuffix(".weight"): v for s, v in parts.items() if s in _LYCORIS[what]}
        problem = Delta(what, factors, 1.0, module).problem()
        if problem:
            raise LoraError(f"{shown} is not a valid {kind} file: {_short(module)} {problem}.")
        rank = Delta(what, factors, 1.0, module).rank
        alpha = parts.get("alpha")
        alpha = float(alpha) if alpha is not None and float(alpha) != 0 else None
        if what == "lokr" and not any(f in factors for f in ("lokr_w1_a", "lokr_w2_a")):
            scale = 1.0  # both factors full: LyCORIS applies no alpha
        else:
            scale = alpha / rank if alpha is not None else 1.0
        out = Delta(what, factors, scale, module).product_shape[0]
        for index, (name, shares, swap) in enumerate(targets):
            rows = None
            if shares:
                if out % sum(shares):
                    raise LoraError(f"{shown}: {_short(module)} changes {out} rows, which do not split into "
                                    f"{', '.join(n.rsplit('.', 1)[-1] for n, _, _ in targets)} as FLUX.1's do.")
                unit = out // sum(shares)
                start = sum(shares[:index]) * unit
                rows = ((start, start + shares[index] * unit),)
            elif swap:
                if out % 2:
                    raise LoraError(f"{shown}: {_short(module)} changes {out} rows, an odd number for FLUX.1's final "
                                    "modulation (shift and scale).")
                rows = ((out // 2, out), (0, out // 2))
            deltas[name] = Delta(what, factors, scale, module, rows)
    if not deltas:
        raise _unreadable(shown, list(tensors), "looks like a LyCORIS file but holds no module to apply")
    return deltas
