"""The HTTP edges every server here shares (the RAG server and the balancer): one error
format, strict JSON, bounded request bodies, and the connection guard uvicorn runs with.
Torch-free.

- `errors`: the one error format, strict JSON, the JSON content type.
- `asgi`: what each request passes through (body size and deadline, response counts, the
  client leaving).
- `guard`: the connection cap, head limits and protocol refusals, in uvicorn's protocol.
- `serving`: the open-files limit, the listening socket, uvicorn's settings.
- `sse`: Server-Sent Events, framed and streamed unbuffered.
- `openai_errors`: OpenAI's error object, which both doors answer under `/v1/`.
"""

from rag.web.asgi import (
    CLIENT_GONE,
    ASGIApp,
    BodyLimit,
    BodyRefused,
    CountResponses,
    read_body,
    unless_client_leaves,
)
from rag.web.errors import (
    ERROR_HANDLERS,
    BadJSON,
    Error,
    NotJSON,
    excerpt,
    json_error,
    parse_json,
    require_json,
)
from rag.web.guard import HEAD_MAX_BYTES, MAX_HEADERS, ConnectionGuard
from rag.web.openai_errors import OpenAIErrors, error_object, openai_error
from rag.web.serving import bind_socket, connection_cap, guarded_config, raise_open_files_limit
from rag.web.sse import EventStream, drained, error_frame, frame

# The OpenAI-compatible routes both doors serve (each forwarded by the balancer).
V1_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/models")

__all__ = [
    "CLIENT_GONE",
    "ERROR_HANDLERS",
    "HEAD_MAX_BYTES",
    "MAX_HEADERS",
    "V1_PATHS",
    "ASGIApp",
    "BadJSON",
    "BodyLimit",
    "BodyRefused",
    "ConnectionGuard",
    "CountResponses",
    "Error",
    "EventStream",
    "NotJSON",
    "OpenAIErrors",
    "bind_socket",
    "connection_cap",
    "drained",
    "error_frame",
    "error_object",
    "excerpt",
    "frame",
    "guarded_config",
    "json_error",
    "openai_error",
    "parse_json",
    "raise_open_files_limit",
    "read_body",
    "require_json",
    "unless_client_leaves",
]
