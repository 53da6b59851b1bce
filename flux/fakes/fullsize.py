"""The full-size FLUX.1-dev architecture with random weights, built on the GPU with no download.

For the benchmark (`script/benchmark --random-weights`): the same modules, shapes and dtypes as the
published black-forest-labs/FLUX.1-dev, so speed and memory are the real ones; the images are noise.

Every model is constructed directly on the target device in the target dtype (never a float32 copy
on the CPU: the transformer alone has 11.9e9 parameters), then filled tensor by tensor from a seeded
generator on that device, which takes seconds on a GPU. On the meta device nothing is allocated and
nothing initialized: that is how the tests check the architecture on a CPU.

The tokenizers are flux/fakes/tiny.py's, trained offline; their vocabularies are much smaller than the models'
embeddings, so every id they produce is in range.
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch

from .. import memory, variants
from . import tiny

log = logging.getLogger(__name__)

# black-forest-labs/FLUX.1-dev transformer/config.json (FluxTransformer2DModel). axes_dims_rope is not in the
# published file: it is the class default the published weights were made for, written out here.
TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,
    out_channels=None,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=[16, 56, 56],
)

# black-forest-labs/FLUX.1-dev text_encoder/config.json: the text model of CLIP ViT-L/14. The published
# eos_token_id 2 makes CLIPTextModel pool at the highest id (its legacy path), as the real pipeline does.
TEXT_ENCODER = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    projection_dim=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    attention_dropout=0.0,
    initializer_range=0.02,
    initializer_factor=1.0,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)

# black-forest-labs/FLUX.1-dev text_encoder_2/config.json: the encoder of T5 v1.1 XXL (google/t5-v1_1-xxl).
# "gated-gelu" means a gated feed-forward with gelu_new; the decoder-only fields (num_decoder_layers, use_cache,
# is_encoder_decoder, tie_word_embeddings) are left out: T5EncoderModel has no decoder.
TEXT_ENCODER_2 = dict(
    vocab_size=32128,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    dropout_rate=0.1,
    layer_norm_epsilon=1e-6,
    initializer_factor=1.0,
    feed_forward_proj="gated-gelu",
    pad_token_id=0,
    eos_token_id=1,
)

# black-forest-labs/FLUX.1-dev vae/config.json (AutoencoderKL, 16 latent channels, 8x).
VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    act_fn="silu",
    latent_channels=16,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    latents_mean=None,
    latents_std=None,
    force_upcast=True,
    use_quant_conv=False,
    use_post_quant_conv=False,
    mid_block_add_attention=True,
)

# CompVis/stable-diffusion-safety-checker config.json: StableDiffusionSafetyChecker builds only the vision tower of
# this CLIPConfig (CLIP ViT-L/14) and its projection; the text config is left at transformers' defaults.
SAFETY_VISION = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_attention_heads=16,
    num_hidden_layers=24,
    patch_size=14,
    image_size=224,
    projection_dim=768,
)
SAFETY_PROJECTION_DIM = 768

# Falconsai/nsfw_image_detection config.json: ViTForImageClassification (ViT-B/16, 224) with labels normal, nsfw.
SAFETY_SECOND = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_attention_heads=12,
    num_hidden_layers=12,
    patch_size=16,
    image_size=224,
    qkv_bias=True,
    id2label={0: "normal", 1: "nsfw"},
    label2id={"normal": 0, "nsfw": 1},
)


def safety_checkers(dtype: torch.dtype = torch.bfloat16) -> list[torch.nn.Module]:
    """Both safety checkers at full size on the meta device, in the engine's dtype: for memory planning."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, ViTConfig, ViTForImageClassification

    with torch.device("meta"), building_in(dtype):
        return [StableDiffusionSafetyChecker(CLIPConfig(vision_config=SAFETY_VISION, projection_dim=SAFETY_PROJECTION_DIM)),
                ViTForImageClassification(ViTConfig(**SAFETY_SECOND))]


def _transformer():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(**TRANSFORMER)


def _text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER))


def _text_encoder_2():
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(**TEXT_ENCODER_2))


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE)


# The models of the pipeline, by their FluxPipeline name, in build order.
MODELS = {"transformer": _transformer, "text_encoder_2": _text_encoder_2, "text_encoder": _text_encoder, "vae": _vae}


@contextlib.contextmanager
def building_in(dtype: torch.dtype):
    """Modules constructed in this context get dtype (no float32 copy first, no cast)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@torch.no_grad()
def init_weights(module: torch.nn.Module, generator: torch.Generator, std: float = 0.02) -> None:
    """Random but sane weights, drawn in place on the module's device: biases 0, norm scales 1, the rest N(0, std).

    Every 1-D parameter not named bias is a norm's scale (LayerNorm, GroupNorm, RMSNorm, T5LayerNorm); every
    other tensor (Linear, Conv2d, Embedding, T5's relative attention bias) is drawn from the normal.
    """
    for name, param in module.named_parameters():
        if name.endswith("bias"):
            param.zero_()
        elif param.ndim == 1:
            param.fill_(1.0)
        else:
            param.normal_(0.0, std, generator=generator)


def build_model(name: str, device: str | torch.device, dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """One model of the pipeline (a key of MODELS), allocated on device in dtype and randomly initialized.

    Each model draws from its own generator seeded with seed, so its weights do not depend on what else is built.
    On the meta device it is left uninitialized.
    """
    device = torch.device(device)
    started = time.monotonic()
    with device, building_in(dtype):
        model = MODELS[name]()
    if device.type != "meta":
        init_weights(model, torch.Generator(device).manual_seed(seed))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    model.eval()  # as from_pretrained leaves it: T5's dropout off
    log.info("fullsize: %s (%s parameters) built on %s (%s) in %.2fs",
             name, f"{count_parameters(model):,}", device, dtype, time.monotonic() - started)
    return model


def count_parameters(module: torch.nn.Module) -> int:
    """Parameters of a module, shared ones (T5's tied embeddings) counted once; works on the meta device."""
    return sum(p.numel() for p in module.parameters())


def parameter_counts(pipe) -> dict[str, int]:
    """Parameters per model of a pipeline, by component name."""
    return {name: count_parameters(getattr(pipe, name)) for name in MODELS}


def build(device: str | torch.device, dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """The full-size FLUX.1-dev FluxPipeline with random weights on device (no download, no CPU copy)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    tokenizer, tokenizer_2 = tiny.clip_tokenizer(), tiny.t5_tokenizer()
    assert len(tokenizer) <= TEXT_ENCODER["vocab_size"] and len(tokenizer_2) <= TEXT_ENCODER_2["vocab_size"]
    models = {name: build_model(name, device, dtype, seed) for name in MODELS}
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**variants.BASE.scheduler), tokenizer=tokenizer, tokenizer_2=tokenizer_2, **models
    )


def plan_sizes(dtype: torch.dtype = torch.bfloat16):
    """What the memory plan needs of the full-size FLUX.1-dev (flux/memory.py: Sizes), counted on the meta device:
    no weights, no GPU. T5 is sized as streamed on a CUDA stream (its next block on the GPU too)."""
    models = {name: build_model(name, "meta", dtype) for name in MODELS}
    return memory.Sizes.of(models["transformer"], models["text_encoder"], models["text_encoder_2"], models["vae"],
                           safety_checkers(dtype), streams=True)
