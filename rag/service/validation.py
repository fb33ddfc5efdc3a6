"""What counts as a valid query, in one place for the server (422s) and the pipeline.

Checked before a request is queued, so bad input never occupies a batch slot.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from rag.web import excerpt

# C0/C1 control characters except tab, newline and carriage return (ordinary in pasted
# text), and unpaired surrogates, which is what invalid UTF-8 escapes decode to.
CONTROLS = "\\x00-\\x08\\x0b\\x0c\\x0e-\\x1f\\x7f-\\x9f"
CONTROL = re.compile(f"[{CONTROLS}]")
SURROGATE = re.compile("[\ud800-\udfff]")
# The query rules as a JSON-schema pattern, for the OpenAPI document: no control character
# and at least one character that is not whitespace.  (A lone surrogate cannot be sent as
# UTF-8 at all, only as a JSON escape.)
QUERY_PATTERN = f"^[^{CONTROLS}]*[^{CONTROLS}\\s][^{CONTROLS}]*$"
JSON_TYPES = {dict: "an object", list: "an array", bool: "a boolean", int: "a number",
              float: "a number", type(None): "null", str: "a string"}  # fmt: skip


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


def read_request(body: object, k_default: int, limits: QueryLimits) -> tuple[str, int]:
    """(query, k) from a parsed JSON body, or QueryRejected naming every problem."""
    if not isinstance(body, dict):
        raise QueryRejected(
            f'the body must be a JSON object like {{"query": "...", "k": 2}}, '
            f"not {JSON_TYPES.get(type(body), 'that')}"
        )
    query, k = body.get("query"), body.get("k", k_default)
    if isinstance(k, float) and k.is_integer():  # JSON has one number type: 4.0 is 4
        k = int(k)
    if problems := find_problems(query, k, limits):
        raise QueryRejected("; ".join(p.message for p in problems))
    return query, k  # type: ignore[return-value]


def find_problems(query: object, k: object, limits: QueryLimits) -> list[Problem]:
    """Every reason (query, k) cannot be answered; empty when it can.  Messages quote the
    input only in part."""
    problems = []
    if query is None:
        problems.append(Problem("query", "query is required (a non-empty string)"))
    elif not isinstance(query, str):
        kind = JSON_TYPES.get(type(query), type(query).__name__)
        problems.append(Problem("query", f"query must be a string, not {kind}"))
    elif not query.strip():
        problems.append(Problem("query", "query must not be empty or whitespace only"))
    elif len(query) > limits.max_chars:
        problems.append(
            Problem("query", f"query is {len(query)} characters; the limit is {limits.max_chars}")
        )
    elif bad := _first_bad_character(query):
        problems.append(Problem("query", f"query contains {bad}"))
    if isinstance(k, bool) or not isinstance(k, int):
        problems.append(Problem("k", f"k must be an integer, got {excerpt(k)}"))
    elif not 1 <= k <= limits.k_upper:
        problems.append(Problem("k", f"k must be between 1 and {limits.k_upper}, got {excerpt(k)}"))
    return problems


def _first_bad_character(text: str) -> str | None:
    if match := CONTROL.search(text):
        return f"control character U+{ord(match.group()):04X} at position {match.start()}"
    if match := SURROGATE.search(text):
        code = ord(match.group())
        return f"unpaired surrogate U+{code:04X} at position {match.start()} (invalid UTF-8)"
    return None
