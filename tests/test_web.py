"""The HTTP guards on their own: strict JSON, short excerpts, the JSON content type."""

from __future__ import annotations

import json

import pytest

from rag.web import BadJSON, ConnectionGuard, NotJSON, excerpt, parse_json, require_json


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b'{"query": "hi", "k": 1e309}', "'1e309' is out of range"),
        (b'{"query": "hi", "k": -1e999}', "'-1e999' is out of range"),
        (b'{"query": "hi", "extra": [[-1e999]]}', "out of range"),
        (b'{"query": "hi", "k": NaN}', "NaN is not a JSON number"),
        (b'{"query": "hi", "k": Infinity}', "Infinity is not a JSON number"),
        (b'{"query": "hi", "k": -Infinity}', "-Infinity is not a JSON number"),
        (b'{"query": "\xff"}', "not UTF-8"),
        (b"[" * 100_000, "nests too deeply"),
        (b'{"k": ' + b"9" * 5000 + b"}", "not valid JSON"),
        (b"{not json", "not valid JSON"),
        (b"", "not valid JSON"),
    ],
)
def test_bad_json_is_refused_with_a_reason(body, says):
    with pytest.raises(BadJSON, match=says.replace("[", r"\[")) as refused:
        parse_json(body)
    assert len(str(refused.value)) < 200


def test_good_json_parses_as_usual():
    assert parse_json(b'{"query": "h\\u00e9", "k": 2, "x": [1.5e300, -0.0]}') == {
        "query": "hé",
        "k": 2,
        "x": [1.5e300, -0.0],
    }


def test_excerpts_stay_short_whatever_the_input():
    for value in ("x" * 10**6, 10**4000, list(range(10**5)), {"a": [[[[1]]]]}, b"y" * 10**5):
        assert len(excerpt(value)) <= 60
    assert excerpt("short") == "'short'"
    assert json.loads(json.dumps(excerpt(float("inf")))) == "inf"  # always serialisable


JSON_TYPES = [
    "application/json",
    "application/json; charset=utf-8",
    "Application/JSON",
    "application/merge-patch+json",
]


@pytest.mark.parametrize("content_type", JSON_TYPES)
def test_json_media_types_are_accepted(content_type):
    require_json(content_type)


@pytest.mark.parametrize(
    "content_type", [None, "", "text/plain", "application/x-www-form-urlencoded", "json"]
)
def test_other_media_types_are_refused(content_type):
    with pytest.raises(NotJSON, match="application/json"):
        require_json(content_type)


def test_connection_guard_limits_must_make_sense():
    with pytest.raises(ValueError):
        ConnectionGuard(max_connections=0, head_timeout_s=1)
    with pytest.raises(ValueError):
        ConnectionGuard(max_connections=10, head_timeout_s=0)
