"""Server-Sent Events from a response body that arrives in chunks of any size.

A streamed answer is timed by when its events arrive, so the reader hands back every event
complete in a chunk as soon as that chunk is read.  It follows the event-stream format of
the HTML standard for what a benchmark meets: lines end in LF or CRLF, an event ends at a
blank line, `data` lines join with LF, `event` names the event ("message" when absent),
comment lines (`:`) and other fields are skipped, and an event cut off by the end of the
stream is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Event:
    name: str
    data: str


def _event(block: bytes) -> Event | None:
    """One event from its lines; None when it carries no data (the standard dispatches
    nothing then)."""
    name, data = "message", []
    for line in block.decode("utf-8", "replace").split("\n"):
        if not line or line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            data.append(value)
        elif field == "event":
            name = value
    return Event(name, "\n".join(data)) if data else None


class EventReader:
    """Feed it the body's chunks in order; each call returns the events they completed."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, chunk: bytes) -> list[Event]:
        # Joined first, so that a CRLF or a blank line split between two chunks is whole.
        *blocks, self._pending = (self._pending + chunk).replace(b"\r\n", b"\n").split(b"\n\n")
        return [event for block in blocks if (event := _event(block)) is not None]
