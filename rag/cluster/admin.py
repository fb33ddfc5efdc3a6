"""The balancer's token, and the admin call it makes to its replicas.

One secret per scaling variant: the balancer generates it (or takes RAGBENCH_BALANCER_TOKEN)
and hands it to the replicas it launches through that variable.  Replicas present it when
they register; the balancer presents it to a replica's admin endpoint.  The admin call is
one small request with one effect (torch's thread count on the replica's compute thread),
so it can later be forwarded to wherever the compute runs.
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the replicas import this module for its names and never make the call
    import aiohttp

TOKEN_HEADER = "X-Ragbench-Token"
TOKEN_ENV = "RAGBENCH_BALANCER_TOKEN"
THREADS_PATH = "/admin/threads"


def token_refusal(given: str | None, token: str) -> tuple[int, str] | None:
    """None when `given` is the token; else the status and detail to refuse with (no
    configured token refuses everyone)."""
    if not given:
        return 401, f"this needs the balancer's token in {TOKEN_HEADER}"
    if not token or not hmac.compare_digest(given.encode(), token.encode()):
        return 403, f"the {TOKEN_HEADER} given is not the balancer's token"
    return None


async def set_threads(
    session: aiohttp.ClientSession, url: str, threads: int, token: str, timeout_s: float
) -> int | None:
    """Ask the replica at `url` to compute with `threads` torch threads; what it now uses
    (None for a model without threads).  Raises on any answer but 200."""
    import aiohttp  # loaded already by the caller, whose session this is

    async with session.post(
        f"{url}{THREADS_PATH}",
        json={"threads": threads},
        headers={TOKEN_HEADER: token},
        timeout=aiohttp.ClientTimeout(total=timeout_s),
    ) as response:
        body = await response.json(content_type=None)
        if response.status != 200:
            raise RuntimeError(f"{response.status}: {body.get('detail', body)}")
        return body["threads"]
