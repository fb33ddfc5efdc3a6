"""A shut door answers before the request is read.

While the core says every arrival would be refused (rag.service.core_link), a request to
a generation route is answered 429 from its method and path alone, the body drained
unread: the refusal skips routing, JSON parsing and validation.  Under overload nearly
every request is refused, and on a small machine this process shares the cores with the
compute, so what a refusal costs here is taken from the answers.  A malformed request
that arrives then learns of its fault when it comes back.
"""

from __future__ import annotations

from collections.abc import Collection

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from rag.service.responding import RAGFace
from rag.service.state import ServerState
from rag.web import CLIENT_GONE, json_error, read_body


class RefuseAtShutDoor:
    """ASGI middleware inside BodyLimit (which bounds the body drained here); `paths` are
    the generation routes."""

    def __init__(self, app: ASGIApp, state: ServerState, paths: Collection[str]) -> None:
        self.app = app
        self.state = state
        self.paths = frozenset(paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = None
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in self.paths:
            refusal = self.state.door_refusal()
        if refusal is None:
            await self.app(scope, receive, send)
            return
        try:
            await read_body(receive)  # so that the connection carries the client's next request
        except ClientDisconnect as exc:
            response = json_error(CLIENT_GONE, str(exc))
        else:
            response = RAGFace().error(refusal["status"], refusal["detail"], refusal["retry_after"])
        await response(scope, receive, send)
