"""The engine's decode step (fused projections, fewer operations) computes what the model's
own layers compute: layers fused into one matmul give their outputs side by side, and
every model family the engine drives decodes the greedy tokens of transformers' generate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from engine_helpers import FAMILIES, tiny_model
from gguf import GGMLQuantizationType, quants
from torch.utils.flop_counter import FlopCounterMode
from transformers.modeling_gguf_pytorch_utils import TensorProcessor, get_gguf_hf_weights_map

from rag.service.engine import kernels
from rag.service.engine.engine import Engine, Sequence
from rag.service.engine.forward import rms_norm
from rag.service.engine.fused import fuse
from rag.service.engine.int4 import READERS, Int4Linear, gguf_names
from rag.service.engine.packed import PackedLinear, can_pack
from rag.service.engine.runner import SlotModel


def q4_layer(
    out_features: int, seed: int, kind=GGMLQuantizationType.Q4_1, dtype=torch.float32
) -> Int4Linear:
    weights = np.random.default_rng(seed).standard_normal((out_features, 128))
    raw = quants.quantize(weights.astype(np.float32), kind)
    dense = torch.nn.Linear(128, out_features, bias=False)
    dense.weight.data = torch.from_numpy(quants.dequantize(raw, kind)) + 1.0  # tell them apart
    return Int4Linear.from_blocks(dense.to(dtype), READERS[kind](raw), max_rows=4)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_gguf_names_map_the_tensors_as_transformers_does(family):
    model = tiny_model(family)
    try:
        expected = get_gguf_hf_weights_map(model, TensorProcessor())
    except NotImplementedError:  # an architecture gguf does not know: refused alike
        with pytest.raises(NotImplementedError):
            gguf_names(model)
        return
    assert gguf_names(model) == expected


@pytest.mark.parametrize("kind", [GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_4_bit_layers_give_each_layers_output_side_by_side(kind, dtype):
    """In float32 with torch's kernel (blocks of 64 rows), in bf16 with the engine's where
    it runs (blocks of 16)."""
    paired = dtype == torch.bfloat16 and kernels.INT4_LINEAR
    sizes = (64, 128, 48 if paired else 64)
    layers = [q4_layer(n, seed, kind, dtype) for seed, n in enumerate(sizes)]
    few, many = torch.randn(3, 128).to(dtype), torch.randn(6, 128).to(dtype)
    alone = [(layer(few), layer(many)) for layer in layers]
    fused = fuse(layers)
    assert isinstance(fused, Int4Linear) and fused.paired == paired
    assert torch.equal(fused(few), torch.cat([a for a, _ in alone], dim=-1))
    torch.testing.assert_close(fused(many), torch.cat([b for _, b in alone], dim=-1))
    for layer, (a, b) in zip(layers, alone, strict=True):  # the layers now read views
        assert torch.equal(layer(few), a) and torch.equal(layer(many), b)


def test_layers_that_cannot_be_packed_together_are_fused_dense():
    """Packed rows come in blocks (torch's 64); 4-bit layers of other sizes, or mixed with
    a dense one, are fused from their dense weights."""
    odd = [q4_layer(n, seed) for seed, n in enumerate((64, 96))]
    plain = torch.nn.Linear(128, 32)
    mixed = [q4_layer(64, 2), plain]
    x = torch.randn(2, 128)
    for layers in (odd, mixed):
        dense = [layer.dense if isinstance(layer, Int4Linear) else layer for layer in layers]
        expected = torch.cat([layer(x) for layer in dense], dim=-1)
        fused = fuse(layers)
        assert type(fused) is torch.nn.Linear
        torch.testing.assert_close(fused(x), expected)
    assert plain.weight.untyped_storage().data_ptr() == fused.weight.untyped_storage().data_ptr()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_decodes_generates_greedy_tokens(family):
    model = tiny_model(family)
    engine = Engine(SlotModel(model, slots=3, positions=64), eos_token_id=2)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 300, size=n).tolist() for n in (1, 5, 17, 30)]
    expected = []
    for prompt in prompts:
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=2,
            pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        )  # fmt: skip
        expected.append(out[0, len(prompt) :].tolist())
    answers = engine.generate([Sequence(p, max_new_tokens=10) for p in prompts])
    assert [a.tokens for a in answers] == expected


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_steps_to_the_logits_of_its_own_forward(family):
    """Packed prompts, a prompt prefilled in the same pass as two decoded rows, then rows at
    different positions: each token gets the logits of the model's own forward over its
    whole sequence."""
    model = tiny_model(family)
    slots = SlotModel(model, slots=3, positions=64)
    rng = np.random.default_rng(2)
    a, b, c = (rng.integers(3, 300, size=n).tolist() for n in (4, 19, 9))

    def last_logits(*sequences: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            return torch.stack([model(torch.tensor([s])).logits[0, -1] for s in sequences])

    slots.prefill([(0, a[:-1], 0), (1, b[:-1], 0)])
    mixed = slots.step([(2, c, 0)], [a[-1], b[-1]], [len(a) - 1, len(b) - 1])
    torch.testing.assert_close(mixed, last_logits(c, a, b), rtol=1e-4, atol=1e-4)
    decoded = slots.decode([7, 8, 9], [len(a), len(b), len(c)])
    expected = last_logits([*a, 7], [*b, 8], [*c, 9])
    torch.testing.assert_close(decoded, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(
    not can_pack(torch.ones(1, dtype=torch.bfloat16)), reason="no bf16 in this CPU's oneDNN"
)
def test_bf16_layers_packed_for_onednn_compute_what_they_computed():
    """Every linear layer of a bf16 model gives its output from packed weights once the
    engine is built, the layers fused into one included, and so does the model's own
    forward."""
    model = tiny_model("qwen2").to(torch.bfloat16)  # q, k and v biased
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    inputs = {n: torch.randn(5, m.in_features, dtype=torch.bfloat16) for n, m in linears.items()}
    tokens = torch.tensor([[5, 17, 42, 7]])
    with torch.inference_mode():
        before = {n: m(inputs[n]) for n, m in linears.items()}
        logits = model(tokens).logits
    SlotModel(model, slots=2, positions=32)
    attention = model.model.layers[0].self_attn
    assert isinstance(attention.qkv_proj, PackedLinear)
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    with torch.inference_mode():
        for name, out in before.items():
            torch.testing.assert_close(model.get_submodule(name)(inputs[name]), out)
        torch.testing.assert_close(model(tokens).logits, logits)


def test_a_packed_layers_flops_are_counted_as_the_dense_matmuls():
    """FlopCounterMode counts a packed product as `F.linear`'s (the benchmarks' FLOP/s)."""
    layer = torch.nn.Linear(64, 48).to(torch.bfloat16)
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    with FlopCounterMode(display=False) as dense:
        layer(x)
    with FlopCounterMode(display=False) as packed:
        PackedLinear(layer)(x)
    assert packed.get_total_flops() == dense.get_total_flops() == 2 * 6 * 64 * 48


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_gives_the_models_own_norm_bit_for_bit(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    generator = torch.Generator().manual_seed(0)
    norm = LlamaRMSNorm(64, eps=1e-5).to(dtype)
    norm.weight.data = torch.randn(64, generator=generator).to(dtype)
    for rows in (1, 20, 700):
        x = (torch.randn(rows, 64, generator=generator) * 3).to(dtype)
        assert torch.equal(rms_norm(norm, x), norm(x))
