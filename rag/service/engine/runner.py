"""One forward pass of a transformers decoder over the slot cache: a packed prefill of some
prompts, or one decode step of every active slot.

At prefill the model's own modules do the work (embedding, rotary tables, decoder layers,
norm, LM head); this only lays out the tokens and hands each layer the step's plan.  A
decode step goes through `Decoder`, the same arithmetic in fewer operations.  Families whose
layers follow the Llama pattern (an attention module calling the cache and the configured
attention function) are accepted; others keep transformers' `generate`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from rag.service.engine.decode import Decoder
from rag.service.engine.slots import ATTENTION, DecodePlan, PrefillPlan, SlotCache

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


class UnsupportedModel(ValueError):
    """The engine cannot drive this model; transformers' generate still can."""


def check_supported(model: PreTrainedModel) -> None:
    config = model.config
    if config.model_type not in SUPPORTED_FAMILIES:
        raise UnsupportedModel(
            f"model family {config.model_type!r} is not one the engine drives "
            f"({', '.join(SUPPORTED_FAMILIES)}); set model.engine=false to use generate"
        )
    if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
        raise UnsupportedModel("sliding-window attention is not supported by the engine")


class SlotModel:
    """A causal LM whose keys and values live in `slots` fixed slots of `positions`.

    Build it after any change to the model's linear layers (4-bit decode): its decode step
    concatenates their weights."""

    def __init__(self, model: PreTrainedModel, slots: int, positions: int) -> None:
        check_supported(model)
        model.set_attn_implementation(ATTENTION)
        config = model.config
        head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads
        )
        self.model = model
        self.device = model.device
        self.cache = SlotCache(
            config.num_hidden_layers,
            slots,
            positions,
            config.num_key_value_heads,
            head_dim,
            model.dtype,
            model.device,
        )
        self.decoder = Decoder(model, self.cache)

    def _long(self, values: Sequence[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    @torch.inference_mode()
    def prefill(self, prompts: Sequence[tuple[int, Sequence[int], int]]) -> torch.Tensor:
        """Feed each (slot, tokens, past) into its slot after `past` positions already
        there, all prompts packed into one row of tokens (no padding); the logits of each
        prompt's last token, [prompts, vocab]."""
        tokens: list[int] = []
        slot_of_token: list[int] = []
        positions: list[int] = []
        spans = []
        for slot, ids, past in prompts:
            spans.append((slot, len(tokens), len(ids), past))
            tokens.extend(ids)
            slot_of_token.extend([slot] * len(ids))
            positions.extend(range(past, past + len(ids)))
        plan = PrefillPlan(self._long(slot_of_token), self._long(positions), tuple(spans))
        last = self._long([start + count - 1 for _, start, count, _ in spans])
        ids, where = self._long(tokens)[None], plan.position_of_token[None]
        return self._forward(ids, where, plan, last)

    @torch.inference_mode()
    def decode(self, last_tokens: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
        """One new token for each of slots 0..n-1 at its position; the logits [n, vocab]."""
        rows = len(last_tokens)
        where = self._long(positions)
        span = max(positions) + 1
        mask = None
        if min(positions) < max(positions):
            mask = (torch.arange(span, device=self.device)[None, :] <= where[:, None])[
                :, None, None, :
            ]
        plan = DecodePlan(self._long(range(rows)), where, span, mask)
        return self.decoder(self._long(last_tokens), plan)

    def _forward(
        self, ids: torch.Tensor, positions: torch.Tensor, plan: PrefillPlan, last: torch.Tensor
    ) -> torch.Tensor:
        inner = self.model.model
        hidden = inner.embed_tokens(ids)
        rotary = inner.rotary_emb(hidden, position_ids=positions)
        for layer in inner.layers:
            hidden = layer(
                hidden,
                attention_mask=None,
                position_embeddings=rotary,
                position_ids=positions,
                cache=self.cache,
                plan=plan,
                slots=self.cache,
            )
        hidden = hidden.reshape(-1, hidden.shape[-1])[last]
        return self.model.lm_head(inner.norm(hidden))
