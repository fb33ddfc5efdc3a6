"""The one error format, `{"detail": "<what went wrong>"}`, never more than a short excerpt
of the input it complains about; strict JSON (NaN, Infinity and numbers that overflow to
them are bad input) and the JSON content type."""

from __future__ import annotations

import json
import logging
import math
import reprlib
from typing import Any

from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

log = logging.getLogger("rag.web")

_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict = 2, 4, 4
_SHORT.maxstring = _SHORT.maxlong = _SHORT.maxother = 40


class Error(BaseModel):
    """Every error this project's servers answer (the OpenAPI schema of all of them)."""

    detail: str = Field(description="What went wrong, in words; quotes input only in part.")


def excerpt(value: object) -> str:
    """A repr of `value` cut to a few dozen characters: enough to recognise it, never a copy
    of a megabyte the client sent."""
    return _SHORT.repr(value)


def json_error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (404, 405) in the one error format."""
    assert isinstance(exc, HTTPException)
    return json_error(exc.status_code, str(exc.detail), exc.headers)


async def internal_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s", request.url.path)
    return json_error(500, f"internal error: {type(exc).__name__}")


# For Starlette(exception_handlers=...) or FastAPI: every error an app answers is JSON.
ERROR_HANDLERS = {HTTPException: http_error, Exception: internal_error}


class BadJSON(ValueError):
    """The body is not UTF-8 JSON with finite numbers; the message says where."""


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise BadJSON(f"the number {excerpt(text)} is out of range")
    return number


def _no_constant(name: str) -> None:
    raise BadJSON(f"{name} is not a JSON number")


def parse_json(body: bytes) -> Any:
    """Parse a request body as JSON, refusing NaN, Infinity and numbers too large for a
    float (`1e999`): Python's json module accepts them, and they cannot be answered back."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        byte = body[exc.start : exc.start + 1]
        raise BadJSON(f"the body is not UTF-8 (byte {byte!r} at {exc.start})") from None
    try:
        return json.loads(text, parse_float=_finite, parse_constant=_no_constant)
    except BadJSON:
        raise
    except RecursionError:
        raise BadJSON("the body nests too deeply") from None
    except ValueError as exc:  # JSONDecodeError, or an integer with too many digits
        raise BadJSON(f"the body is not valid JSON: {str(exc)[:120]}") from None


class NotJSON(Exception):
    """The body is not declared as JSON: 415."""


def require_json(content_type: str | None) -> None:
    """Accept `application/json` and `application/<x>+json`, with any parameters."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media != "application/json" and not (
        media.startswith("application/") and media.endswith("+json")
    ):
        raise NotJSON(
            f"the body must be sent as Content-Type: application/json, not {excerpt(media or None)}"
        )
