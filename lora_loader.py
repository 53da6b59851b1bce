"""LoRA references in, validated and normalized LoRA weights out: the face of the LoRA package (flux/lora/).

    reference (str) --parse--> Ref --locate--> Source (cache key + how to fetch) --fetch--> .safetensors in the cache
                                                                                  --load--> LoraWeights (per-layer factors)

  flux/lora/sources.py   the references (Replicate, Hugging Face, CivitAI, URLs, data: URIs), the hosts, the cache
  flux/lora/archives.py  a download unpacked to its one .safetensors, capped while reading
  flux/lora/formats.py   every layout read as per-layer factors, checked before any weight changes
  flux/lora/fuse.py      ΔW fused into the serving weights in place, restored exactly; the fp8 copies kept in step

README, "LoRAs", lists what each reference form fetches and which layouts are read; flux/settings.py (`LoraSettings`)
the settings, read once.
"""

from flux.lora import LoraError
from flux.lora.archives import MAX_MEMBERS
from flux.lora.formats import Delta, LoraWeights, layout, normalize
from flux.lora.fuse import Adapter, LoraManager
from flux.lora.sources import (CivitaiRef, DataRef, Fetched, HuggingFaceRef, LoraLoader, Ref, ReplicateRef, Source,
                               Tokens, UrlRef, parse)
from flux.settings import LoraSettings

__all__ = ["Adapter", "CivitaiRef", "DataRef", "Delta", "Fetched", "HuggingFaceRef", "LoraError", "LoraLoader",
           "LoraManager", "LoraSettings", "LoraWeights", "MAX_MEMBERS", "Ref", "ReplicateRef", "Source", "Tokens",
           "UrlRef", "layout", "normalize", "parse"]
