"""Where a LoRA reference points: one class per host (`Ref`), each owning its pattern, its token and how it locates
the file (`Source`: the cache key and how to fetch it). `parse()` tries them in the order they are defined here
(the catch-all https URL after the hosts); `ACCEPTED`, the forms an error lists, derives from them. Adding a host:
one `Ref` subclass here (`pattern`, `accepted`, `token`, `from_match`, `locate`), plus its tests.

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
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, ClassVar
from urllib.parse import parse_qs, unquote_to_bytes, urlsplit

from .. import download as dl
from .. import netguard
from ..errors import UserError
from ..settings import LoraSettings
from . import PICKLE_SUFFIXES, SAFETENSORS, WHAT, LoraError, listing, pickle_message
from .tokens import Tokens


def limits(settings: LoraSettings) -> dl.Limits:
    # A server that goes silent is given up on within the total budget, not after minutes of per-read timeouts.
    return dl.Limits(max_bytes=settings.max_bytes, total_timeout=settings.timeout_s,
                     read_timeout=min(dl.Limits.read_timeout, settings.timeout_s))


def _headers(tokens: Tokens, name: str | None) -> dict[str, str]:
    """What authorizes a request to a host: the Tokens field `name` names, if the caller or the container has it."""
    token = getattr(tokens, name) if name else None
    return {"Authorization": f"Bearer {token}"} if token else {}


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
        return dl.download(self.url, folder / "download", what=WHAT, headers=_headers(tokens, self.token),
                           limits=limits(settings), auth_hint=self.auth_hint,
                           space_hint=" (or lower FLUX_LORA_CACHE_GB so the cache leaves room)")

    def check_access(self, tokens: Tokens, settings: LoraSettings) -> None:
        """Whether the host lets these tokens read the file (one request for its first byte): a DownloadError saying
        which token to pass if not. Hosts that gate a file often answer anyone about it (Hugging Face's metadata is
        public for a gated repo), so only asking for the file itself tells."""
        dl.probe(self.url, what=WHAT, headers=_headers(tokens, self.token), limits=limits(settings),
                 auth_hint=self.auth_hint)


class Ref:
    """A reference to one host's LoRA. A subclass that sets `pattern` is registered (in `HOSTS`, in the order of
    definition)."""

    pattern: ClassVar[re.Pattern]  # what a reference to this host looks like
    accepted: ClassVar[str]  # how ACCEPTED names the form
    token: ClassVar[str | None] = None  # the Tokens field sent to this host, if any
    shown: str  # safe to log
    pinned: bool  # True when the reference names one immutable file

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "pattern" in cls.__dict__:
            HOSTS.append(cls)

    @classmethod
    def from_match(cls, match: re.Match, text: str) -> "Ref":
        """The reference, from the pattern's match of the text."""
        raise NotImplementedError

    def locate(self, tokens: Tokens, settings: LoraSettings) -> Source:
        raise NotImplementedError


HOSTS: list[type[Ref]] = []


_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
_OWNER = r"[A-Za-z0-9][A-Za-z0-9_-]*"  # no dots: "host.name/x" is a URL without its scheme, not an owner


@dataclass(frozen=True)
class ReplicateRef(Ref):
    pattern = re.compile(
        rf"^(?:(?:https?://)?(?:www\.)?replicate\.com/)?(?P<owner>{_OWNER})/(?P<model>{_SEGMENT})"
        rf"(?:(?:/versions)?/(?P<version>[A-Za-z0-9]+)|:(?P<colon>[A-Za-z0-9]+))?/?$"
    )
    accepted = "a Replicate model (owner/model or owner/model/version)"
    token = "replicate"  # the container's own (REPLICATE_API_TOKEN), never a caller's

    owner: str
    model: str
    version: str | None = None

    @classmethod
    def from_match(cls, match: re.Match, text: str) -> "ReplicateRef":
        return cls(match.group("owner"), match.group("model"), match.group("version") or match.group("colon"))

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
            return Source(f"replicate:{self.shown}", url, self.token, hint)
        # Unversioned: where _weights redirects names the latest version's file; the key follows it.
        try:
            found = dl.probe(url, what=WHAT, headers=_headers(tokens, self.token), limits=limits(settings), auth_hint=hint)
        except dl.DownloadError as exc:
            raise _not_found(exc, f"Replicate model {self.shown} was not found or has no trained LoRA weights. "
                             "Check the owner/model[/version] reference.") from None
        key = f"replicate:{self.shown}@{dl.redact(found.url)}#{found.etag or _digest(found.url)}"
        return Source(key, found.url, self.token if dl.same_origin(found.url, url) else None, hint)


@dataclass(frozen=True)
class HuggingFaceRef(Ref):
    pattern = re.compile(r"^(?:https?://)?(?:www\.)?(?:huggingface\.co|hf\.co)/(?P<rest>[^?#]*)(?:[?#].*)?$")
    accepted = "a Hugging Face reference (huggingface.co/owner/repo[/file.safetensors])"
    token = "hf"

    repo: str
    revision: str = "main"
    path: str | None = None  # None: the repo's one .safetensors

    @classmethod
    def from_match(cls, match: re.Match, text: str) -> "HuggingFaceRef":
        parts = [p for p in match.group("rest").split("/") if p]
        if len(parts) < 2 or parts[0] in ("datasets", "spaces"):
            raise LoraError(f"{dl.redact(text)!r} is not a Hugging Face model reference: use huggingface.co/owner/repo "
                            "or huggingface.co/owner/repo/file.safetensors.")
        repo = "/".join(parts[:2])
        if len(parts) == 2:
            return cls(repo)
        if parts[2] in ("resolve", "blob") and len(parts) >= 5:
            return cls(repo, parts[3], "/".join(parts[4:]))
        if parts[2] == "tree" and len(parts) == 4:
            return cls(repo, parts[3])
        return cls(repo, "main", "/".join(parts[2:]))

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
        return Source(f"hf:{self.repo}@{revision}/{path}", url, self.token, hint)

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
    pattern = re.compile(r"^(?:https?://)?(?:www\.)?civitai\.com/(?P<rest>[^?#]*)(?:\?(?P<query>[^#]*))?(?:#.*)?$")
    accepted = "a CivitAI URL (civitai.com/models/<id>)"
    token = "civitai"

    model_id: str | None = None
    version_id: str | None = None

    @classmethod
    def from_match(cls, match: re.Match, text: str) -> "CivitaiRef":
        rest, query = match.group("rest").strip("/"), parse_qs(match.group("query") or "")
        if m := re.fullmatch(r"models/(\d+)(?:/.*)?", rest):
            version = (query.get("modelVersionId") or [None])[0]
            return cls(model_id=m.group(1), version_id=version if version and version.isdigit() else None)
        if m := re.fullmatch(r"api/download/models/(\d+)", rest):
            return cls(version_id=m.group(1))
        raise LoraError("CivitAI references look like civitai.com/models/<id>[/<name>] or "
                        "civitai.com/api/download/models/<version id>.")

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
        version = self.version_id or self._latest_version(_headers(tokens, self.token), hint, settings)
        url = f"{settings.civitai_url}/api/download/models/{version}?type=Model&format=SafeTensor"
        return Source(f"civitai:{version}", url, self.token, hint)

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
    """Any other http(s) URL: tried after the hosts, whose URLs it would match too."""

    pattern = re.compile(r"^https?://", re.IGNORECASE)
    accepted = "an https URL of a .safetensors file"

    url: str = field(repr=False)  # its query may hold a signature: never logged

    @classmethod
    def from_match(cls, match: re.Match, text: str) -> "UrlRef":
        return cls(text)

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
    pattern = re.compile(r"^data:")
    accepted = "a data: URI"

    uri: str = field(repr=False)

    @classmethod
    def from_match(cls, match: re.Match, text: str) -> "DataRef":
        return cls(text)

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


# What an unreadable reference's message lists: each host's form, in the order they are tried.
ACCEPTED = "Use " + ", ".join(host.accepted for host in HOSTS[:-1]) + f", or {HOSTS[-1].accepted}."


def parse(text: str) -> Ref:
    """The reference a user wrote, understood (the first host whose pattern matches it); a UserError names the
    accepted forms otherwise."""
    text = text.strip()
    for host in HOSTS:
        if match := host.pattern.match(text):
            return host.from_match(match, text)
    raise LoraError(f"Cannot read the LoRA reference {dl.shown(text)!r}. {ACCEPTED}")


def _digest(text: str) -> str:
    """What a key holds of a reference that may carry a secret (a signed query, a data: URI): its hash."""
    return hashlib.sha256(text.encode()).hexdigest()


def _not_found(exc: dl.DownloadError, message: str) -> UserError:
    """A 404 said the way the reference's kind says it; any other failure as the downloader worded it."""
    return LoraError(message) if exc.status == 404 else exc
