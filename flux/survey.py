"""What a weights source holds and what a boot would fetch of it, learned without downloading the data: a .tar's
member headers by ranged reads, a Hugging Face repo's file list, a folder's files, a single-file checkpoint's header
(script/weights-check). The same forms and layouts as flux/weights.py, which loads them."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from . import download as dl
from . import netguard, progress, singlefile, tarstream, weights
from .errors import UserError


@dataclass(frozen=True)
class Survey:
    """What a source holds and what a boot would fetch of it, learned without downloading (script/weights-check)."""

    source: str
    kind: str
    form: str  # "tiny", "url", "hub", "folder", "file", "file-url" or "invalid"
    files: dict[str, int] = field(default_factory=dict)  # every file, by its path in the layout, and its bytes
    fetched: dict[str, int] = field(default_factory=dict)  # what a boot fetches of them (a folder: nothing)
    missing: list[str] = field(default_factory=list)  # what the layout needs and the source lacks
    problem: str | None = None  # why it cannot be used (or checked), in the words a boot's error would use
    holds_what: str | None = None  # what it holds, where that is not a layout of folders (a single file)

    @property
    def holds(self) -> bool:
        return self.problem is None and not self.missing


def survey(source: str, kind: str, endpoint: str | None = None) -> Survey:
    """What `source` holds for `kind` and what would be fetched: a .tar's member headers by ranged reads, a Hugging
    Face repo's file list, a folder's files, a single file's header; no data is downloaded. Never raises for a source that does not hold."""
    form, _ = weights.form_of(source, kind)
    try:
        if form == "tiny":
            return Survey(source, kind, form)
        if form == "url":
            found, picked = tarstream.list_url(source, max_bytes=weights.MAX_TAR_BYTES, what=weights.what_of(kind), limits=weights.TAR_LIMITS,
                                               wanted=weights.PATTERNS[kind])
            if picked is None:
                return Survey(source, kind, form, problem=(
                    f"{dl.shown(source)} does not take byte ranges: its members cannot be listed without downloading "
                    f"all of it ({progress.human_bytes(found.size or 0)}), which a boot would do"))
            files = {picked.relative(m): m.size for m in picked.members if m.isfile()}
            fetched = {picked.relative(m): m.size for m in picked.chosen}
        elif form == "hub":
            files, fetched = _hub_files(source, kind, endpoint)
        elif form == "folder":
            path = Path(source).expanduser()
            if not path.is_dir():
                raise weights.WeightsError(f"{weights.what_of(kind)}: the folder {path} does not exist.")
            files = {p.relative_to(path).as_posix(): p.stat().st_size for p in path.rglob("*") if p.is_file()}
            fetched = {}
        elif form in (singlefile.FILE, singlefile.URL):
            return _single_file(source, kind, form)
        else:
            raise weights.unknown_form(source, kind)
    except UserError as exc:
        return Survey(source, kind, form, problem=str(exc))
    present = fetched if form != "folder" else files
    missing = [n for n in weights.LAYOUT[kind] if n not in present and not any(f.startswith(n + "/") for f in present)]
    return Survey(source, kind, form, files, fetched, missing)


def _single_file(source: str, kind: str, form: str) -> Survey:
    """A single-file checkpoint: its size and what its header says, read with ranged reads of the header only."""
    size, arch = singlefile.survey(source, kind, weights.what_of(kind), weights.TAR_LIMITS)
    files = {Path(dl.redact(source)).name: size}
    blocks = f"{arch['double blocks']} double and {arch['single blocks']} single blocks, width {arch['width']}"
    return Survey(source, kind, form, files, {} if form == singlefile.FILE else files, holds_what=(
        f"one transformer checkpoint in BFL's layout ({blocks}, {arch['input channels']} input channels, "
        f"{'a' if arch['guidance embedder'] else 'no'} guidance embedder)"))


def _hub_files(repo_id: str, kind: str, endpoint: str | None) -> tuple[dict[str, int], dict[str, int]]:
    """A repo's files and sizes, and those snapshot_download would fetch (weights.PATTERNS); a gated repo with no token is a
    weights.WeightsError saying so."""
    import fnmatch

    import httpx
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError
    from huggingface_hub.hf_api import RepoFile

    token = os.environ.get("HF_TOKEN") or None
    netguard.install_for_huggingface_hub()
    api = HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT") or None, token=token or False)
    gated = weights.WeightsError(f"{repo_id} is gated: a boot needs HF_TOKEN, a token of an account that accepted its "
                         "licence" + (" (HF_TOKEN is not set)." if not token else "."))
    try:
        if api.model_info(repo_id).gated and not token:
            raise gated
        files = {f.path: f.size for f in api.list_repo_tree(repo_id, recursive=True) if isinstance(f, RepoFile)}
    except GatedRepoError:
        raise gated from None
    except RepositoryNotFoundError:
        raise weights.WeightsError(f"{repo_id} was not found on Hugging Face (or is private or gated and HF_TOKEN cannot "
                           "read it).") from None
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", "?")
        raise weights.WeightsError(f"Hugging Face answered HTTP {status} for {repo_id}.") from None
    except (OSError, httpx.TransportError) as exc:
        raise weights.WeightsError(f"Could not reach Hugging Face for {repo_id} ({type(exc).__name__}).") from None
    patterns = weights.PATTERNS[kind]
    return files, {f: n for f, n in files.items() if patterns is None or any(fnmatch.fnmatch(f, p) for p in patterns)}
