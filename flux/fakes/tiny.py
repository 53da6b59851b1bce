"""A tiny FLUX: the FLUX.1 architecture at toy width, random weights, built offline in about a second.

Every component of the real pipeline is here (FluxTransformer2DModel, CLIP-L and
T5 text encoders with their tokenizers, an 8x AutoencoderKL, the flow-matching
scheduler) plus a tiny CompVis safety checker, so every code path of the
predictor runs on any CPU with no download. The images are noise. Each FLUX variant
(flux/variants.py) has a tiny twin: the same architecture with its own seed, guidance
embedder and scheduler, so tests tell the variants apart.

The build is deterministic: the same code gives bit-identical weights, so
tests can compare images across processes.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch

from .. import variants
from ..variants import Variant

log = logging.getLogger(__name__)

# Bump when the architecture below changes, so stale builds on disk are rebuilt.
VERSION = "2"

_SENTENCES = [
    "a knitted purple prune on a wooden table",
    "a photo of an astronaut riding a horse on the moon",
    "a watercolor painting of a lighthouse at dawn, soft light",
    "portrait of a cat wearing sunglasses, studio lighting, 85mm",
    "an isometric city block at night with neon signs and rain",
    "the quick brown fox jumps over the lazy dog",
    "TOK style, a cozy cabin in the snowy mountains",
]
TEXT_DIM = 32
LATENT_CHANNELS = 4
CLIP_MAX_LENGTH = 77


def clip_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    bpe = Tokenizer(models.BPE(unk_token="<|endoftext|>", end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    bpe.train_from_iterator(_SENTENCES, trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]
    # The trainer breaks ties between equally frequent pairs in hash-map order, which changes from one process to
    # the next; put the trained merges and ids in a canonical order so every build is byte-identical. Ordering
    # merges by the length of what they make keeps a valid BPE (both parts of a merge are shorter, so come first).
    merges.sort(key=lambda m: (len(m[0]) + len(m[1]), m))
    specials = ["<|startoftext|>", "<|endoftext|>"]
    merged = [a + b for a, b in merges]
    rest = sorted(set(state["vocab"]) - set(specials) - set(merged))
    vocab = {token: i for i, token in enumerate(dict.fromkeys(specials + rest + merged))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH)


def t5_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5Tokenizer

    unigram = Tokenizer(models.Unigram())
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False
    )
    unigram.train_from_iterator(_SENTENCES, trainer)
    trained = [tuple(v) for v in json.loads(unigram.to_str())["model"]["vocab"]]
    # Scores differ in their last digits between processes (float sums in another order): round them and sort,
    # special tokens first, so every build is byte-identical.
    specials, pieces = trained[:3], trained[3:]
    vocab = specials + sorted(((p, round(score, 2)) for p, score in pieces), key=lambda v: (-v[1], v[0]))
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def _scheduler(variant: Variant):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**variant.scheduler)


def transformer_config(variant: Variant, latent_channels: int = LATENT_CHANNELS) -> dict:
    """The variant's tiny twin's FluxTransformer2DModel arguments: one architecture for every variant, a guidance
    embedder where the variant is guidance-distilled, the masked image's and the mask's input channels where it
    fills."""
    return dict(patch_size=1, in_channels=variant.in_channels(latent_channels * 4), out_channels=latent_channels * 4,
                num_layers=1, num_single_layers=2, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM,
                guidance_embeds=variant.guidance, axes_dims_rope=(4, 6, 6))


def _transformer(variant: Variant, latent_channels: int):
    """The variant's tiny twin: its own seed."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(variant.tiny_seed)
    return FluxTransformer2DModel(**transformer_config(variant, latent_channels))


def _vae(latent_channels: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(3)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def _text_encoders(clip_vocab: int, t5_vocab: int):
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(4)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=clip_vocab, hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=CLIP_MAX_LENGTH, projection_dim=TEXT_DIM,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    torch.manual_seed(5)
    t5 = T5EncoderModel(T5Config(
        vocab_size=t5_vocab, d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
        pad_token_id=0, eos_token_id=1,
    ))
    return clip, t5


def build_pipeline(variant: Variant = variants.BASE):
    """A variant's tiny FluxPipeline in memory (fp32, CPU): the shared components are the same for every variant."""
    from diffusers import FluxPipeline

    latent_channels = LATENT_CHANNELS
    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer()
    clip, t5 = _text_encoders(len(tokenizer), len(tokenizer_2))
    return FluxPipeline(
        scheduler=_scheduler(variant),
        vae=_vae(latent_channels),
        text_encoder=clip,
        tokenizer=tokenizer,
        text_encoder_2=t5,
        tokenizer_2=tokenizer_2,
        transformer=_transformer(variant, latent_channels),
    )


def build_safety_checker():
    """A tiny StableDiffusionSafetyChecker and its CLIP image processor."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    torch.manual_seed(6)
    config = CLIPConfig(
        text_config=dict(vocab_size=100, hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=1,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1,
                         num_attention_heads=2, max_position_embeddings=CLIP_MAX_LENGTH),
        vision_config=dict(hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=224, patch_size=32),
        projection_dim=TEXT_DIM,
    )
    checker = StableDiffusionSafetyChecker(config)
    processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    return checker, processor


def build_nsfw_classifier():
    """A tiny ViT image classifier with Falconsai/nsfw_image_detection's labels, and its image processor."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(7)
    config = ViTConfig(hidden_size=TEXT_DIM, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=64, patch_size=16, num_labels=2, id2label={0: "normal", 1: "nsfw"},
                       label2id={"normal": 0, "nsfw": 1})
    processor = ViTImageProcessor(size={"height": 64, "width": 64})
    return ViTForImageClassification(config), processor


def ensure_nsfw_classifier(dest: Path) -> Path:
    return _save_model_and_processor(dest, build_nsfw_classifier)


def _save_model_and_processor(dest: Path, build) -> Path:
    """A (model, image processor) pair from build(), saved at dest once."""
    def write(tmp: Path) -> None:
        model, processor = build()
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)

    return _save_atomically(dest, write)


def _save_atomically(dest: Path, write) -> Path:
    """Write into a temporary sibling, then rename: a crash never leaves a half-built folder."""
    marker = dest / ".tiny-version"
    if marker.is_file() and marker.read_text() == VERSION:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        write(tmp)
        (tmp / ".tiny-version").write_text(VERSION)
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def ensure_pipeline(dest: Path, variant: Variant = variants.BASE) -> Path:
    """A variant's tiny pipeline saved in diffusers format at dest (built once)."""
    return _save_atomically(dest, lambda tmp: build_pipeline(variant).save_pretrained(tmp, safe_serialization=True))


def ensure_single_file(dest: Path, variant: Variant) -> Path:
    """A variant's tiny transformer as one safetensors file in Black Forest Labs' key layout (flux/bfl.py), as the
    single-file checkpoints BFL and Replicate publish are (written once, atomically)."""
    from safetensors.torch import save_file

    from .. import bfl

    if not dest.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        state = bfl.from_diffusers(_transformer(variant, LATENT_CHANNELS).state_dict())
        tmp = dest.with_name(f".{dest.name}.tmp")
        save_file({k: v.contiguous() for k, v in state.items()}, tmp)
        tmp.rename(dest)
    return dest


def ensure_config(dest: Path, variant: Variant) -> Path:
    """The config folder of a variant's tiny twin (transformer/config.json, scheduler/scheduler_config.json), what a
    single file of it is read with (flux/singlefile.py), saved at dest once."""
    def write(tmp: Path) -> None:
        for sub, name, config in (("transformer", "config.json", {"_class_name": "FluxTransformer2DModel",
                                                                   **transformer_config(variant)}),
                                  ("scheduler", "scheduler_config.json", {"_class_name": "FlowMatchEulerDiscreteScheduler",
                                                                          **variant.scheduler})):
            (tmp / sub).mkdir()
            (tmp / sub / name).write_text(json.dumps(config, indent=2, sort_keys=True))

    return _save_atomically(dest, write)


def ensure_safety_checker(dest: Path) -> Path:
    return _save_model_and_processor(dest, build_safety_checker)
