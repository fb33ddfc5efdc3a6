"""The HTTP guards on their own: strict JSON, short excerpts, the JSON content type, the
open-files limit, and what the guard takes from uvicorn and httptools that is not their
public API (each check fails the day it changes)."""

from __future__ import annotations

import asyncio
import inspect
import json
import resource
import subprocess
import sys

import httptools
import pytest
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from rag.cluster.balancer import QuietServer
from rag.web import (
    BadJSON,
    ConnectionGuard,
    NotJSON,
    connection_cap,
    excerpt,
    parse_json,
    raise_open_files_limit,
    require_json,
)


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


def test_the_open_files_limit_is_raised_to_the_hard_limit():
    """In a fresh interpreter started with a low soft limit, as a shell's default is."""
    code = (
        "import resource\n"
        "from rag.web import raise_open_files_limit\n"
        "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))\n"
        "print(raise_open_files_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    reported, soft, hard = (int(n) for n in run.stdout.split())
    assert reported == soft > 256
    assert soft == hard or hard == resource.RLIM_INFINITY


def test_the_connection_cap_follows_the_open_files_limit():
    files = raise_open_files_limit()
    assert connection_cap(7, files_per_connection=2) == 7  # as configured
    derived = connection_cap(0, files_per_connection=1)
    assert files // 2 < derived < files  # most of the files, with headroom
    assert connection_cap(0, files_per_connection=2) == derived // 2


# --- what the guard relies on in uvicorn and httptools ----------------------------------


def guarded_protocol() -> HttpToolsProtocol:
    """The guarded protocol as uvicorn makes it for a connection."""

    async def app(scope, receive, send) -> None:
        pass

    config = uvicorn.Config(app, http=ConnectionGuard(4, 1.0).protocol(), log_config=None)
    config.load()
    loop = asyncio.new_event_loop()
    try:
        return config.http_protocol_class(config=config, server_state=ServerState(),
                                          app_state={}, _loop=loop)  # fmt: skip
    finally:
        loop.close()


def test_uvicorn_runs_the_guard_class_it_is_given():
    protocol = guarded_protocol()
    assert isinstance(protocol, HttpToolsProtocol)
    assert callable(protocol.app)  # replaced per request for the 503 over the cap
    assert protocol.loop is not None


def test_the_httptools_protocol_still_has_what_the_guard_overrides():
    """Methods the guard extends; their signatures as the guard calls them."""
    expected = {
        "connection_made": ["self", "transport"],
        "connection_lost": ["self", "exc"],
        "data_received": ["self", "data"],
        "on_url": ["self", "url"],
        "on_header": ["self", "name", "value"],
        "on_headers_complete": ["self"],
        "on_message_complete": ["self"],
        "on_response_complete": ["self"],
        "send_400_response": ["self", "msg"],
    }
    for name, parameters in expected.items():
        method = getattr(HttpToolsProtocol, name)
        assert list(inspect.signature(method).parameters) == parameters, name


def test_uvicorn_handles_a_parser_error_by_calling_send_400_response():
    """The guard finds the parser's error in sys.exc_info() inside send_400_response."""
    source = inspect.getsource(HttpToolsProtocol.data_received)
    assert "except httptools.HttpParserError" in source
    assert "self.send_400_response(" in source
    assert "self.parser.feed_data(data)" in source


def test_httptools_keeps_a_callbacks_exception_as_the_errors_context():
    """A limit raised in on_header reaches send_400_response as the error's context."""

    class Refusing:
        def on_header(self, name: bytes, value: bytes) -> None:
            raise LookupError("refused")

    parser = httptools.HttpRequestParser(Refusing())
    with pytest.raises(httptools.HttpParserCallbackError) as raised:
        parser.feed_data(b"GET / HTTP/1.1\r\nA: b\r\n\r\n")
    assert isinstance(raised.value.__context__, LookupError)


def test_uvicorns_server_still_has_the_hooks_the_balancer_uses():
    """The balancer serves with signals left to its process and stops by should_exit."""
    assert "capture_signals" in vars(uvicorn.Server)
    server = QuietServer(uvicorn.Config(lambda scope, receive, send: None))
    assert server.started is False and server.should_exit is False
    with server.capture_signals():
        pass
