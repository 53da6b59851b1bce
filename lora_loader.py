"""LoRA references in, validated and normalized LoRA weights out: the face of the LoRA package (flux/lora/).

    reference (str) --parse--> Ref --locate--> Source (cache key + how to fetch) --fetch--> .safetensors in the cache
                                                                                  --load--> LoraWeights (per-layer factors)

  flux/lora/hosts.py     the references (Replicate, Hugging Face, CivitAI, URLs, data: URIs), one class per host,
                         and the tokens each sends (flux/lora/tokens.py)
  flux/lora/sources.py   references fetched into the on-disk cache
  flux/lora/archives.py  a download unpacked to its one .safetensors, capped while reading
  flux/lora/formats.py   a file read as per-layer factors, checked before any weight changes; the layouts
                         (flux/lora/layouts.py: one class each) and their key maps (keymaps.py), PEFT's scaling
                         (scaling.py) and ΔW's maths (delta.py) in modules of their own
  flux/lora/fuse.py      ΔW fused into the serving weights in place, restored exactly; the fp8 copies kept in step

README, "LoRAs", lists what each reference form fetches and which layouts are read; flux/settings.py (`LoraSettings`)
the settings, read once.
"""

from flux.lora import LoraError
from flux.lora.archives import MAX_MEMBERS
from flux.lora.delta import Delta, LoraWeights
from flux.lora.formats import normalize
from flux.lora.layouts import layout
from flux.lora.fuse import Adapter, LoraManager
from flux.lora.hosts import CivitaiRef, DataRef, HuggingFaceRef, Ref, ReplicateRef, Source, UrlRef, parse
from flux.lora.sources import Fetched, LoraLoader
from flux.lora.tokens import Tokens
from flux.settings import LoraSettings

__all__ = ["Adapter", "CivitaiRef", "DataRef", "Delta", "Fetched", "HuggingFaceRef", "LoraError", "LoraLoader",
           "LoraManager", "LoraSettings", "LoraWeights", "MAX_MEMBERS", "Ref", "ReplicateRef", "Source", "Tokens",
           "UrlRef", "layout", "normalize", "parse"]
