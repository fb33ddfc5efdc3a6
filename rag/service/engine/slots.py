"""Keys and values of a fixed number of sequence slots, and the attention that reads them.

Each layer's keys live in one tensor [slots, positions, kv_heads, head_dim] (values alike),
allocated once: a step writes its new keys in place with one indexed store and attends over
a view, so nothing is concatenated or copied per step.  Active sequences occupy slots
0..n-1 (the engine moves the last one into a hole when one leaves), so a decode step reads
`[:n, :span]`, a view.

At prefill the model's own attention modules drive it, as they drive a transformers Cache:
they call `update` and then the attention function registered here under ATTENTION,
passing along the forward's keyword arguments, which carry the step's plan.  Without a plan
(transformers' own `generate`) the function is plain SDPA, so the model keeps working as
before.  The decode step (`decode.py`) calls `store_decode` and `decode_attention` itself.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

ATTENTION = "ragbench_slots"


@dataclass(frozen=True)
class PrefillPlan:
    """Prompts packed into one row of tokens: where each token's keys go, and which tokens
    belong to which sequence (`spans`: slot, first packed token, count, positions already
    in the slot from a reused prefix)."""

    slot_of_token: torch.Tensor
    position_of_token: torch.Tensor
    spans: tuple[tuple[int, int, int, int], ...]


@dataclass(frozen=True)
class DecodePlan:
    """One new token for each of slots 0..rows-1, at `positions` ([rows]); each attends to
    its own first positions + 1 keys (`mask`: [rows, 1, 1, span]; None when every row
    sees all `span`)."""

    rows: torch.Tensor
    positions: torch.Tensor
    span: int
    mask: torch.Tensor | None


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

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, kwargs=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a prefill's keys and values ([1, kv_heads, tokens, head_dim]) where its
        plan says; the attention function reads them back from the slots."""
        plan: PrefillPlan = kwargs["plan"]
        where = (plan.slot_of_token, plan.position_of_token)
        self.keys[layer_idx].index_put_(where, key_states[0].transpose(0, 1))
        self.values[layer_idx].index_put_(where, value_states[0].transpose(0, 1))
        return key_states, value_states

    def store_decode(
        self, layer: int, plan: DecodePlan, keys: torch.Tensor, values: torch.Tensor
    ) -> None:
        """Store a decode step's keys and values ([rows, kv_heads, head_dim])."""
        where = (plan.rows, plan.positions)
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


def decode_attention(
    cache: SlotCache, layer: int, plan: DecodePlan, query: torch.Tensor, scale: float
) -> torch.Tensor:
    """Each row's query ([rows, heads, head_dim]) over its slot's keys; [rows, heads x
    head_dim]."""
    rows, heads, head_dim = query.shape
    keys = cache.keys[layer, :rows, : plan.span].transpose(1, 2)
    values = cache.values[layer, :rows, : plan.span].transpose(1, 2)
    kv_heads = keys.shape[1]
    # One query token per row: the query heads sharing a key head act as that head's
    # queries, so grouped-query attention needs no repeated keys.
    grouped = query.reshape(rows, kv_heads, heads // kv_heads, head_dim)
    out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=plan.mask, scale=scale)
    return out.reshape(rows, heads * head_dim)


def _prefill_attention(
    cache: SlotCache, layer: int, plan: PrefillPlan, query: torch.Tensor, scale: float
) -> torch.Tensor:
    out = torch.empty_like(query.transpose(1, 2))  # [1, tokens, heads, head_dim]
    for slot, start, count, past in plan.spans:
        q = query[:, :, start : start + count]
        keys = cache.keys[layer, slot, : past + count].transpose(0, 1).unsqueeze(0)
        values = cache.values[layer, slot, : past + count].transpose(0, 1).unsqueeze(0)
        mask = None
        if past:  # token i sees the reused prefix and the prompt up to itself
            mask = torch.ones(count, past + count, dtype=torch.bool, device=q.device).tril(past)
        attended = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, is_causal=not past, scale=scale, enable_gqa=True
        )
        out[0, start : start + count] = attended[0].transpose(0, 1)
    return out


def slot_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function protocol: returns [batch, tokens, heads, head_dim]."""
    plan = kwargs.get("plan")
    if plan is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    cache: SlotCache = kwargs["slots"]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return _prefill_attention(cache, module.layer_idx, plan, query, scale), None


AttentionInterface.register(ATTENTION, slot_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)
