"""What counts as a valid query, in one place for the server (422s) and the pipeline.

Checked before a request is queued, so bad input never occupies a batch slot.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# C0/C1 control characters except tab, newline and carriage return (ordinary in pasted
# text), and unpaired surrogates, which is what invalid UTF-8 escapes decode to.
CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
SURROGATE = re.compile("[\ud800-\udfff]")


class QueryRejected(ValueError):
    """One query of a batch could not be answered; the others still are."""


@dataclass(frozen=True)
class QueryLimits:
    max_chars: int
    k_max: int
    corpus_size: int

    @property
    def k_upper(self) -> int:
        return min(self.k_max, self.corpus_size)


@dataclass(frozen=True)
class Problem:
    field: str
    message: str


def find_problems(query: object, k: object, limits: QueryLimits) -> list[Problem]:
    """Every reason (query, k) cannot be answered; empty when it can."""
    problems = []
    if not isinstance(query, str):
        problems.append(Problem("query", "query must be a string"))
    elif not query.strip():
        problems.append(Problem("query", "query must not be empty or whitespace only"))
    elif len(query) > limits.max_chars:
        problems.append(
            Problem("query", f"query is {len(query)} characters; the limit is {limits.max_chars}")
        )
    elif bad := _first_bad_character(query):
        problems.append(Problem("query", f"query contains {bad}"))
    if isinstance(k, bool) or not isinstance(k, int):
        problems.append(Problem("k", "k must be an integer"))
    elif not 1 <= k <= limits.k_upper:
        problems.append(Problem("k", f"k must be between 1 and {limits.k_upper}, got {k}"))
    return problems


def _first_bad_character(text: str) -> str | None:
    if match := CONTROL.search(text):
        return f"control character U+{ord(match.group()):04X} at position {match.start()}"
    if match := SURROGATE.search(text):
        code = ord(match.group())
        return f"unpaired surrogate U+{code:04X} at position {match.start()} (invalid UTF-8)"
    return None
