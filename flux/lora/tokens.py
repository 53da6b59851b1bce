"""The credentials LoRA hosts are asked with: a request's own tokens, else the container's (its settings). Never
logged, never in a message, a URL or a file name; each host (flux/lora/hosts.py) names the field it sends."""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass, field

from ..settings import LoraSettings, sendable_token
from . import LoraError

_PROCESS_KEY = os.urandom(32)


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
