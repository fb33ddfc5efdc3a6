"""A step-level generation engine: sequences enter free KV slots, decode together one
token per step, and leave at EOS or their token limit.

`step()` is one iteration: one forward pass that prefills some waiting sequences (packed,
up to a token budget) into free slots and decodes one token for every running slot.  A
batch of prompts (`generate`) and a server that admits requests between steps (continuous
batching) both drive it; neither waits for the longest sequence to finish before a slot is reused.

A shared prompt prefix (the system prompt and the chat template's opening) can be computed
once and copied into each new slot, so prefill reads only what differs.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from rag.service.engine.runner import SlotModel


@dataclass(eq=False)
class Sequence:
    """One prompt's generation: what was asked, what came out, and why it stopped."""

    prompt: list[int]
    max_new_tokens: int
    min_new_tokens: int = 0  # EOS is not chosen before this many tokens
    tokens: list[int] = field(default_factory=list)
    finish: str = ""  # "" while running; eos | length | cancelled
    slot: int = -1  # -1 while waiting or done
    cached: int = 0  # positions of this sequence in its slot
    queued_at: float = field(default_factory=time.perf_counter)
    first_token_at: float = 0.0
    last_token_at: float = 0.0
    sampling: Sampling | None = None  # None: the engine's own chooser settings


GREEDY_BELOW = 1e-5  # a temperature this low chooses as greedy does (as vLLM's)


@dataclass(frozen=True)
class Sampling:
    """How one sequence's tokens are chosen: greedy at temperature 0, else sampled
    (temperature, then top-p) from `generator` (a request's own seed: its tokens do not
    depend on its batch companions' draws), or from the engine's when None."""

    temperature: float = 0.0
    top_p: float = 1.0
    generator: torch.Generator | None = None


@dataclass
class StepReport:
    """What one step did, for metrics: prompts prefilled, rows decoded, sequences done."""

    prefilled: int = 0
    prefill_tokens: int = 0
    decoded: int = 0
    finished: list[Sequence] = field(default_factory=list)


class TokenChooser:
    """Greedy by default; a row whose sampling has a temperature is sampled (temperature,
    then top-p), from its own generator or this chooser's seeded one, so a run is
    reproducible."""

    def __init__(self, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> None:
        self.default = Sampling(temperature, top_p)
        self.rng = torch.Generator().manual_seed(seed)

    def __call__(
        self, logits: torch.Tensor, samplings: Seq[Sampling | None] | None = None
    ) -> list[int]:
        """One token per row of `logits` [rows, vocab], each row as its sampling says."""
        logits = logits.float()
        chosen = logits.argmax(dim=-1).tolist()
        for row, sampling in enumerate(samplings or [None] * len(chosen)):
            sampling = sampling or self.default
            if sampling.temperature > GREEDY_BELOW:
                chosen[row] = self._sample(logits[row : row + 1], sampling)
        return chosen

    def _sample(self, logits: torch.Tensor, sampling: Sampling) -> int:
        logits = TemperatureLogitsWarper(sampling.temperature)(None, logits)
        if sampling.top_p < 1.0:
            logits = TopPLogitsWarper(sampling.top_p)(None, logits)
        probabilities = logits.softmax(dim=-1).cpu()
        return int(torch.multinomial(probabilities, 1, generator=sampling.generator or self.rng))


class Engine:
    def __init__(
        self,
        model: SlotModel,
        eos_token_id: int,
        chooser: TokenChooser | None = None,
        max_prefill_tokens: int = 2048,
    ) -> None:
        self.model = model
        self.eos_token_id = eos_token_id
        self.choose = chooser or TokenChooser()
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.active: list[Sequence] = []  # active[i].slot == i
        self.prefix: list[int] = []
        self._prefix_kv: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def slots(self) -> int:
        return self.model.cache.slots

    @property
    def positions(self) -> int:
        return self.model.cache.positions

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.active)

    def set_shared_prefix(self, tokens: Seq[int]) -> None:
        """Compute the keys of a prefix most prompts start with, once; later prompts that
        start with it prefill only the rest."""
        if self.busy:
            raise RuntimeError("the shared prefix is set while no sequence runs")
        self.prefix, self._prefix_kv = [], None
        if len(tokens) < 2:
            return
        self.model.prefill([(0, list(tokens), 0)])
        self._prefix_kv = self.model.cache.read(0, len(tokens))
        self.prefix = list(tokens)

    def submit(self, sequence: Sequence) -> Sequence:
        if not sequence.prompt:
            raise ValueError("an empty prompt has no next token")
        if len(sequence.prompt) + sequence.max_new_tokens > self.positions:
            raise ValueError(
                f"{len(sequence.prompt)} prompt tokens + {sequence.max_new_tokens} new exceed "
                f"the {self.positions} positions of a slot"
            )
        self.waiting.append(sequence)
        return sequence

    def cancel(self, sequence: Sequence) -> None:
        """Stop a sequence now; its slot is free for the next step."""
        if sequence.finish:
            return
        sequence.finish = "cancelled"
        if sequence.slot < 0:
            self.waiting.remove(sequence)
        else:
            self._release([sequence])

    def generate(
        self, sequences: list[Sequence], after_step: Callable[[], None] | None = None
    ) -> list[Sequence]:
        """Run every sequence to its end, as many at a time as there are slots; `after_step`
        (which may cancel sequences) is called after each step."""
        for sequence in sequences:
            self.submit(sequence)
        while any(not s.finish for s in sequences):
            self.step()
            if after_step is not None:
                after_step()
        return sequences

    @torch.inference_mode()
    def step(self) -> StepReport:
        """Prefill what fits of the waiting sequences and decode every running one once,
        in one forward pass; a newcomer's first token comes from its prefill."""
        report = StepReport()
        running = list(self.active)
        admitted = self._admit()
        if not running and not admitted:
            return report
        feeds = []
        for sequence in admitted:
            past = self._reuse_prefix(sequence)
            feeds.append((sequence.slot, sequence.prompt[past:], past))
            sequence.cached = len(sequence.prompt)
        report.prefilled = len(admitted)
        report.prefill_tokens = sum(len(ids) for _, ids, _ in feeds)
        report.decoded = len(running)
        logits = self.model.step(
            feeds, [s.tokens[-1] for s in running], [s.cached for s in running]
        )
        for sequence in running:
            sequence.cached += 1
        self._advance(admitted + running, logits, report)
        return report

    def _admit(self) -> list[Sequence]:
        admitted: list[Sequence] = []
        budget = self.max_prefill_tokens
        while self.waiting and len(self.active) < self.slots:
            cost = len(self.waiting[0].prompt)
            if admitted and cost > budget:
                break
            sequence = self.waiting.popleft()
            sequence.slot = len(self.active)
            self.active.append(sequence)
            admitted.append(sequence)
            budget -= cost
        return admitted

    def _reuse_prefix(self, sequence: Sequence) -> int:
        """Copy the shared prefix into the sequence's slot if its prompt starts with it
        (and goes on past it); the positions reused."""
        size = len(self.prefix)
        if not size or len(sequence.prompt) <= size or sequence.prompt[:size] != self.prefix:
            return 0
        assert self._prefix_kv is not None
        self.model.cache.write(sequence.slot, *self._prefix_kv)
        return size

    def _advance(self, sequences: list[Sequence], logits: torch.Tensor, report: StepReport) -> None:
        """Choose each sequence's next token; release those that ended."""
        early = [i for i, s in enumerate(sequences) if len(s.tokens) < s.min_new_tokens]
        if early:
            logits[early, self.eos_token_id] = float("-inf")
        done = []
        now = time.perf_counter()
        chosen = self.choose(logits, [s.sampling for s in sequences])
        for sequence, token in zip(sequences, chosen, strict=True):
            if not sequence.tokens:
                sequence.first_token_at = now
            sequence.last_token_at = now
            sequence.tokens.append(token)
            if token == self.eos_token_id:
                sequence.finish = "eos"
            elif len(sequence.tokens) >= sequence.max_new_tokens:
                sequence.finish = "length"
            if sequence.finish:
                done.append(sequence)
        self._release(done)
        report.finished.extend(done)

    def _release(self, leaving: list[Sequence]) -> None:
        """Free the slots of sequences that ended, keeping the active ones in slots 0..n-1:
        the last active sequence moves into each hole."""
        for sequence in sorted(leaving, key=lambda s: s.slot, reverse=True):
            hole = sequence.slot
            sequence.slot = -1
            last = self.active.pop()
            if last is not sequence:
                self.model.cache.move(last.slot, hole, last.cached)
                last.slot = hole
                self.active[hole] = last
