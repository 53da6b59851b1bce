"""The full-size random FLUX.1-dev (flux/fakes/fullsize.py): architecture checked on the meta device, init on tiny modules."""

import pytest
import torch

from flux import variants
from flux.fakes import fullsize, tiny

# Parameter counts of the published black-forest-labs/FLUX.1-dev safetensors (T5's tied embedding counted once).
PUBLISHED_PARAMETERS = {
    "transformer": 11_901_408_320,
    "text_encoder_2": 4_762_310_656,  # T5 v1.1 XXL encoder
    "text_encoder": 123_060_480,  # CLIP ViT-L/14 text model
    "vae": 83_819_683,
}


@pytest.fixture(scope="module")
def pipe():
    """The whole pipeline on the meta device: the real modules, nothing allocated."""
    return fullsize.build("meta")


def test_parameter_counts(pipe):
    assert fullsize.parameter_counts(pipe) == PUBLISHED_PARAMETERS


def test_built_in_the_dtype_asked_for(pipe):
    for name in fullsize.MODELS:
        assert {(p.device.type, p.dtype) for p in getattr(pipe, name).parameters()} == {("meta", torch.bfloat16)}
    assert torch.get_default_dtype() == torch.float32  # the build's default dtype does not leak out


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.parametrize("name,config", [
    ("transformer", fullsize.TRANSFORMER), ("text_encoder", fullsize.TEXT_ENCODER),
    ("text_encoder_2", fullsize.TEXT_ENCODER_2), ("vae", fullsize.VAE), ("scheduler", variants.DEV_SCHEDULER),
])
def test_modules_report_the_published_config(pipe, name, config):
    reported = getattr(pipe, name).config
    reported = reported.to_dict() if hasattr(reported, "to_dict") else dict(reported)
    assert {key: _plain(reported[key]) for key in config} == config


def test_t5_is_gated_gelu(pipe):
    assert pipe.text_encoder_2.config.dense_act_fn == "gelu_new" and pipe.text_encoder_2.config.is_gated_act


def test_token_ids_fit_the_embeddings(pipe):
    prompt = "a photo of an astronaut riding a horse on the moon, with words the tokenizers never saw: zyxwv"
    for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        rows = encoder.get_input_embeddings().num_embeddings
        assert len(tokenizer) <= rows
        assert max(tokenizer(prompt).input_ids) < rows
    assert pipe.tokenizer.model_max_length == fullsize.TEXT_ENCODER["max_position_embeddings"]


@pytest.fixture(scope="module")
def tiny_modules():
    """Small real modules of every kind the full model has: Linear, Conv2d, Embedding, T5's relative attention
    bias, LayerNorm, GroupNorm, RMSNorm, T5LayerNorm."""
    built = tiny.build_pipeline()
    return torch.nn.ModuleList([built.transformer, built.text_encoder, built.text_encoder_2, built.vae]).bfloat16()


def _initialized(modules, seed):
    fullsize.init_weights(modules, torch.Generator().manual_seed(seed))
    return {name: p.detach().clone() for name, p in modules.named_parameters()}


def test_init_weights_is_seeded_and_sane(tiny_modules):
    first, again, other = (_initialized(tiny_modules, seed) for seed in (0, 0, 1))
    assert all(torch.equal(first[name], again[name]) for name in first)
    drawn = [name for name, p in first.items() if p.ndim > 1]
    assert any("relative_attention_bias" in name for name in drawn)
    assert all(not torch.equal(first[name], other[name]) for name in drawn)
    for name, p in first.items():
        assert torch.isfinite(p).all(), name
        if name.endswith("bias"):
            assert not p.any(), name
        elif p.ndim == 1:
            assert (p == 1).all(), name
    values = torch.cat([first[name].float().flatten() for name in drawn])
    assert values.mean().abs() < 1e-3 and abs(values.std() - 0.02) < 1e-3
