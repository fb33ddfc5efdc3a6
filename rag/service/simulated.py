"""`model=simulated`: an embedder and a generator that sleep instead of computing.

Scaling experiments need replicas whose service time behaves like a model's (a fixed cost
per batch plus a cost per request) without competing for the machine's cores: N real
replicas on two cores cannot add throughput, N sleeping ones can.  With a device lock,
replicas sleep one at a time, as replicas sharing one device would compute.  Retrieval stays real
(FAISS over hashed bag-of-words vectors, so related words still find related documents),
and nothing here imports torch.  Answers say `simulated`; they are never a performance
claim about a model.

    python -m rag.service.simulated fit outputs/bench/<pipeline record>.json

fits the cost model to a recorded pipeline benchmark (batch size -> seconds per batch) and
prints the overrides that make the simulated model mimic the measured one.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rag.config import ModelConfig, SimulatedCost
from rag.service.events import Event, Kind, Publish
from rag.service.questions import Decoding, Question

SIMULATED = "simulated"  # the generator/embedder source that selects this module
DIM = 256
WORD = re.compile(r"\w+")


def is_simulated(source: str) -> bool:
    return source == SIMULATED


def cost_of(cfg: ModelConfig) -> SimulatedCost:
    if cfg.simulated is None:
        raise ValueError("a simulated model needs model.simulated costs (see model=simulated)")
    return cfg.simulated


def _sleep_ms(fixed_ms: float, per_query_ms: float, batch: int, device_lock: str) -> None:
    """The batch's simulated time; with a device lock, holding the device all along."""
    seconds = max(0.0, fixed_ms + per_query_ms * batch) / 1e3
    if not device_lock:
        time.sleep(seconds)
        return
    with open(device_lock, "a") as device:
        fcntl.flock(device, fcntl.LOCK_EX)  # released when the file closes
        time.sleep(seconds)


@dataclass(frozen=True)
class SimulatedGeneration:
    text: str
    prompt_tokens: int
    new_tokens: int
    finish_reason: str = "length"
    first_token_at: float = 0.0
    last_token_at: float = 0.0


class SimulatedEmbedder:
    """Hashed bag-of-words unit vectors.  Queries cost the configured time; documents are
    embedded for free (indexing happens once at start-up, outside the cost model)."""

    def __init__(self, cfg: ModelConfig) -> None:
        self.cost = cost_of(cfg)
        self.identity = f"{SIMULATED}|hashed-bow-{DIM}"  # with the two below: the cache key
        self.doc_prefix = ""
        self.max_tokens = 0  # no token limit: every word counts

    @property
    def dim(self) -> int:
        return DIM

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        c = self.cost
        _sleep_ms(c.embed_fixed_ms, c.embed_per_query_ms, len(texts), c.device_lock)
        return self._vectors(texts)

    def embed_documents(self, texts: Sequence[str]) -> np.ndarray:
        return self._vectors(texts)

    def _vectors(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), DIM), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in WORD.findall(text.lower()):
                digest = hashlib.blake2b(word.encode(), digest_size=4).digest()
                out[row, int.from_bytes(digest, "little") % DIM] += 1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        out[:, 0] += (norms[:, 0] == 0).astype(np.float32)  # no words: still a unit vector
        return out / np.linalg.norm(out, axis=1, keepdims=True)


class SimulatedGenerator:
    """Sleeps `generate_fixed_ms + batch x generate_per_query_ms` per batch and answers a
    labelled placeholder; prompt tokens are counted as words.  It has no sampling: a
    request's temperature, top-p and seed change nothing."""

    def __init__(self, cfg: ModelConfig) -> None:
        self.cfg = cfg
        self.cost = cost_of(cfg)

    def render(self, system: str, user: str) -> str:
        return f"{system}\n\n{user}\n\nAnswer:"

    def truncate(self, text: str, max_tokens: int) -> str:
        words = text.split()
        return text if len(words) <= max_tokens else " ".join(words[:max_tokens])

    def generate(
        self,
        prompts: list[str],
        questions: list[Question] | None = None,
        publish: Publish | None = None,
    ) -> list[SimulatedGeneration]:
        """The batch's cost slept in one step per token of its longest answer; each answer
        has its question's `max_tokens` tokens, one word each: a labelled placeholder, then
        a "." per further token.  A streamed question's words leave as token events, one a
        step; the batch stops early once every question in it is cancelled."""
        if questions is None:
            questions = [Question(p, 0, Decoding.configured(self.cfg)) for p in prompts]
        steps = max(q.decoding.max_tokens for q in questions)
        c = self.cost
        total_ms = c.generate_fixed_ms + c.generate_per_query_ms * len(prompts)
        words = f"[simulated answer after {len(prompts)}-request batch]".split(" ")
        words += ["."] * (steps - len(words))
        made = [0] * len(questions)
        first = last = 0.0
        for step in range(1, steps + 1):
            if all(q.cancelled for q in questions):
                break
            _sleep_ms(total_ms / steps, 0.0, 0, c.device_lock)
            last = time.perf_counter()
            first = first or last
            events = []
            for row, question in enumerate(questions):
                if question.cancelled or step > question.decoding.max_tokens:
                    continue
                made[row] = step
                if question.stream:
                    piece = ("" if step == 1 else " ") + words[step - 1]
                    events.append(Event(question.id, Kind.TOKEN, {"text": piece, "tokens": step}))
            if events and publish is not None:
                publish(events)
        return [
            SimulatedGeneration(
                " ".join(words[: made[row]]),
                min(len(prompt.split()), self.cfg.max_prompt_tokens),
                made[row],
                "cancelled" if question.cancelled else "length",
                first,
                last,
            )
            for row, (prompt, question) in enumerate(zip(prompts, questions, strict=True))
        ]

    def describe(self) -> dict[str, str | float]:
        c = self.cost
        return {
            "device": SIMULATED,
            "dtype": SIMULATED,
            "cost_model": (
                f"embed {c.embed_fixed_ms:g} + {c.embed_per_query_ms:g}/query ms, "
                f"generate {c.generate_fixed_ms:g} + {c.generate_per_query_ms:g}/query ms"
            ),
            "fitted_from": c.fitted_from,
            "shared_device": bool(c.device_lock),
        }


def fit_line(batches: Sequence[float], seconds: Sequence[float]) -> tuple[float, float]:
    """Least-squares `seconds = fixed + per_query x batch`, both clipped at zero (ms)."""
    if len(set(batches)) < 2:
        raise ValueError("fitting needs measurements at two batch sizes or more")
    per_query, fixed = np.polyfit(np.asarray(batches, float), np.asarray(seconds, float), 1)
    return max(0.0, float(fixed) * 1e3), max(0.0, float(per_query) * 1e3)


def measurements(record: object) -> list[dict]:
    """The rows of a pipeline record that say how long a batch took: dicts with `batch`
    and `seconds`, wherever they sit in the record (its layout may grow)."""
    if isinstance(record, dict):
        if "batch" in record and "seconds" in record:
            return [record]
        return [row for value in record.values() for row in measurements(value)]
    if isinstance(record, list):
        return [row for value in record for row in measurements(value)]
    return []


def fit_record(path: Path, dtype: str = "") -> list[str]:
    """Overrides that make model=simulated cost what the recorded pipeline measured.  The
    whole batch time goes to generation (the embedding share is small and stays as set)."""
    rows = measurements(json.loads(path.read_text()))
    if dtype:
        rows = [r for r in rows if r.get("dtype") in (None, dtype)]
    if not rows:
        raise ValueError(f"{path}: no rows with 'batch' and 'seconds'")
    fixed_ms, per_query_ms = fit_line([r["batch"] for r in rows], [r["seconds"] for r in rows])
    return [
        f"model.simulated.generate_fixed_ms={fixed_ms:.1f}",
        f"model.simulated.generate_per_query_ms={per_query_ms:.2f}",
        f"model.simulated.fitted_from={path.name}",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fit model=simulated to a pipeline record.")
    sub = parser.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("fit", help="print the overrides fitted to a pipeline bench record")
    fit.add_argument("record", type=Path)
    fit.add_argument("--dtype", default="", help="use only rows of this dtype (e.g. bfloat16)")
    args = parser.parse_args(argv)
    try:
        print(" ".join(fit_record(args.record, args.dtype)))
    except (OSError, ValueError) as exc:
        print(f"cannot fit {args.record}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
