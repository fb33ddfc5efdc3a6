"""The HTTP edges every server here shares (the RAG server and the balancer): one error
format, strict JSON, bounded request bodies, and the connection guard uvicorn runs with.
Torch-free.

- `errors`: the one error format, strict JSON, the JSON content type.
- `asgi`: what each request passes through (body size and deadline, response counts, the
  client leaving).
- `guard`: the connection cap, head limits and protocol refusals, in uvicorn's protocol.
- `serving`: the open-files limit, the listening socket, uvicorn's settings.
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
from rag.web.serving import bind_socket, connection_cap, guarded_config, raise_open_files_limit

__all__ = [
    "CLIENT_GONE",
    "ERROR_HANDLERS",
    "HEAD_MAX_BYTES",
    "MAX_HEADERS",
    "ASGIApp",
    "BadJSON",
    "BodyLimit",
    "BodyRefused",
    "ConnectionGuard",
    "CountResponses",
    "Error",
    "NotJSON",
    "bind_socket",
    "connection_cap",
    "excerpt",
    "guarded_config",
    "json_error",
    "parse_json",
    "raise_open_files_limit",
    "read_body",
    "require_json",
    "unless_client_leaves",
]
