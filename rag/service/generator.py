"""Batched text generation with a causal LM: chat prompt in, answer text and token counts out."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rag.config import ModelConfig


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    new_tokens: int


class Generator:
    """Wraps a loaded causal LM for left-padded batch generation.

    Greedy by default so answers are reproducible; sampling only when temperature > 0.
    """

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cfg: ModelConfig
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = cfg
        # Left padding keeps every prompt's last token adjacent to the generated ones.
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.eos_token_id = tokenizer.eos_token_id
        if self.eos_token_id is None:
            self.eos_token_id = tokenizer.sep_token_id
        torch.manual_seed(cfg.seed)  # sampling draws from torch's global generator

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

    @torch.inference_mode()
    def generate(self, prompts: list[str], max_new_tokens: int | None = None) -> list[Generation]:
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
