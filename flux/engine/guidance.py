"""True classifier-free guidance for a pipeline diffusers gives none (FluxFillPipeline): each transformer call of the
pipeline becomes the two passes diffusers' Flux pipelines make with `true_cfg_scale`, the prompt's then the negative
prompt's, combined as they combine them: negative + scale * (positive - negative).

It is a diffusers hook (`diffusers.hooks.ModelHook`) on the transformer for the length of one pipeline call, added
inside a step cache's own wrapping so that the cache sees two passes per step and keeps them apart, as it does for
the pipelines with true CFG of their own; it is removed when the call ends, whatever happens."""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

HOOK = "flux_true_cfg"


def negative_embeds(embeds: dict) -> dict:
    """The negative prompt's embeddings taken out of a pipeline call's inputs, as the transformer's inputs."""
    return {"encoder_hidden_states": embeds.pop("negative_prompt_embeds"),
            "pooled_projections": embeds.pop("negative_pooled_prompt_embeds")}


def true_cfg(scale: float, negative: dict) -> Callable:
    """A wrapper of a pipeline call (given the transformer and the call) that runs it with true CFG."""
    from diffusers.hooks import HookRegistry, ModelHook

    class TrueCfg(ModelHook):
        def new_forward(self, module, *args, **kwargs):
            forward = self.fn_ref.original_forward  # diffusers' Flux pipelines call it with return_dict=False
            pos, neg = forward(*args, **kwargs)[0], forward(*args, **{**kwargs, **negative})[0]
            return (neg + scale * (pos - neg),)

    def run(transformer: torch.nn.Module, call: Callable):
        before = set(vars(transformer))  # what the hook registry adds is taken away after: the module as it was
        registry = HookRegistry.check_if_exists_or_initialize(transformer)
        registry.register_hook(TrueCfg(), HOOK)
        with contextlib.ExitStack() as stack:
            stack.callback(_restore, transformer, before)
            stack.callback(registry.remove_hook, HOOK, recurse=False)
            return call()

    return run


def _restore(module: torch.nn.Module, attributes: set[str]) -> None:
    """Remove the instance attributes the hook registry left (its registry, the forward it put back)."""
    for name in set(vars(module)) - attributes:
        delattr(module, name)
