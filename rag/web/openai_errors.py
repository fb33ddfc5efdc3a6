"""OpenAI's error format on `/v1/`: `{"error": {"message", "type", "param", "code"}}`, at
both doors.  The routes there answer it themselves; `OpenAIErrors` turns every other error
under `/v1/` (a body too large or too slow, an unknown path, overload, a replica that
failed) from the one `{"detail"}` format into it, so an OpenAI client always finds it."""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import JSONResponse

from rag.web.asgi import ASGIApp, Message, Receive, Scope, Send

# status -> (type, code), after OpenAI's and vLLM's own answers
KINDS: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    408: ("invalid_request_error", "request_timeout"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "unsupported_media_type"),
    422: ("invalid_request_error", None),
    429: ("rate_limit_error", "overloaded"),
    500: ("server_error", None),
    502: ("server_error", "bad_gateway"),
    503: ("server_error", "unavailable"),
    504: ("server_error", "deadline_exceeded"),
}


def error_object(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    kind, default_code = KINDS.get(status, ("server_error" if status >= 500 else
                                            "invalid_request_error", None))  # fmt: skip
    return {"error": {"message": message, "type": kind, "param": param,
                      "code": code or default_code}}  # fmt: skip


def openai_error(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_object(status, message, param, code), status, headers)


class OpenAIErrors:
    """ASGI middleware: an error answer under /v1/ in the `{"detail"}` format is re-sent as
    OpenAI's error object, with the same status and headers."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        held: Message | None = None  # an error's start, until its body shows its format
        parts: list[bytes] = []

        async def translating_send(message: Message) -> None:
            nonlocal held
            if message["type"] == "http.response.start" and message["status"] >= 400:
                held = message
                return
            if held is None:
                await send(message)
                return
            parts.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            await _send_translated(held, b"".join(parts), send)

        await self.app(scope, receive, translating_send)


async def _send_translated(start: Message, body: bytes, send: Send) -> None:
    try:
        detail = json.loads(body).get("detail")
    except (ValueError, AttributeError):
        detail = None
    if isinstance(detail, str):
        body = json.dumps(error_object(start["status"], detail), separators=(",", ":")).encode()
        headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
        start = {**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
    await send(start)
    await send({"type": "http.response.body", "body": body, "more_body": False})
