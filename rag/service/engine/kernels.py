"""The engine's own CPU kernels (kernels.cpp, built with the package by setup.py), loaded
as torch operators when the library was built and the CPU runs what it was compiled for
(AVX2 and FMA); `available` says so, and callers keep a torch fallback for the rest.
RAGBENCH_KERNELS=0 in the environment leaves them unloaded: the torch path, as on a
machine where they were not built (to test or measure it beside them).
"""

from __future__ import annotations

import importlib.util
import os

import torch

LIBRARY = "rag.service.engine._kernels"
CAPABILITIES = ("AVX2", "AVX512")  # torch's names for CPUs that run x86-64-v3 code


def _load() -> bool:
    if os.environ.get("RAGBENCH_KERNELS") == "0":
        return False
    spec = importlib.util.find_spec(LIBRARY)
    if spec is None or spec.origin is None:
        return False
    if torch.backends.cpu.get_cpu_capability() not in CAPABILITIES:
        return False
    torch.ops.load_library(spec.origin)
    return True


LOADED = _load()


def available(tensor: torch.Tensor) -> bool:
    """Whether the kernels can compute on this tensor's device."""
    return LOADED and tensor.device.type == "cpu"


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
