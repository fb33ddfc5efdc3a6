"""Text generation with a causal LM: chat prompt in, answer text and token counts out.

Generation runs on the step-level engine (slots, packed prefill, shared prefix, 4-bit
decode where the weights allow) unless `model.engine=false`, which keeps transformers'
`generate` over left-padded batches: the reference the engine is tested against, and the
path for model families the engine does not drive.

Either way each request generates with its own settings (token limit, minimum, temperature,
top-p, seed: `Decoding`), and the text leaves as it is produced: after each step, the new
text of every streamed request is published as a token event, and a request whose answer
is no longer wanted stops (its engine slot is freed at once; in transformers' batch its row
stops).  Both paths keep an engine `Sequence` per request, the record of what it produced.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer

from rag.config import ModelConfig
from rag.service.detokenize import TextStream
from rag.service.engine.engine import GREEDY_BELOW, Engine, Sampling, Sequence, TokenChooser
from rag.service.events import Event, Kind, Publish
from rag.service.questions import Decoding, Question

PREFIX_MARK = "\x00ragbench-user\x00"  # stands in for the user turn when finding the prefix
FINISH_REASONS = {"eos": "stop", "length": "length", "cancelled": "cancelled"}


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    new_tokens: int
    finish_reason: str = "length"  # stop (EOS) | length | cancelled
    first_token_at: float = 0.0  # time.perf_counter() when its first token was chosen
    last_token_at: float = 0.0


@dataclass(eq=False)
class Output:
    """One request's generation on its way out: its sequence, its text so far, and how many
    of its tokens have been turned into text."""

    question: Question
    sequence: Sequence
    text: TextStream
    read: int = 0

    def new_text(self) -> str:
        """The text its tokens since the last call add (the last piece too, once done)."""
        piece = self.text.add(self.sequence.tokens[self.read :])
        self.read = len(self.sequence.tokens)
        if self.sequence.finish:
            piece += self.text.close()
        return piece

    def generation(self) -> Generation:
        self.new_text()
        s = self.sequence
        return Generation(
            self.text.text, len(s.prompt), len(s.tokens), FINISH_REASONS.get(s.finish, "length"),
            s.first_token_at, s.last_token_at,
        )  # fmt: skip


def token_events(outputs: list[Output]) -> list[Event]:
    """A token event for each streamed request whose text grew this step."""
    events = []
    for output in outputs:
        if output.question.stream and (piece := output.new_text()):
            payload = {"text": piece, "tokens": len(output.sequence.tokens)}
            events.append(Event(output.question.id, Kind.TOKEN, payload))
    return events


class Generator:
    """Greedy by default so answers are reproducible; sampling when a request's (or the
    configuration's) temperature is > 0."""

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
        # transformers' path chooses tokens as the engine does, with a chooser of its own
        self.chooser = TokenChooser(cfg.temperature, cfg.top_p, cfg.seed)

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

    def decode(self, tokens: list[int]) -> str:
        """Text as it is streamed: no special tokens, and no clean-up of spaces (which could
        change text already sent when the next token arrives)."""
        return self.tokenizer.decode(
            tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )

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

    def sequence(
        self,
        prompt_ids: list[int],
        max_new_tokens: int | None = None,
        decoding: Decoding | None = None,
    ) -> Sequence:
        """An engine sequence for one encoded prompt, with a request's settings, or this
        configuration's (and `max_new_tokens` when given)."""
        d = decoding or Decoding.configured(self.cfg, max_new_tokens)
        return Sequence(prompt_ids, d.max_tokens, d.min_tokens, sampling=sampling_of(d))

    def output(self, question: Question, prompt_ids: list[int]) -> Output:
        """What follows one question's generation, its sequence made for the engine."""
        sequence = self.sequence(prompt_ids, decoding=question.decoding)
        return Output(question, sequence, TextStream(self.decode))

    def generate(
        self,
        prompts: list[str],
        questions: list[Question] | None = None,
        publish: Publish | None = None,
    ) -> list[Generation]:
        """Each prompt's answer, generated with its question's settings (the configured
        ones when no questions are given); token events of streamed questions go to
        `publish` after each step."""
        if self.engine is None:
            return self.generate_with_transformers(prompts, questions, publish)
        engine = self.engine
        outputs = self._outputs(prompts, questions)

        def after_step() -> None:
            for output in outputs:
                if output.question.cancelled and not output.sequence.finish:
                    engine.cancel(output.sequence)
            if publish is not None and (events := token_events(outputs)):
                publish(events)

        engine.generate([o.sequence for o in outputs], after_step)
        return [o.generation() for o in outputs]

    def _outputs(self, prompts: list[str], questions: list[Question] | None) -> list[Output]:
        if questions is None:
            questions = [Question(p, 0, Decoding.configured(self.cfg)) for p in prompts]
        encoded = self.encode(prompts)
        return [self.output(q, ids) for q, ids in zip(questions, encoded, strict=True)]

    @torch.inference_mode()
    def generate_with_transformers(
        self,
        prompts: list[str],
        questions: list[Question] | None = None,
        publish: Publish | None = None,
    ) -> list[Generation]:
        """transformers' `generate` over one left-padded batch, each row held to its own
        settings by a logits processor and a stopping criterion, its tokens read by a
        streamer."""
        outputs = self._outputs(prompts, questions)
        batch = self.tokenizer(
            prompts,
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=self.cfg.max_prompt_tokens,
            add_special_tokens=not self.tokenizer.chat_template,
            return_token_type_ids=False,
        ).to(self.model.device)
        rows = _Rows(outputs, batch["input_ids"].shape[1], self.eos_token_id, self.chooser)
        self.model.generate(
            **batch,
            max_new_tokens=max(o.sequence.max_new_tokens for o in outputs),
            eos_token_id=self.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            do_sample=False,  # the chooser samples, each row as its request says
            temperature=None,
            top_p=None,
            top_k=None,
            logits_processor=LogitsProcessorList([_ChooseRows(rows)]),
            stopping_criteria=StoppingCriteriaList([_StopRows(rows)]),
            streamer=_StreamRows(rows, publish),
        )
        return [o.generation() for o in outputs]


def sampling_of(decoding: Decoding) -> Sampling:
    generator = None if decoding.seed is None else torch.Generator().manual_seed(decoding.seed)
    return Sampling(decoding.temperature, decoding.top_p, generator)


@dataclass
class _Rows:
    """The rows of one transformers batch: their outputs, where their new tokens start."""

    outputs: list[Output]
    prompt_width: int
    eos_token_id: int
    chooser: TokenChooser


class _ChooseRows(LogitsProcessor):
    """Each row's next token as the engine would choose it (EOS held back before the row's
    minimum, sampled with the row's own settings); generate's argmax then takes it."""

    def __init__(self, rows: _Rows) -> None:
        self.rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        sequences = [o.sequence for o in self.rows.outputs]
        made = input_ids.shape[1] - self.rows.prompt_width
        early = [i for i, s in enumerate(sequences) if made < s.min_new_tokens]
        if early:
            scores[early, self.rows.eos_token_id] = float("-inf")
        samplings = [s.sampling for s in sequences]
        default = self.rows.chooser.default
        if not any((s or default).temperature > GREEDY_BELOW for s in samplings):
            return scores
        chosen = self.rows.chooser(scores, samplings)
        only = torch.full_like(scores, float("-inf"))
        only[torch.arange(len(chosen)), torch.tensor(chosen)] = 0.0
        return only


class _StopRows(StoppingCriteria):
    """A row stops at its own token limit, or when its answer is no longer wanted."""

    def __init__(self, rows: _Rows) -> None:
        self.rows = rows

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs
    ) -> torch.BoolTensor:
        made = input_ids.shape[1] - self.rows.prompt_width
        stop = [
            made >= o.sequence.max_new_tokens or o.question.cancelled for o in self.rows.outputs
        ]
        return torch.tensor(stop, device=input_ids.device)


class _StreamRows(BaseStreamer):
    """Each step's tokens into the rows' sequences (a finished row's padding ignored), then
    the streamed rows' new text published."""

    def __init__(self, rows: _Rows, publish: Publish | None) -> None:
        self.rows = rows
        self.publish = publish
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate's first call hands over the prompts
            self.prompt_seen = True
            return
        now = time.perf_counter()
        for output, token in zip(self.rows.outputs, value.tolist(), strict=True):
            sequence = output.sequence
            if sequence.finish:
                continue
            if output.question.cancelled:
                sequence.finish = "cancelled"
                continue
            if not sequence.tokens:
                sequence.first_token_at = now
            sequence.last_token_at = now
            sequence.tokens.append(token)
            if token == self.rows.eos_token_id:
                sequence.finish = "eos"
            elif len(sequence.tokens) >= sequence.max_new_tokens:
                sequence.finish = "length"
        if self.publish is not None and (events := token_events(self.rows.outputs)):
            self.publish(events)

    def end(self) -> None:
        for output in self.rows.outputs:
            output.sequence.finish = output.sequence.finish or "length"
