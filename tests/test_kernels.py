"""The engine's CPU kernels compute what the torch code they replace computes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType, quants
from torch.utils.flop_counter import FlopCounterMode
from transformers.models.llama.modeling_llama import LlamaRMSNorm, rotate_half

from rag.service.engine import kernels
from rag.service.engine.int4 import READERS, Int4Linear
from rag.service.engine.slots import causal_mask, eager_attention

pytestmark = pytest.mark.skipif(
    not kernels.LOADED, reason="the engine's kernels were not built for this machine"
)


# Lengths about the 16-position blocks the AVX-512 build scores together, up to 300.
DECODE_LENGTHS = [1, 2, 15, 16, 17, 31, 33, 64, 100, 255, 256, 300]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads, kv_heads", [(9, 3), (4, 4), (8, 1)])
@pytest.mark.parametrize("head_dim", [16, 24, 64, 128])
def test_decode_attention_computes_what_sdpa_computes(dtype, heads, kv_heads, head_dim):
    """Rows of 1 to 300 positions over one layer of a slot cache (more slots than rows),
    against SDPA in float32 over the same keys under the mask the engine builds; head sizes
    the AVX-512 build has its own loops for (16, 64, 128) and one it has not (24)."""
    generator = torch.Generator().manual_seed(0)
    lengths = torch.tensor(DECODE_LENGTHS)
    rows, positions = len(lengths), int(lengths.max())
    cache = torch.randn(2, rows + 1, positions, kv_heads, head_dim, generator=generator)
    keys, values = cache.to(dtype)
    query = torch.randn(rows, heads, head_dim, generator=generator).to(dtype)
    out = kernels.decode_attention(query, keys, values, lengths, head_dim**-0.5)

    mask = (torch.arange(positions)[None, :] < lengths[:, None])[:, None, None, :]
    k, v = (c[:rows].transpose(1, 2).float() for c in (keys, values))
    grouped = query.float().reshape(rows, kv_heads, heads // kv_heads, head_dim)
    expected = F.scaled_dot_product_attention(
        grouped, k, v, attn_mask=mask, scale=head_dim**-0.5
    ).reshape(query.shape)
    assert out.dtype == dtype and out.shape == query.shape
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), expected, rtol=tolerance, atol=tolerance)


def test_decode_attention_of_no_rows_is_empty():
    keys = torch.zeros(2, 8, 1, 64)
    query = torch.zeros(0, 1, 64)
    out = kernels.decode_attention(query, keys, keys, torch.zeros(0, dtype=torch.long), 1.0)
    assert out.shape == query.shape


def test_decode_attention_refuses_a_length_outside_the_slot():
    keys = torch.zeros(2, 8, 1, 4)
    with pytest.raises(RuntimeError, match="lengths within the slot"):
        kernels.decode_attention(torch.zeros(1, 1, 4), keys, keys, torch.tensor([9]), 1.0)


# The layer kernels round where torch rounds: in float32 they give torch's numbers up to the
# order of a sum or the last bit of an exp; in half precision, one unit in the last place.
LAYER_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def assert_near(out: torch.Tensor, expected: torch.Tensor) -> None:
    assert out.dtype == expected.dtype and out.shape == expected.shape
    tolerance = LAYER_TOLERANCE[expected.dtype]
    torch.testing.assert_close(out.float(), expected.float(), rtol=tolerance, atol=tolerance)


def test_the_attention_kernels_flops_are_counted():
    """FlopCounterMode counts them as the attention they compute, 2 x 2 x heads x head_dim
    per (query token, key) pair: a decoded row's keys; a prompt token's causal pairs (the
    reused positions and the prompt up to itself)."""
    heads, dim = 4, 8
    keys = torch.randn(3, 20, 2, dim)
    query = torch.randn(8, heads, dim)
    with FlopCounterMode(display=False) as decode:
        kernels.decode_attention(query[:2], keys, keys, torch.tensor([11, 4]), 1.0)
    assert decode.get_total_flops() == 4 * heads * dim * (11 + 4)
    spans = torch.tensor([[0, 0, 3, 2], [2, 3, 5, 0]])  # pairs: 3 x 2 + 3 x 4 / 2, 5 x 6 / 2
    with FlopCounterMode(display=False) as prompts:
        kernels.prompt_attention(query, keys, keys, spans, 1.0, torch.zeros(8, heads * dim))
    assert prompts.get_total_flops() == 4 * heads * dim * (12 + 15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 37])  # one thread's work, and the threads' share
def test_add_rms_norm_adds_in_place_and_normalises_as_the_torch_path(dtype, rows):
    generator = torch.Generator().manual_seed(1)
    hidden, delta = (torch.randn(rows, 576, generator=generator).to(dtype) for _ in range(2))
    norm = LlamaRMSNorm(576, eps=1e-5).to(dtype)
    norm.weight.data = torch.randn(576, generator=generator).to(dtype)
    expected_hidden = hidden + delta
    expected = norm(expected_hidden)
    out = kernels.add_rms_norm_(hidden, delta, norm.weight, 1e-5)
    assert torch.equal(hidden, expected_hidden)  # the residual sum, rounded as torch does
    assert_near(out, expected)
    assert_near(kernels.add_rms_norm_(hidden.clone(), None, norm.weight, 1e-5), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_turns_queries_and_keys_in_place_as_the_torch_path(dtype):
    """On the strided view of the fused q/k/v product the forward pass turns (q and k heads
    of each token, values between tokens); in bf16 bit for bit, every product rounded as
    torch stores it (in float32 the compiler may fuse a product into the sum)."""
    generator = torch.Generator().manual_seed(2)
    tokens, heads, kv_heads, dim = 23, 9, 3, 64
    qkv = torch.randn(tokens, heads + 2 * kv_heads, dim, generator=generator).to(dtype)
    qk = qkv[:, : heads + kv_heads]
    angles = torch.randn(tokens, dim, generator=generator)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    signed_sin = torch.cat([-sin[:, : dim // 2], sin[:, dim // 2 :]], dim=-1)
    expected = qk * cos[:, None] + rotate_half(qk) * sin[:, None]  # transformers' arithmetic
    values = qkv[:, heads + kv_heads :].clone()
    kernels.rotary_(qk, cos, signed_sin)
    assert_near(qk, expected)
    assert dtype == torch.float32 or torch.equal(qk, expected)
    assert torch.equal(qkv[:, heads + kv_heads :], values)  # the values are left alone


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads, kv_heads", [(9, 3), (4, 4), (8, 1)])
@pytest.mark.parametrize("head_dim", [16, 24, 64, 128])
def test_prompt_attention_gives_each_prompt_what_the_torch_path_gives(
    dtype, heads, kv_heads, head_dim
):
    """Prompts of different lengths (one token to 300, about the AVX-512 loops' tiles of 8
    query rows and blocks of 16 keys, and a matmul block's 128 tokens) and pasts (none; a
    shared prefix already in the slot, odd or even), packed with rows of no prompt between
    them, read from the strided view of the fused q/k/v product, against the torch path
    (`eager_attention`: transformers' eager arithmetic) prompt by prompt; head sizes the
    AVX-512 build has its own loops for (16, 64, 128) and one it has not (24).  The other
    rows are left alone."""
    generator = torch.Generator().manual_seed(6)
    slots, positions = 7, 400
    keys, values = (
        torch.randn(slots, positions, kv_heads, head_dim, generator=generator).to(dtype)
        for _ in range(2)
    )
    spans = [
        (3, 0, 1, 0),
        (0, 1, 130, 24),
        (4, 140, 37, 5),
        (1, 177, 300, 0),
        (6, 480, 17, 40),
        (2, 497, 2, 0),
        (5, 499, 33, 1),
    ]
    others = [*range(131, 140), *range(477, 480)]  # in no span: decoded rows, say
    tokens = 532
    qkv = torch.randn(tokens, heads + 2 * kv_heads, head_dim, generator=generator).to(dtype)
    query = qkv[:, :heads]
    out = torch.full((tokens, heads * head_dim), 7.0, dtype=dtype)
    kernels.prompt_attention(query, keys, values, torch.tensor(spans), 0.3, out)
    for slot, start, count, past in spans:
        mask = causal_mask(count, past, query.device)
        k, v = keys[slot, : past + count], values[slot, : past + count]
        expected = eager_attention(query[start : start + count], k, v, mask, 0.3)
        assert_near(out[start : start + count], expected.reshape(count, heads * head_dim))
    assert torch.all(out[others] == 7)


def test_prompt_attention_refuses_a_span_outside_its_slot():
    keys = torch.zeros(2, 8, 1, 4)
    query, out = torch.zeros(6, 1, 4), torch.zeros(6, 4)
    with pytest.raises(RuntimeError, match="each span within its slot"):
        kernels.prompt_attention(query, keys, keys, torch.tensor([[0, 0, 6, 3]]), 1.0, out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 37])
def test_silu_mul_gives_the_activated_gate_times_up_as_the_torch_path(dtype, rows):
    """From the fused gate/up product (gate first in each row), against SiLU(gate) x up in
    the product's dtype, as the MLP computes it."""
    generator = torch.Generator().manual_seed(5)
    gate_up = (4 * torch.randn(rows, 2 * 1536, generator=generator)).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    assert_near(kernels.silu_mul(gate_up), F.silu(gate) * up)


def run_this_file(env: dict[str, str], *selection: str) -> None:
    """This file's tests (those `selection` picks, as pytest's -k) pass in a process of its
    own under `env`."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__]
    environment = {**os.environ, **env}
    done = subprocess.run(
        [*command, *selection], env=environment, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:]
    assert " passed" in done.stdout and "failed" not in done.stdout


@pytest.mark.skipif(
    kernels.LOADED_LIBRARY == "rag.service.engine._kernels",
    reason="the AVX2 build is the one loaded: the tests above cover it",
)
def test_the_avx2_build_computes_what_the_torch_code_computes():
    """Where the AVX-512 build is the one loaded, the AVX2 build (what a CPU without AVX-512
    loads) passes this file's tests too."""
    run_this_file({"RAGBENCH_KERNELS": "avx2"})


def cpu_has_avx512_bf16() -> bool:
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.exists() and "avx512_bf16" in cpuinfo.read_text()


@pytest.mark.skipif(
    kernels.LOADED_LIBRARY != "rag.service.engine._kernels_avx512" or not cpu_has_avx512_bf16(),
    reason="bf16 keys are converted to float here anyway: the tests above cover it",
)
def test_bf16_keys_converted_to_float_give_what_the_torch_path_gives():
    """Where the AVX-512 build multiplies bf16 keys and values with AVX512-BF16's dot
    products, its other way (converted to float, what a CPU without them runs) passes the
    attention tests."""
    run_this_file({"RAGBENCH_BF16_DOT": "0"}, "-k", "decode_attention or prompt_attention")


four_bit_kernel = pytest.mark.skipif(
    not kernels.INT4_LINEAR, reason="no AVX512-BF16 here, or not the AVX-512 build"
)


@four_bit_kernel
@pytest.mark.parametrize("kind", [GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0])
def test_the_4_bit_kernel_multiplies_what_the_gguf_blocks_hold(kind):
    """1 to 17 rows (the kernel takes up to 8 together, and gives 1 to 4 rows sums of their
    own) of three blocks of 16 outputs and three groups of 32 inputs, against the GGUF's own
    dequantised weights in float32, up to the output's bf16 rounding."""
    generator = torch.Generator().manual_seed(2)
    weights = torch.randn(48, 96, generator=generator).numpy()
    raw = quants.quantize(weights, kind)
    exact = torch.from_numpy(quants.dequantize(raw, kind))
    dense = torch.nn.Linear(96, 48, bias=False).to(torch.bfloat16)
    layer = Int4Linear.from_blocks(dense, READERS[kind](raw), max_rows=17)
    assert layer.paired
    for rows in range(1, 18):
        x = torch.randn(rows, 96, generator=generator).to(torch.bfloat16)
        expected = x.float() @ exact.T
        out = layer(x)
        assert out.dtype == torch.bfloat16 and out.shape == (rows, 48)
        bf16_step = 2**-8 * expected.abs().max().item()
        torch.testing.assert_close(out.float(), expected, rtol=2**-8, atol=bf16_step)
    with FlopCounterMode(display=False) as counted:
        layer(x)
    assert counted.get_total_flops() == 2 * 17 * 96 * 48 * len(layer.packed)


@four_bit_kernel
def test_the_4_bit_kernel_refuses_what_it_cannot_multiply():
    codes = torch.zeros(16, 48, dtype=torch.uint8)
    scales = torch.zeros(3, 16, 2, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="x: \\[rows, in\\] bf16"):
        kernels.int4_linear(torch.zeros(1, 96), codes, scales)
    with pytest.raises(RuntimeError, match="out: a multiple of 16"):
        kernels.int4_linear(torch.zeros(1, 96, dtype=torch.bfloat16), codes[:8], scales[:, :8])
    with pytest.raises(RuntimeError, match="scales_mins"):
        kernels.int4_linear(torch.zeros(1, 96, dtype=torch.bfloat16), codes, scales.float())
