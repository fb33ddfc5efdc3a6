"""One forward pass of a transformers decoder over the slot cache: some prompts prefilled
and every active slot decoded one token, packed together.

This lays out the tokens and the step's plan; `Forward` does the arithmetic with the
model's own weights, norms and rotary tables.  Families whose layers follow the Llama
pattern are accepted; others keep transformers' `generate`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from rag.service.engine import kernels
from rag.service.engine.forward import Forward
from rag.service.engine.slots import SlotCache, StepPlan, causal_mask
from rag.service.engine.static import StaticDecode

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
DECODE_STEPS = ("dynamic", "static", "graphs")


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

    A decode-only step is `decode`: `dynamic` (shaped by its rows and their longest
    position), `static` (padded to fixed shapes, `StaticDecode`) or `graphs` (the static
    step replayed from CUDA graphs); a step that prefills is always dynamic.  Build it after
    any change to the model's linear layers (4-bit decode): its forward pass concatenates
    their weights."""

    def __init__(
        self, model: PreTrainedModel, slots: int, positions: int, decode: str = "dynamic"
    ) -> None:
        if decode not in DECODE_STEPS:
            raise ValueError(f"decode step {decode!r} is not one of {', '.join(DECODE_STEPS)}")
        check_supported(model)
        self.decode_step = decode
        config = model.config
        head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads
        )
        self.model = model
        self.device = model.device
        # Prompt attention as `eager_attention` under an explicit mask: the CPU's fast path;
        # elsewhere SDPA's kernels are faster, but torch's FLOP counter cannot follow their
        # causal bias, so counting FLOPs on a GPU turns this on.
        self.masked_prompts = self.device.type == "cpu"
        self.cache = SlotCache(
            config.num_hidden_layers,
            slots,
            positions,
            config.num_key_value_heads,
            head_dim,
            model.dtype,
            model.device,
        )
        # Where the engine's kernels compute on the cache (the CPU), every prompt's
        # attention is one operation instead (`kernels.prompt_attention`), faster still.
        self.prompt_kernel = kernels.layer_ops(self.cache.keys)
        self.forward = Forward(model, self.cache)
        self.static = (
            StaticDecode(self.forward, self.cache, graphs=decode == "graphs")
            if decode != "dynamic"
            else None
        )

    def _long(self, values: Sequence[int]) -> torch.Tensor:
        host = torch.tensor(values, dtype=torch.long)
        if self.device.type == "cpu":
            return host
        # Copied from pinned memory, the step's inputs are queued behind the work before
        # them rather than waited for.
        return host.pin_memory().to(self.device, non_blocking=True)

    def prefill(self, prompts: Sequence[tuple[int, Sequence[int], int]]) -> torch.Tensor:
        """The logits [prompts, vocab] of each prompt's last token (see `step`)."""
        return self.step(prompts, [], [])

    def decode(self, last_tokens: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
        """The logits [rows, vocab] of one new token for each of slots 0..rows-1 (see `step`)."""
        return self.step([], last_tokens, positions)

    @torch.inference_mode()
    def step(
        self,
        prompts: Sequence[tuple[int, Sequence[int], int]],
        last_tokens: Sequence[int],
        positions: Sequence[int],
    ) -> torch.Tensor:
        """One forward pass: feed each prompt (slot, tokens, past) into its slot after
        `past` positions already there, and one new token for each of slots 0..rows-1
        (`last_tokens` at `positions`), all packed into one row of tokens (no padding); the
        logits [prompts + rows, vocab] of each prompt's last token, then of each row.

        Prompts and rows share each matmul: a row costs a few more of the prompt's
        compute-bound rows instead of a step of its own reading every weight."""
        if not prompts and self.static is not None:
            return self.static(last_tokens, positions)
        tokens: list[int] = []
        slot_of_token: list[int] = []
        position_of_token: list[int] = []
        spans, last = [], []
        for slot, ids, past in prompts:
            spans.append((slot, len(tokens), len(ids), past))
            tokens.extend(ids)
            slot_of_token.extend([slot] * len(ids))
            position_of_token.extend(range(past, past + len(ids)))
            last.append(len(tokens) - 1)
        rows = len(last_tokens)
        last.extend(range(len(tokens), len(tokens) + rows))
        tokens.extend(last_tokens)
        slot_of_token.extend(range(rows))
        position_of_token.extend(positions)
        span = max(positions, default=-1) + 1
        lengths = self._long([p + 1 for p in positions])
        mask = None
        if rows and min(positions) < max(positions):
            visible = torch.arange(span, device=self.device)[None, :] < lengths[:, None]
            mask = visible[:, None, None, :]
        keys, values = (
            c[:, :rows, :span].transpose(2, 3) for c in (self.cache.keys, self.cache.values)
        )
        table = None
        if spans and self.prompt_kernel:
            table = torch.tensor(spans, dtype=torch.long)
        plan = StepPlan(
            self._long(slot_of_token), self._long(position_of_token), tuple(spans),
            tuple(self._prompt_mask(count, past) for _, _, count, past in spans),
            rows, span, lengths, mask, keys, values, table,
        )  # fmt: skip
        return self.forward(self._long(tokens), plan, self._long(last))

    def _prompt_mask(self, count: int, past: int) -> torch.Tensor | None:
        """Masked prompt attention takes a mask; SDPA and the kernel know the causal shape
        themselves."""
        if self.masked_prompts and not self.prompt_kernel:
            return causal_mask(count, past, self.device)
        return None
