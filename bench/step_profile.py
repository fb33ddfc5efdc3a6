"""Where one engine step's time goes, the same way for our engine and for the peer: matmuls
(linear layers, dense or 4-bit), attention (its kernels and the cache writes), and the
rest (norms, rotary, activations, sampling, and the Python around them), from torch's
profiler.  Imports only torch, so both engines' interpreters can use it.

An operation counts for a category when its name is listed there and no operation it runs
inside is (vLLM's attention op calls its kernel: one count, not two).  The rest is the
step's wall time under the profiler less the two categories.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from torch.profiler import ProfilerActivity, profile

T = TypeVar("T")

CATEGORIES = {
    "matmul": {
        "aten::linear", "aten::mm", "aten::addmm", "aten::matmul",
        "aten::_weight_int4pack_mm_for_cpu", "ragbench::int4_linear", "mkldnn::_linear_pointwise",
        "_C::onednn_mm", "_C::weight_packed_linear",
    },
    "attention": {
        "aten::scaled_dot_product_attention", "aten::bmm", "aten::baddbmm",
        "aten::softmax", "aten::_softmax", "aten::index_put_",
        "vllm::unified_attention_with_output", "vllm::unified_kv_cache_update",
        "_C::cpu_attention_with_kv_cache", "_C::cpu_attn_reshape_and_cache",
        "ragbench::decode_attention", "ragbench::prompt_attention",
    },
}  # fmt: skip


def _category(name: str) -> str | None:
    for category, names in CATEGORIES.items():
        if name in names:
            return category
    return None


def profiled(step: Callable[[], T]) -> tuple[T, dict[str, float]]:
    """Run `step` once under the profiler: what it returns, and its wall seconds and each
    category's."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        value = step()
        wall = time.perf_counter() - started
    spent = dict.fromkeys(CATEGORIES, 0.0)
    for event in prof.events():
        category = _category(event.name)
        if category is None:
            continue
        parent = event.cpu_parent
        while parent is not None and _category(parent.name) is None:
            parent = parent.cpu_parent
        if parent is None:
            spent[category] += event.cpu_time_total / 1e6
    return value, {"seconds": wall, **{f"{c}_s": s for c, s in spent.items()}}
