"""The engine's own CPU kernels (kernels.cpp: decode attention; layer_ops.cpp: the pointwise
work between a layer's matmuls; built with the package by setup.py, once for AVX2 and once
for AVX-512, which alone holds int4_matmul.cpp's 4-bit matmul), loaded as torch operators
when the library was built and the CPU runs what it was compiled for: the AVX-512 build
where torch runs its own AVX-512 code (twice the vector width, which the layer kernels
use), the AVX2 one where it runs AVX2.  `available` says so, and callers keep a torch
fallback for the rest.  RAGBENCH_KERNELS=0 in the environment leaves them unloaded: the
torch path, as on a machine where they were not built (to test or measure it beside them);
RAGBENCH_KERNELS=avx2 loads the AVX2 build on any machine that runs it.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch.utils.flop_counter import register_flop_formula

LIBRARY = "rag.service.engine._kernels"
# The builds each of torch's CPU capabilities runs, widest first.
BUILDS = {"AVX512": (f"{LIBRARY}_avx512", LIBRARY), "AVX2": (LIBRARY,)}


def _load() -> str | None:
    """The name of the library loaded, or None."""
    choice = os.environ.get("RAGBENCH_KERNELS")
    if choice == "0":
        return None
    builds = BUILDS.get(torch.backends.cpu.get_cpu_capability(), ())
    for name in builds[-1:] if choice == "avx2" else builds:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin is not None:
            torch.ops.load_library(spec.origin)
            return name
    return None


LOADED_LIBRARY = _load()
LOADED = LOADED_LIBRARY is not None
# The 4-bit matmul (int4_matmul.cpp) is in the AVX-512 build and multiplies with AVX512-BF16's
# dot products; RAGBENCH_BF16_DOT=0 leaves it unused, as the attention kernels' bf16 dots.
INT4_LINEAR = (
    BUILDS["AVX512"][0] == LOADED_LIBRARY
    and torch.cpu._is_avx512_bf16_supported()
    and os.environ.get("RAGBENCH_BF16_DOT") != "0"
)


def attention_flops(query: torch.Tensor, pairs: int) -> int:
    """q k^T and p v over `pairs` (query token, key) pairs: 2 x 2 x heads x head_dim each."""
    return 4 * query.shape[1] * query.shape[2] * pairs


if LOADED:  # counted by torch's FlopCounterMode as the matmuls they replace are

    @register_flop_formula(torch.ops.ragbench.decode_attention, get_raw=True)
    def _decode_attention_flops(query, keys, values, lengths, scale, **kwargs) -> int:
        return attention_flops(query, int(lengths.sum()))

    if INT4_LINEAR:

        @register_flop_formula(torch.ops.ragbench.int4_linear, get_raw=True)
        def _int4_linear_flops(x, codes, scales_mins, **kwargs) -> int:
            """The dense matmul's it replaces: 2 x rows x in x out."""
            return 2 * x.shape[0] * x.shape[1] * codes.shape[0]

    @register_flop_formula(torch.ops.ragbench.prompt_attention, get_raw=True)
    def _prompt_attention_flops(query, keys, values, spans, scale, out, **kwargs) -> int:
        """The causal pairs only: each token's reused positions and the prompt up to it."""
        counts, past = spans[:, 2], spans[:, 3]
        return attention_flops(query, int((counts * past + counts * (counts + 1) // 2).sum()))


def available(tensor: torch.Tensor) -> bool:
    """Whether the kernels can compute on this tensor's device."""
    return LOADED and tensor.device.type == "cpu"


def layer_ops(tensor: torch.Tensor) -> bool:
    """Whether the layer kernels (layer_ops.cpp: float32 and bfloat16) compute on it."""
    return available(tensor) and tensor.dtype in (torch.float32, torch.bfloat16)


def decode_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query token per row ([rows, heads, head_dim]) over the first `lengths[r]`
    positions of slot r of one layer's cache ([slots, positions, kv_heads, head_dim]);
    [rows, heads, head_dim]."""
    return torch.ops.ragbench.decode_attention(query, keys, values, lengths, scale)


def add_rms_norm_(
    hidden: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """hidden += delta (in place, [rows, width], contiguous; no add when None), and weight
    x RMSNorm(hidden) normalised in float32 then cast to hidden's dtype; [rows, width]."""
    return torch.ops.ragbench.add_rms_norm_(hidden, delta, weight, eps)


def rotary_(qk: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> None:
    """qk ([tokens, heads, head_dim]) turned in place to qk cos + swap_halves(qk) signed_sin
    (cos, signed_sin [tokens, head_dim])."""
    torch.ops.ragbench.rotary_(qk, cos, signed_sin)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) x up from the fused gate/up product ([rows, 2 width], contiguous, gate
    first); [rows, width]."""
    return torch.ops.ragbench.silu_mul(gate_up)


def prompt_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    spans: torch.Tensor,
    scale: float,
    out: torch.Tensor,
) -> None:
    """Each prompt's queries (its rows of query [tokens, heads, head_dim]) over its slot's
    keys and values ([slots, positions, kv_heads, head_dim], one layer of the cache), each
    token seeing the reused positions and the prompt up to itself, written into its rows of
    out ([tokens, heads x head_dim]); spans [prompts, 4] int64: slot, first token, count,
    positions already in the slot.  transformers' eager arithmetic: scores in the dtype,
    softmax in float32."""
    torch.ops.ragbench.prompt_attention(query, keys, values, spans, scale, out)


def int4_linear(x: torch.Tensor, codes: torch.Tensor, scales_mins: torch.Tensor) -> torch.Tensor:
    """x [rows, in] bf16 times a 4-bit matrix packed by `int4.pair_codes` (codes [out, in /
    2] uint8; scales_mins [in / 32, out, 2] float16: w = q x scale + min per group of 32);
    [rows, out] bf16.  Only where INT4_LINEAR."""
    return torch.ops.ragbench.int4_linear(x, codes, scales_mins)
