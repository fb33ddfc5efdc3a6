"""Keys and values of a fixed number of sequence slots, a step's plan, and the attention
that reads them.

Each layer's keys live in one tensor [slots, positions, kv_heads, head_dim] (values alike),
allocated once: a step writes its new keys in place with one indexed store and attends over
a view, so nothing is concatenated or copied per step.  Active sequences occupy slots
0..n-1 (the engine moves the last one into a hole when one leaves), so a decode step reads
`[:n, :span]`, a view.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from rag.service.engine import kernels


@dataclass(frozen=True)
class StepPlan:
    """The tokens of one forward pass, packed in one row: first the prompts being prefilled
    (`spans`: slot, first packed token, count, positions already in the slot from a reused
    prefix; `span_table`: the same as a [prompts, 4] int64 tensor where the engine's prompt
    attention kernel computes them, else None; `span_masks`: each one's `causal_mask` where
    torch's masked attention computes them, else None), then one token for each of slots
    0..rows-1 being decoded.  Each token's keys go to (`slot_of_token`,
    `position_of_token`).  A decoded row attends to its slot's first `lengths[row]` keys (=
    its position + 1): the CPU kernel reads them in place; torch's attention reads
    `decode_keys` and `decode_values` ([layers, rows, kv_heads, span, head_dim] views of
    the cache, taken once per step rather than once per layer) under `mask` ([rows, 1, 1,
    span], boolean or additive; None when every row sees all `span`)."""

    slot_of_token: torch.Tensor
    position_of_token: torch.Tensor
    spans: tuple[tuple[int, int, int, int], ...]
    span_masks: tuple[torch.Tensor | None, ...]
    rows: int
    span: int
    lengths: torch.Tensor
    mask: torch.Tensor | None
    decode_keys: torch.Tensor
    decode_values: torch.Tensor
    span_table: torch.Tensor | None = None


def _zeroed(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeroed storage.  On the CPU it is an anonymous memory map, whose pages the OS maps
    lazily: memory becomes resident only where keys are written, so a cache sized for the
    longest prompts costs what the prompts actually use.  (numpy's and torch's large
    allocations ask for 2 MB huge pages, which made a slot's first key cost 2 MB.)"""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    size = math.prod(shape) * dtype.itemsize
    return torch.frombuffer(mmap.mmap(-1, size), dtype=dtype).view(shape)


class SlotCache:
    """Per-layer key and value storage for `slots` sequences of up to `positions` tokens."""

    def __init__(
        self,
        layers: int,
        slots: int,
        positions: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.slots = slots
        self.positions = positions
        storage = _zeroed((2, layers, slots, positions, kv_heads, head_dim), dtype, device)
        self.keys, self.values = storage[0], storage[1]

    @property
    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()

    def store(self, layer: int, plan: StepPlan, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store a step's keys and values ([tokens, kv_heads, head_dim]) where its plan says."""
        where = (plan.slot_of_token, plan.position_of_token)
        self.keys[layer].index_put_(where, keys)
        self.values[layer].index_put_(where, values)

    def move(self, source: int, target: int, length: int) -> None:
        """Copy a sequence's first `length` positions from one slot to another."""
        self.keys[:, target, :length] = self.keys[:, source, :length]
        self.values[:, target, :length] = self.values[:, source, :length]

    def read(self, slot: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A copy of a slot's first `length` positions, every layer."""
        return self.keys[:, slot, :length].clone(), self.values[:, slot, :length].clone()

    def write(self, slot: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Put what `read` returned at the start of a slot."""
        self.keys[:, slot, : keys.shape[1]] = keys
        self.values[:, slot, : values.shape[1]] = values


def attention(
    cache: SlotCache, layer: int, plan: StepPlan, query: torch.Tensor, scale: float
) -> torch.Tensor:
    """Each token's query ([tokens, heads, head_dim]) over its slot's keys up to its own
    position; [tokens, heads x head_dim].  Every prompt's attention is one operation with
    the engine's kernel (no loop over the prompts, no copies of their queries and
    outputs), else one `prompt_attention` per prompt."""
    if not plan.spans:
        return _decode_attention(cache, layer, plan, query, scale)
    out = query.new_empty(query.shape[0], query.shape[1] * query.shape[2])
    if plan.span_table is not None:
        keys, values = cache.keys[layer], cache.values[layer]
        kernels.prompt_attention(query, keys, values, plan.span_table, scale, out)
    else:
        by_head = out.view(query.shape)
        for (slot, start, count, past), mask in zip(plan.spans, plan.span_masks, strict=True):
            keys = cache.keys[layer, slot, : past + count]
            values = cache.values[layer, slot, : past + count]
            by_head[start : start + count] = prompt_attention(
                query[start : start + count], keys, values, mask, scale
            )
    if plan.rows:
        decoded = query[query.shape[0] - plan.rows :]
        out[query.shape[0] - plan.rows :] = _decode_attention(cache, layer, plan, decoded, scale)
    return out


def causal_mask(count: int, past: int, device: torch.device) -> torch.Tensor:
    """[count, past + count]: 0 where prompt token i sees a key (the `past` reused ones and
    the prompt up to itself), -inf elsewhere."""
    return torch.full((count, past + count), -math.inf, device=device).triu(past + 1)


def prompt_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """A prompt's queries [count, heads, head_dim] over its slot's keys and values [past +
    count, kv_heads, head_dim], each token seeing the reused positions and the prompt up to
    itself; [count, heads, head_dim].  On the CPU `eager_attention` under its
    `causal_mask` (where the engine's kernel is absent), elsewhere `sdpa_attention`, whose
    GPU kernels are the fast ones."""
    if mask is not None:
        return eager_attention(query, keys, values, mask, scale)
    return sdpa_attention(query, keys, values, scale)


def eager_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """transformers' eager arithmetic (scores in the model's dtype, softmax in float32) as
    two batched matmuls, one per key head with the query heads sharing it stacked: on the
    CPU, at prompt lengths of a few hundred, about twice as fast as SDPA's flash kernel."""
    count, heads, head_dim = query.shape
    kv_heads, total = keys.shape[1], keys.shape[0]
    group = heads // kv_heads
    grouped = query.view(count, kv_heads, group, head_dim).permute(1, 2, 0, 3)
    grouped = grouped.reshape(kv_heads, group * count, head_dim)
    scores = torch.bmm(grouped, keys.permute(1, 2, 0)).view(kv_heads, group, count, total)
    weights = (scores * scale + mask).softmax(-1).to(scores.dtype)
    out = torch.bmm(weights.view(kv_heads, group * count, total), values.transpose(0, 1))
    return out.view(kv_heads, group, count, head_dim).permute(2, 0, 1, 3).reshape(query.shape)


def sdpa_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
) -> torch.Tensor:
    """`eager_attention`'s result through torch's scaled_dot_product_attention.  The causal
    shape is given as a bias aligned to the last key (the prompt follows the reused
    positions), not as a mask tensor, so that a GPU runs the flash kernel."""
    q, k, v = (t.transpose(0, 1)[None] for t in (query, keys, values))
    causal = causal_lower_right(query.shape[0], keys.shape[0])
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)


def _decode_attention(
    cache: SlotCache, layer: int, plan: StepPlan, query: torch.Tensor, scale: float
) -> torch.Tensor:
    """One query per decoded row ([rows, heads, head_dim]); [rows, heads x head_dim].  On
    the CPU the engine's kernel where it was built, reading the cache in place."""
    rows, heads, head_dim = query.shape
    if kernels.available(query):
        keys, values = cache.keys[layer], cache.values[layer]
        out = kernels.decode_attention(query, keys, values, plan.lengths, scale)
        return out.view(rows, heads * head_dim)
    keys, values = plan.decode_keys[layer], plan.decode_values[layer]
    kv_heads = keys.shape[1]
    # One query token per row: the query heads sharing a key head act as that head's
    # queries, so grouped-query attention needs no repeated keys.
    grouped = query.reshape(rows, kv_heads, heads // kv_heads, head_dim)
    out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=plan.mask, scale=scale)
    return out.reshape(rows, heads * head_dim)
