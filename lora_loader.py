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
  URLs         any http(s) URL of a .safetensors file (signed URLs with a query string too) or of a .tar holding one.
  data: URIs   base64 of a .safetensors file or of a .tar holding one.

Every file lands, after safe extraction and a check that it is a safetensors file, in
an LRU cache under weights/loras/ (flux.cache.DiskCache) named by a hash of the
redacted reference. References that can change (an unversioned Replicate model, a
Hugging Face branch, a CivitAI model page) are resolved again at most every
FLUX_LORA_RECHECK_S seconds, so a new version is picked up; the others are cached
for good. Only safetensors are ever read: pickle files (.bin, .ckpt, .pt) are
refused, never passed to torch.load.

Formats: diffusers' FluxLoraLoaderMixin.lora_state_dict decides: it turns the
layouts in use (diffusers/PEFT, ai-toolkit, kohya/sd-scripts, XLabs, BFL-native as
ComfyUI writes it) into diffusers/PEFT keys, and this module checks that the
result is complete. It routes only what diffusers cannot do for FLUX.1: BFL names
with PEFT's lora_A/lora_B (BFL's own trainer, and fal's under `base_model.model.`,
whose diffusers converter is written for FLUX.1's full block counts) go to the
ComfyUI form diffusers converts at any size, and LyCORIS LoKr/LoHa files become
flux.lora.Delta factors per diffusers module (a fused BFL qkv/linear1 split by rows).

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
import hashlib
import hmac
import logging
import os
import re
import tarfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qs, unquote_to_bytes, urlsplit

from flux import download as dl
from flux import netguard
from flux.cache import DiskCache
from flux.errors import UserError
from flux.lora import LoraWeights
from flux.weights import extract_tar, weights_dir
from flux.weights import shown as shown_reference

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
        key = f"replicate:{self.shown}@{dl.redact(found.url)}#{found.etag or found.size}"
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
        return Source(f"url:{self.shown}", self.url, None, "If the file needs a login, use a signed URL.")


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

        return Source(f"data:{hashlib.sha256(self.uri.encode()).hexdigest()}", data=fetch)


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


class LoraLoader:
    """Fetches references into the on-disk cache (remembering where unversioned ones led) and loads them."""

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
            path = files.put(source.key, _as_safetensors(raw, folder, ref.shown))
        log.info("lora: %s fetched into the cache in %.2fs", ref.shown, time.monotonic() - started)
        return Fetched(source.key, ref.shown, path, cached=False)

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

    @staticmethod
    def load(fetched: Fetched) -> LoraWeights:
        started = time.monotonic()
        weights = normalize(fetched.path, fetched.key, fetched.shown)
        log.info(
            "lora: %s read (%s layout, %s, rank %d) in %.2fs", fetched.shown, weights.layout,
            ", ".join(f"{len(weights.modules(c)) + len(weights.deltas_of(c))} {c.replace('_', ' ')} modules"
                      for c in weights.components),
            weights.rank, time.monotonic() - started,
        )
        return weights


def _as_safetensors(raw: Path, folder: Path, shown: str) -> Path:
    """The one .safetensors file a download holds (itself, or the one in its .tar), checked to be one."""
    path = raw
    if tarfile.is_tarfile(raw):
        try:
            members = extract_tar(raw, folder / "unpacked", max_bytes=max_bytes())
        except UserError as exc:
            raise LoraError(f"{shown}: {exc}") from None
        raw.unlink()
        found = [m for m in members if m.name.endswith(SAFETENSORS)]
        names = [m.relative_to(folder / "unpacked").as_posix() for m in members]
        if not found:
            pickles = [n for n in names if n.lower().endswith(PICKLE_SUFFIXES)]
            raise LoraError(f"{shown}: the archive holds no .safetensors file (it holds: {_listing(names)})"
                            + (". Pickle files are never loaded." if pickles else "."))
        if len(found) > 1:
            raise LoraError(f"{shown}: the archive holds several .safetensors files "
                            f"({_listing([n for n in names if n.endswith(SAFETENSORS)])}); expected one LoRA.")
        path = found[0]
    _check_safetensors(path, shown)
    return path


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
    if head[:1] == b"\x80" or head[:4] == b"PK\x03\x04":
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
        return LoraError(f"{shown} {why} (its keys look like {', '.join(keys[:4])}). This loader reads FLUX LoRAs "
                         f"in these layouts: {FORMATS}.")
    return LoraError(
        f"{shown} is not a FLUX LoRA in any layout this loader reads ({FORMATS}): its keys look like "
        f"{', '.join(keys[:4])}. Use a LoRA trained for FLUX.1-dev, as a .safetensors file in one of these layouts."
    )


def normalize(path: Path, key: str, shown: str) -> LoraWeights:
    """A safetensors LoRA file as diffusers/PEFT keys per component, refused with a clear message if it cannot be."""
    from diffusers import FluxPipeline
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, "pt") as f:
        keys, file_metadata = list(f.keys()), f.metadata()
    kind = layout(keys, file_metadata)
    if kind == "bfl-control":
        raise LoraError(f"{shown} is a FLUX Control LoRA (Canny/Depth): it needs a control image, which this model "
                        "does not take.")
    dropped = [k for k in keys if "t5xxl" in k or k.startswith("lora_te2_")]
    if dropped:
        log.warning("lora: %s carries T5 text-encoder weights (%d tensors); diffusers' FLUX loader has no T5 LoRA "
                    "support, so they are not applied", shown, len(dropped))
    if kind in ("lokr", "loha", "lycoris"):
        return _lycoris(load_file(path), key, shown, kind)
    try:
        if kind in ("bfl", "bfl-peft", "fal") and not any(k.startswith("diffusion_model.") and ".lora_down." in k
                                                          for k in keys):
            source = _bfl_to_comfy(load_file(path))
            state_dict, alphas, metadata = FluxPipeline.lora_state_dict(source, return_alphas=True,
                                                                        return_lora_metadata=True)
        else:
            state_dict, alphas, metadata = FluxPipeline.lora_state_dict(
                str(path), use_safetensors=True, return_alphas=True, return_lora_metadata=True)
    except MemoryError:
        raise
    except Exception as exc:  # diffusers' converters fail with whatever the keys trip: the user gets the keys
        what = f"a {kind} LoRA" if kind != "unknown" else "a LoRA"
        raise LoraError(
            f"{shown} looks like {what} but its keys do not fit FLUX.1 (e.g. {', '.join(keys[:4])}): it was made for "
            f"a different model, or is damaged ({type(exc).__name__}). This loader reads FLUX LoRAs in these "
            f"layouts: {FORMATS}."
        ) from None
    state_dict = {("transformer." + k if k.startswith(_TRANSFORMER_ROOTS) else k): v for k, v in state_dict.items()}
    parts = {}
    for component in ("transformer", "text_encoder"):
        part = {k[len(component) + 1:]: v for k, v in state_dict.items() if k.startswith(component + ".")}
        if part and not any(".lora_A." in k for k in part):
            part = (convert_unet_state_dict_to_peft(part) if component == "transformer"
                    else convert_state_dict_to_peft(convert_state_dict_to_diffusers(part)))
        parts |= {f"{component}.{k}": v for k, v in part.items()}
    leftover = [k for k in state_dict if not k.startswith(("transformer.", "text_encoder."))]
    if leftover or not parts:
        raise _unreadable(shown, leftover or keys)
    alphas = {k: float(v) for k, v in (alphas or {}).items()}
    return LoraWeights(key=key, shown=shown, layout=kind, state_dict=parts, network_alphas=alphas or None,
                       metadata=metadata or None)


# ----- LyCORIS: LoKr and LoHa ----------------------------------------------------------------------------------------

# The tensors of one module per kind (LyCORIS' names); "lora" is a plain LoRA pair, which LyCORIS files mix in.
_LYCORIS = {
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
    "lora": ("lora_down.weight", "lora_up.weight"),
}
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


def _lycoris(tensors: dict, key: str, shown: str, kind: str) -> LoraWeights:
    """A LyCORIS file as one Delta per diffusers module, checked to be complete and consistent."""
    from flux.lora import Delta

    grouped: dict[str, dict[str, object]] = {}
    for name, value in tensors.items():
        suffix = _suffix(name)
        if suffix is None:
            raise _unreadable(shown, [name], f"looks like a LyCORIS file but {name!r} is no LoKr, LoHa or LoRA tensor")
        grouped.setdefault(name[: -len(suffix) - 1], {})[suffix] = value
    deltas = {}
    for module, parts in grouped.items():
        if module.startswith("lora_te2_") or "t5xxl" in module:
            continue  # T5: logged by normalize()
        unsupported = [_LYCORIS_UNSUPPORTED[s] for s in parts if s in _LYCORIS_UNSUPPORTED]
        if unsupported:
            raise LoraError(f"{shown}: {module} uses {unsupported[0]}, which this loader does not apply to FLUX's "
                            "linear layers.")
        what = next((k for k, names in _LYCORIS.items() if any(s in parts for s in names)), None)
        if what is None:
            continue  # an alpha alone
        targets = _lycoris_targets(module)
        if targets is None:
            raise _unreadable(shown, [module], f"is a {kind} file for another model: {module!r} names no layer FLUX.1 has")
        factors = {s.removesuffix(".weight"): v for s, v in parts.items() if s in _LYCORIS[what]}
        problem = _factors_problem(what, factors)
        if problem:
            raise LoraError(f"{shown} is not a valid {kind} file: {module} {problem}.")
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
                    raise LoraError(f"{shown}: {module} changes {out} rows, which do not split into "
                                    f"{', '.join(n.rsplit('.', 1)[-1] for n, _, _ in targets)} as FLUX.1's do.")
                unit = out // sum(shares)
                start = sum(shares[:index]) * unit
                rows = ((start, start + shares[index] * unit),)
            elif swap:
                if out % 2:
                    raise LoraError(f"{shown}: {module} changes {out} rows, an odd number for FLUX.1's final "
                                    "modulation (shift and scale).")
                rows = ((out // 2, out), (0, out // 2))
            deltas[name] = Delta(what, factors, scale, module, rows)
    if not deltas:
        raise _unreadable(shown, list(tensors), "looks like a LyCORIS file but holds no module to apply")
    return LoraWeights(key=key, shown=shown, layout=kind, state_dict={}, deltas=deltas)


def _factors_problem(what: str, f: dict) -> str | None:
    """Why a module's factors cannot multiply out (None when they can)."""
    if any(v.ndim != 2 for v in f.values()):
        return "has factors that are not matrices (" + ", ".join(f"{k} {tuple(v.shape)}" for k, v in f.items()) + ")"
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in f.items())
    if what == "lokr":
        for w in ("lokr_w1", "lokr_w2"):
            if w in f:
                continue
            if f.get(w + "_a") is None or f.get(w + "_b") is None:
                return f"lacks {w} (or {w}_a and {w}_b)"
            if f[w + "_a"].shape[1] != f[w + "_b"].shape[0]:
                return f"has LoKr factors that do not multiply ({shapes})"
        return None
    if what == "loha":
        missing = [n for n in _LYCORIS["loha"] if n not in f]
        if missing:
            return f"lacks {', '.join(missing)}"
        a1, b1, a2, b2 = (f[n] for n in _LYCORIS["loha"])
        if a1.shape[1] != b1.shape[0] or a2.shape[1] != b2.shape[0] or a1.shape[0] != a2.shape[0] or b1.shape[1] != b2.shape[1]:
            return f"has LoHa factors that do not multiply out to one shape ({shapes})"
        return None
    if "lora_down" not in f or "lora_up" not in f:
        return "lacks lora_down or lora_up"
    if f["lora_up"].shape[1] != f["lora_down"].shape[0]:
        return f"has a lora_down/lora_up pair that does not multiply ({shapes})"
    return None
