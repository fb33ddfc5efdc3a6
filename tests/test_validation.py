"""What a valid request is: the checks the server runs, and the pattern the OpenAPI
document states for the same rules."""

from __future__ import annotations

import re
import sys

import pytest

from rag.service.validation import (
    QUERY_PATTERN,
    QueryLimits,
    QueryRejected,
    find_problems,
    read_request,
)

LIMITS = QueryLimits(max_chars=50, k_max=10, corpus_size=7)


def test_the_documented_pattern_agrees_with_the_checks_for_every_character():
    pattern = re.compile(QUERY_PATTERN)
    disagreements = []
    for code in range(sys.maxunicode + 1):
        char = chr(code)
        if 0xD800 <= code <= 0xDFFF:
            continue  # a lone surrogate cannot be sent as UTF-8, only as a JSON escape
        for query in (char, f"a{char}b", f" {char} "):
            documented = pattern.search(query) is not None
            checked = not find_problems(query, 1, LIMITS)
            if documented != checked:
                disagreements.append((hex(code), query))
    assert not disagreements[:10]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"query": "hi"}, ("hi", 2)),
        ({"query": "hi", "k": 7}, ("hi", 7)),
        ({"query": "hi", "k": 4.0}, ("hi", 4)),  # JSON has one number type
        ({"query": "hi", "k": 1, "extra": [1, 2]}, ("hi", 1)),
    ],
)
def test_valid_bodies(body, expected):
    assert read_request(body, 2, LIMITS) == expected


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ([{"query": "hi"}], "must be a JSON object"),
        ("hi", "must be a JSON object"),
        ({}, "query is required"),
        ({"query": None}, "query is required"),
        ({"query": {"a": 1}}, "query must be a string, not an object"),
        ({"query": "hi", "k": 8}, "between 1 and 7, got 8"),  # capped by the corpus
        ({"query": "hi", "k": 2.5}, "k must be an integer, got 2.5"),
        ({"query": "hi", "k": True}, "k must be an integer, got True"),
        ({"query": "x" * 51}, "51 characters; the limit is 50"),
        ({"query": "", "k": 0}, "whitespace only; k must be between 1 and 7, got 0"),
    ],
)
def test_invalid_bodies_say_why(body, says):
    with pytest.raises(QueryRejected) as rejected:
        read_request(body, 2, LIMITS)
    assert says in str(rejected.value)
