"""Admin calls from the balancer that launched this server, with the balancer's token.

`POST /admin/threads {"threads": n}` sets torch's thread count on the compute thread, so
that replicas sharing a machine share its cores as their number changes.  Each admin call
is one effect on the compute side, so it can later be forwarded to a compute process.
Not in the OpenAPI document: clients of the service never call it.
"""

from __future__ import annotations

import os
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from rag.cluster.admin import THREADS_PATH, TOKEN_HEADER, token_refusal
from rag.service.state import ServerState
from rag.web import BadJSON, NotJSON, json_error, parse_json, require_json

router = APIRouter()


@router.post(THREADS_PATH, include_in_schema=False)
async def threads(request: Request) -> Any:
    state: ServerState = request.app.state.rag
    if (refusal := token_refusal(request.headers.get(TOKEN_HEADER), state.admin_token)) is not None:
        return json_error(*refusal)
    cores = os.cpu_count() or 1
    try:
        require_json(request.headers.get("content-type"))
        body = parse_json(await request.body())
    except NotJSON as exc:
        return json_error(415, str(exc))
    except BadJSON as exc:
        return json_error(422, str(exc))
    wanted = body.get("threads") if isinstance(body, dict) else None
    if type(wanted) is not int or not 1 <= wanted <= cores:
        return json_error(422, f'expected {{"threads": <an integer from 1 to {cores}>}}')
    return JSONResponse({"threads": await state.set_threads(wanted)})
