"""One forward pass over the slot cache (prompts prefilled, slots decoded, or both at once)
through the model's own weights, in few tensor operations.

At a few rows, a decode step's matmuls stream the weights in about half of the step; the
rest is the fixed cost of each operation and of the Python around it, which transformers'
layers spend generously (per-module calls, separate q/k/v and gate/up projections, rotary
embedding applied to q and k apart).  This pass does the same arithmetic with fewer calls:
q/k/v and gate/up as one matmul each (`fused`), the rotary embedding over q and k at once,
keys and values written straight into the slots, each RMSNorm's five operations as one
fused normalisation; with the engine's kernels (`kernels`), each residual add and the norm
after it, and the rotary embedding, as one pass in place, and SiLU(gate) x up as one pass.
The numbers are those of the layers it replaces (their activation and rotary tables are
called as they are; `rms_norm` gives their norms' results).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.activations import SiLUActivation

from rag.service.engine import kernels
from rag.service.engine.fused import fuse
from rag.service.engine.int4 import Int4Linear
from rag.service.engine.packed import PackedLinear, SlicedLinear, can_pack, dense_product
from rag.service.engine.slots import SlotCache, StepPlan, attention

SILU = (torch.nn.SiLU, SiLUActivation)  # transformers' "silu" and torch's own


class Forward:
    """The forward pass of a Llama-pattern model (llama, mistral, qwen2, qwen3) over a slot
    cache.  Building it adds `qkv_proj` to each attention module and `gate_up_proj` to each
    MLP (views of the layers' weights, no copy), and packs every dense bf16 weight it
    multiplies with for oneDNN (`packed`; the layers fused into one read their rows of
    it)."""

    def __init__(self, model: PreTrainedModel, cache: SlotCache) -> None:
        config = model.config
        self.model = model
        self.cache = cache
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = cache.keys.shape[-1]
        for layer in model.model.layers:
            attention, mlp = layer.self_attn, layer.mlp
            attention.qkv_proj = fuse([attention.q_proj, attention.k_proj, attention.v_proj])
            mlp.gate_up_proj = fuse([mlp.gate_proj, mlp.up_proj])
        if can_pack(model.model.embed_tokens.weight):
            pack_linear_layers(model)

    def __call__(self, tokens: torch.Tensor, plan: StepPlan, last: torch.Tensor) -> torch.Tensor:
        """The logits [len(last), vocab] after the tokens at `last` ([tokens] in, packed as
        the plan says)."""
        inner = self.model.model
        hidden = inner.embed_tokens(tokens)
        cos, sin = inner.rotary_emb(hidden, position_ids=plan.position_of_token[:, None])
        cos, sin = (t.view(tokens.shape[0], self.head_dim) for t in (cos, sin))
        half = self.head_dim // 2
        # rotate_half(x) x sin == swap_halves(x) x (-sin1, sin2): one flip, no cat per layer.
        signed_sin = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)
        delta = None  # each sublayer's output, added into `hidden` by the next norm
        for index, layer in enumerate(inner.layers):
            normed = residual_norm(layer.input_layernorm, hidden, delta)
            delta = self._attention(index, layer.self_attn, normed, cos, signed_sin, plan)
            normed = residual_norm(layer.post_attention_layernorm, hidden, delta)
            delta = self._mlp(layer.mlp, normed)
        if last.shape[0] != hidden.shape[0]:  # (as many means every token: no gather)
            hidden, delta = hidden[last], delta[last]
        return project(self.model.lm_head, residual_norm(inner.norm, hidden, delta))

    def _attention(
        self,
        index: int,
        module: torch.nn.Module,
        x: torch.Tensor,
        cos: torch.Tensor,
        signed_sin: torch.Tensor,
        plan: StepPlan,
    ) -> torch.Tensor:
        tokens, heads, kv_heads, dim = x.shape[0], self.heads, self.kv_heads, self.head_dim
        qkv = project(module.qkv_proj, x).view(tokens, heads + 2 * kv_heads, dim)
        qk, values = qkv[:, : heads + kv_heads], qkv[:, heads + kv_heads :]
        if hasattr(module, "q_norm"):  # qwen3 normalises each head's query and key
            qk = torch.cat(
                [rms_norm(module.q_norm, qk[:, :heads]), rms_norm(module.k_norm, qk[:, heads:])],
                dim=1,
            )
        qk = rotate(qk, cos, signed_sin)
        self.cache.store(index, plan, qk[:, heads:], values)
        attended = attention(self.cache, index, plan, qk[:, :heads], module.scaling)
        return project(module.o_proj, attended)

    def _mlp(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return project(module.down_proj, gated(module.act_fn, project(module.gate_up_proj, x)))


def rms_norm(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the model's RMSNorm computes (normalised in float32, cast back, then scaled by
    its weight), the same numbers, with torch's fused normalisation in place of its five
    operations: 3.5x faster over a 1,600-token prefill's hidden states."""
    normed = F.rms_norm(x.float(), (x.shape[-1],), None, norm.variance_epsilon)
    return norm.weight * normed.to(x.dtype)


def residual_norm(
    norm: torch.nn.Module, hidden: torch.Tensor, delta: torch.Tensor | None
) -> torch.Tensor:
    """hidden += delta, in place (the residual connection; none when delta is None), then
    `rms_norm` of the sum: one pass over the rows with the engine's kernel."""
    if kernels.layer_ops(hidden) and norm.weight.dtype == hidden.dtype:
        return kernels.add_rms_norm_(hidden, delta, norm.weight, norm.variance_epsilon)
    if delta is not None:
        hidden.add_(delta)
    return rms_norm(norm, hidden)


def rotate(qk: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """The rotary embedding of queries and keys ([tokens, heads, head_dim]; cos and
    signed_sin [tokens, head_dim]): in place with the engine's kernel."""
    if kernels.layer_ops(qk) and cos.dtype == signed_sin.dtype == qk.dtype:
        kernels.rotary_(qk, cos, signed_sin)
        return qk
    tokens, heads, dim = qk.shape
    swapped = qk.view(tokens, heads, 2, dim // 2).flip(2).view(qk.shape)
    return qk * cos[:, None] + swapped * signed_sin[:, None]


def gated(act_fn: torch.nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
    """act_fn(gate) x up from the fused gate/up product: one pass with the engine's kernel
    where the activation is SiLU (the Llama pattern's), torch's two operations otherwise."""
    if kernels.layer_ops(gate_up) and isinstance(act_fn, SILU):
        return kernels.silu_mul(gate_up.contiguous())
    gate, up = gate_up.chunk(2, dim=-1)
    return act_fn(gate) * up


def project(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A linear layer's output for contiguous rows [rows, in], without nn.Module's call
    overhead (a few microseconds, paid some 120 times a step)."""
    if isinstance(layer, Int4Linear):
        return layer.multiply(x)
    return dense_product(layer, x)


def pack_linear_layers(model: PreTrainedModel) -> None:
    """Pack the dense weight of every linear layer the forward pass multiplies with (a
    4-bit layer packs the one it uses for many rows); the layers fused into q/k/v and
    gate/up then read their rows of the packed fused weight, so no dense copy is kept."""
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        for parent, fused, parts in (
            (attention, "qkv_proj", ("q_proj", "k_proj", "v_proj")),
            (mlp, "gate_up_proj", ("gate_proj", "up_proj")),
        ):
            packed = _packed(getattr(parent, fused))
            setattr(parent, fused, packed)
            whole = packed.dense if isinstance(packed, Int4Linear) else packed
            start = 0
            for name in parts:
                part = getattr(parent, name)
                rows = SlicedLinear(whole, slice(start, start + part.out_features))
                start += part.out_features
                if isinstance(part, Int4Linear):
                    part.dense = rows
                else:
                    setattr(parent, name, rows)
        attention.o_proj = _packed(attention.o_proj)
        mlp.down_proj = _packed(mlp.down_proj)
    model.lm_head = _packed(model.lm_head)


def _packed(layer: torch.nn.Module) -> torch.nn.Module:
    if isinstance(layer, Int4Linear):
        layer.dense = PackedLinear(layer.dense)
        return layer
    return PackedLinear(layer)
