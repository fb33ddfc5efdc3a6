"""Reading Server-Sent Events in tests, as a client does: event by event, as they arrive."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx


def events(response: httpx.Response) -> Iterator[tuple[str, Any]]:
    """(event name, data) of each event as it arrives; data parsed as JSON unless it is
    OpenAI's `[DONE]`; an unnamed event is `message`, as the SSE standard names it."""
    name, data = "message", []
    for line in response.iter_lines():
        if not line:
            if data:
                text = "\n".join(data)
                yield name, text if text == "[DONE]" else json.loads(text)
            name, data = "message", []
        elif line.startswith("event:"):
            name = line.removeprefix("event:").strip()
        elif line.startswith("data:"):
            data.append(line.removeprefix("data:").strip())


def stream_rag(url: str, body: dict, timeout: float = 60) -> list[tuple[str, Any]]:
    """Every event of one streamed /rag answer."""
    with httpx.stream("POST", f"{url}/rag", json={**body, "stream": True}, timeout=timeout) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return list(events(r))
