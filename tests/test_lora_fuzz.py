"""Generated LoRA files through the real loader and fuser on the tiny predictor's engine (hypothesis).

Each example is a file a careless or hostile caller could send, as a data: URI: PEFT, diffusers (with adapter
metadata), kohya and LyCORIS LoKr keys, for layers the tiny FLUX has or does not have, of any rank (0 included),
shape, dtype and values (NaN, infinity, huge, integers), with adapter metadata of any fields and values (or text
that is no JSON), bare or in a .tar, .tar.gz or .zip. It goes through engine.generate (fetch, read, check, fuse, one
denoising step). Each example either succeeds or fails with a UserError whose message names no library exception;
after a failure the shared state's fingerprint (modules, weights, the LoRA cache's files) is what it was before, and
after a success, once the LoRA is dropped again, the modules and weights are. Bounded: max_examples and a deadline
keep it well under a minute on this 2-core CPU.
"""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flux.errors import UserError
from flux.request import Request
from tests.helpers import hostile, state
from tests.helpers.images import data_uri
from tests.helpers.loras import safetensors_bytes, tar_of

# (layout, module as the file names it, (out, in) of the layer it stands for in the tiny FLUX)
MODULES = [
    ("peft", "transformer.transformer_blocks.0.attn.to_q", (32, 32)),
    ("peft", "transformer.transformer_blocks.0.ff.net.0.proj", (128, 32)),
    ("peft", "transformer.single_transformer_blocks.0.proj_out", (32, 160)),
    ("peft", "transformer.time_text_embed.guidance_embedder.linear_1", (32, 256)),
    ("peft", "text_encoder.text_model.encoder.layers.0.self_attn.q_proj", (32, 32)),
    ("peft", "transformer.no_such_block.to_q", (32, 32)),
    ("kohya", "lora_unet_double_blocks_0_img_attn_proj", (32, 32)),
    ("kohya", "lora_unet_double_blocks_0_img_mlp_0", (128, 32)),
    ("kohya", "lora_te1_text_model_encoder_layers_0_mlp_fc1", (64, 32)),
    ("lokr", "lycoris_transformer_blocks_0_attn_to_k", (32, 32)),
    ("lokr", "lora_unet_single_blocks_0_linear2", (32, 160)),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.bool]
SPECIAL = [float("nan"), float("inf"), float("-inf"), 1e30, -1e38, 1e-40, 0.0]
JSON_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 40), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8), st.lists(st.sampled_from(["to_q", "norm_out", "proj_out", ".*"]), max_size=3),
    st.dictionaries(st.sampled_from(["to_q", "transformer_blocks.0.attn.to_q", "to_.*", "[("]),
                    st.one_of(st.integers(-2, 9), st.floats(allow_nan=True, allow_infinity=True)), max_size=2),
)
FIELDS = ["r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora", "modules_to_save",
          "target_modules", "layer_replication", "lora_bias", "init_lora_weights", "not_a_field"]


def _matrix(draw, shape: tuple[int, int], wild: bool) -> torch.Tensor:
    """A factor of this shape, or (wild) of another shape, dtype, size or with a NaN, an infinity, ..."""
    if wild and draw(st.integers(0, 5)) == 0:
        shape = (draw(st.integers(0, 6)), draw(st.integers(0, 6)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    value = torch.randn(*shape, generator=gen) * (draw(st.sampled_from([0.05, 1.0, 1e6, 1e19])) if wild else 0.05)
    if wild and value.numel() and draw(st.integers(0, 4)) == 0:
        value.view(-1)[draw(st.integers(0, value.numel() - 1))] = draw(st.sampled_from(SPECIAL))
    dtype = draw(st.sampled_from(DTYPES)) if wild and draw(st.integers(0, 5)) == 0 else torch.float32
    return value.to(dtype)


def _alpha(draw, wild: bool) -> torch.Tensor:
    if not wild:
        return torch.tensor(float(draw(st.sampled_from([1, 2, 4, 8, 16]))))
    value = draw(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-4, 64)))
    shape = draw(st.sampled_from([(), (1,), (2,)]))
    if isinstance(value, float):  # through float64: a value beyond float32 becomes an infinity, as a file holds it
        return torch.full(shape, value, dtype=torch.float64).to(torch.float32)
    return torch.full(shape, value, dtype=torch.int64)


@st.composite
def lora_files(draw) -> bytes:
    """Half the files are sound (for layers the tiny FLUX may lack, with metadata that may not fit), half wild."""
    wild = draw(st.booleans())
    tensors: dict[str, torch.Tensor] = {}
    rank = draw(st.integers(0 if wild else 1, 4))
    modules = draw(st.lists(st.sampled_from(MODULES), min_size=1, max_size=3, unique=True))
    for layout, module, (out, inner) in modules:
        rank = draw(st.integers(0, 4)) if wild else rank
        if layout == "peft":
            tensors[f"{module}.lora_A.weight"] = _matrix(draw, (rank, inner), wild)
            tensors[f"{module}.lora_B.weight"] = _matrix(draw, (out, rank), wild)
        elif layout == "kohya":
            tensors[f"{module}.lora_down.weight"] = _matrix(draw, (rank, inner), wild)
            tensors[f"{module}.lora_up.weight"] = _matrix(draw, (out, rank), wild)
        else:
            tensors[f"{module}.lokr_w1"] = _matrix(draw, (4, 4), wild)
            tensors[f"{module}.lokr_w2_a"] = _matrix(draw, (out // 4, rank), wild)
            tensors[f"{module}.lokr_w2_b"] = _matrix(draw, (rank, inner // 4), wild)
        if layout != "peft" or draw(st.booleans()):
            if draw(st.integers(0, 3)):
                tensors[f"{module}.alpha"] = _alpha(draw, wild)
    if wild and draw(st.integers(0, 3)) == 0:
        tensors[draw(st.text(min_size=1, max_size=30))] = _matrix(draw, (2, 2), wild)
    header = None
    kind = draw(st.sampled_from(["none", "fields", "fields", "text"] if wild else ["none", "none", "sound"]))
    if kind == "sound":  # diffusers' own metadata for these weights, and fields that are not read
        fields = {"r": rank, "lora_alpha": draw(st.sampled_from([1, 2.0, 8])), **draw(st.dictionaries(
            st.sampled_from(["modules_to_save", "target_modules", "layer_replication", "not_a_field"]), JSON_VALUES,
            max_size=2))}
        header = {"lora_adapter_metadata": json.dumps({f"{c}.{k}": v for c in ("transformer", "text_encoder")
                                                       for k, v in fields.items()})}
    elif kind == "fields":  # any of the fields PEFT acts on, at any value
        fields = draw(st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=4))
        header = {"lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in fields.items()})}
    elif kind == "text":  # metadata that is not a JSON object
        header = {"lora_adapter_metadata": draw(st.sampled_from(["{not json", "[1, 2]", "null", "7", '"r"']))}
    try:
        body = safetensors_bytes(tensors, header)
    except Exception:  # a name safetensors itself will not write: the simplest file instead
        body = safetensors_bytes({k: v for k, v in tensors.items() if k.isascii() and k.isprintable()}, header)
    return _packed(draw, body)


def _packed(draw, body: bytes) -> bytes:
    how = draw(st.sampled_from(["bare", "bare", "bare", "tar", "tar.gz", "zip"]))
    if how == "bare":
        return body
    extra = {f"notes/{i}.txt": b"x" for i in range(draw(st.integers(0, 3)))}
    if how == "zip":
        return hostile.zip_of({**extra, "lora.safetensors": body})
    return tar_of({**extra, "out/lora.safetensors": body}, "w:gz" if how == "tar.gz" else "w")


def request(**inputs) -> Request:
    return Request.build(prompt="a knitted purple prune", aspect_ratio="custom", width=256, height=256,
                         num_inference_steps=1, seed=3, disable_safety_checker=True, **inputs)


@pytest.fixture(scope="module")
def at_rest(engine, weights_dir):
    engine.use_loras(request())
    return state.fingerprint(engine)


def test_generated_loras_succeed_or_fail_in_our_words_and_leave_nothing_behind(engine, weights_dir, at_rest):
    cache_dir = weights_dir / "loras"
    outcomes = {"succeeded": 0, "refused": 0}

    @given(body=lora_files(), scale=st.sampled_from([1.0, -1.0, 0.35, 3.0]))
    @settings(max_examples=120, deadline=timedelta(seconds=20), derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def check(body, scale):
        before = state.fingerprint(engine, cache_dir)
        try:
            result = engine.generate(request(replicate_weights=data_uri(body, "application/octet-stream"),
                                             lora_scale=scale))
        except UserError as exc:
            assert not hostile.library_words(str(exc)), str(exc)
            assert not state.diff(before, state.fingerprint(engine, cache_dir))
            outcomes["refused"] += 1
            return
        assert result.images
        outcomes["succeeded"] += 1
        engine.use_loras(request())
        assert not state.diff(at_rest, state.fingerprint(engine))

    check()
    assert outcomes["succeeded"] and outcomes["refused"], outcomes
