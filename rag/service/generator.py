"""Text generation with a causal LM: chat prompt in, answer text and token counts out.

Generation runs on the step-level engine (slots, packed prefill, shared prefix, 4-bit
decode where the weights allow) unless `model.engine=false`, which keeps transformers'
`generate` over left-padded batches: the reference the engine is tested against, and the
path for model families the engine does not drive.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rag.config import ModelConfig
from rag.service.engine.engine import Engine, Sequence

PREFIX_MARK = "\x00ragbench-user\x00"  # stands in for the user turn when finding the prefix


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    new_tokens: int


class Generator:
    """Greedy by default so answers are reproducible; sampling only when temperature > 0."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        cfg: ModelConfig,
        engine: Engine | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.engine = engine
        # Left padding (transformers' path) keeps every prompt's last token adjacent to the
        # generated ones.
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.eos_token_id = tokenizer.eos_token_id
        if self.eos_token_id is None:
            self.eos_token_id = tokenizer.sep_token_id
        torch.manual_seed(cfg.seed)  # transformers' sampling draws from torch's global generator

    def render(self, system: str, user: str) -> str:
        """The prompt text: the tokenizer's chat template when it has one, else plain text."""
        if self.tokenizer.chat_template:
            messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        return f"{system}\n\n{user}\n\nAnswer:"

    def truncate(self, text: str, max_tokens: int) -> str:
        """Cut a text to at most `max_tokens` tokens, so long documents cannot crowd out the
        question or exceed the model's context."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= max_tokens:
            return text
        return self.tokenizer.decode(ids[:max_tokens], skip_special_tokens=True)

    def encode(self, prompts: list[str]) -> list[list[int]]:
        return self.tokenizer(
            prompts,
            truncation=True,
            max_length=self.cfg.max_prompt_tokens,
            add_special_tokens=not self.tokenizer.chat_template,
        )["input_ids"]

    def share_prefix(self, system: str) -> int:
        """Let the engine compute once the tokens every prompt with this system prompt
        starts with (up to the user's turn); the prefix's length in tokens."""
        if self.engine is None:
            return 0
        text = self.render(system, PREFIX_MARK).split(PREFIX_MARK)[0]
        prefix = self.encode([text])[0]
        # Tokenisers may merge across the cut: keep what a real prompt really starts with.
        example = self.encode([self.render(system, "Context:\nexample")])[0]
        while prefix and example[: len(prefix)] != prefix:
            prefix = prefix[:-1]
        self.engine.set_shared_prefix(prefix)
        return len(self.engine.prefix)

    def sequence(self, prompt_ids: list[int], max_new_tokens: int | None = None) -> Sequence:
        """An engine sequence for one encoded prompt, with this configuration's limits."""
        limit = max_new_tokens or self.cfg.max_new_tokens
        return Sequence(prompt_ids, limit, min_new_tokens=limit if self.cfg.ignore_eos else 0)

    def result(self, sequence: Sequence) -> Generation:
        text = self.tokenizer.decode(sequence.tokens, skip_special_tokens=True).strip()
        return Generation(text, len(sequence.prompt), len(sequence.tokens))

    def generate(self, prompts: list[str], max_new_tokens: int | None = None) -> list[Generation]:
        if self.engine is None:
            return self.generate_with_transformers(prompts, max_new_tokens)
        sequences = [self.sequence(ids, max_new_tokens) for ids in self.encode(prompts)]
        return [self.result(s) for s in self.engine.generate(sequences)]

    @torch.inference_mode()
    def generate_with_transformers(
        self, prompts: list[str], max_new_tokens: int | None = None
    ) -> list[Generation]:
        """transformers' `generate` over one left-padded batch."""
        cfg = self.cfg
        max_new_tokens = max_new_tokens or cfg.max_new_tokens
        batch = self.tokenizer(
            prompts,
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=cfg.max_prompt_tokens,
            add_special_tokens=not self.tokenizer.chat_template,
            return_token_type_ids=False,
        ).to(self.model.device)
        sampling = cfg.temperature > 0
        options = (
            {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p}
            if sampling
            else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        )
        output = self.model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens if cfg.ignore_eos else None,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            **options,
        )
        new = output[:, batch["input_ids"].shape[1] :].cpu()
        prompt_lengths = batch["attention_mask"].sum(dim=1).tolist()
        results = []
        for row, prompt_tokens in zip(new.tolist(), prompt_lengths, strict=True):
            if self.eos_token_id in row and not cfg.ignore_eos:
                row = row[: row.index(self.eos_token_id) + 1]
            text = self.tokenizer.decode(row, skip_special_tokens=True).strip()
            results.append(Generation(text, int(prompt_tokens), len(row)))
        return results
