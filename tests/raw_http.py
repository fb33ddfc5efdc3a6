"""HTTP spoken by hand over a socket, for what httpx will not do: a body sent slowly, or
never finished, malformed requests, and watching what the server does with the rest."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from dataclasses import dataclass

HEAD = b"POST /rag HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"


def post_in_parts(port: int, length: int, parts: list[bytes], gap_s: float) -> bytes:
    """POST /rag declaring a body of `length` bytes, send `parts` `gap_s` apart, then wait
    for the reply (the server closes after either answer)."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(HEAD + b"Content-Length: %d\r\n\r\n" % length)
        for part in parts:
            time.sleep(gap_s)
            sock.sendall(part)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
        return reply


@dataclass
class Reply:
    status: int
    headers: dict[bytes, bytes]
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


def parse_reply(raw: bytes) -> Reply:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = dict(line.split(b": ", 1) for line in lines[1:] if b": " in line)
    return Reply(int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body)


def exchange(port: int, request: bytes, timeout_s: float = 30) -> tuple[Reply, bool]:
    """Send `request` as it is; the reply, and whether the server then closed the
    connection (within `timeout_s`)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        # Refused before it was all sent: the reply is what matters.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(request)
        raw, closed = b"", False
        try:
            while chunk := sock.recv(65536):
                raw += chunk
            closed = True
        except ConnectionResetError:
            closed = True
        except TimeoutError:
            pass
    return parse_reply(raw), closed


@dataclass
class Refusal:
    """What a client that keeps sending a body saw: the reply, the bytes the server let
    it send after the reply arrived, and how long the connection lived after the reply."""

    reply: Reply
    sent_after_reply: int
    open_after_reply_s: float


def keep_sending(
    port: int, head: bytes, first: bytes, before_reply: bool = True, within_s: float = 30
) -> Refusal:
    """Send `head` and `first`, then body bytes as fast as the server takes them (from the
    start, or only once it has replied), through its reply and after it (a half-closed
    connection still takes bytes), until the server resets the connection or `within_s`
    passes."""
    chunk = b"x" * 65536
    with socket.create_connection(("127.0.0.1", port), timeout=within_s) as sock:
        sock.sendall(head + first)
        sock.setblocking(False)
        raw, replied_at, after, ended = b"", 0.0, 0, False
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            try:
                data = b"" if ended else sock.recv(65536)
                ended = ended or not data
                raw += data
                if not replied_at and b"\r\n\r\n" in raw:
                    replied_at = time.monotonic()
            except BlockingIOError:
                pass
            except ConnectionResetError:
                break
            if not (replied_at or before_reply):
                time.sleep(0.001)
                continue
            try:
                sent = sock.send(chunk)
                if replied_at:
                    after += sent
            except BlockingIOError:
                time.sleep(0.001)
            except (BrokenPipeError, ConnectionResetError):
                break
        gone_at = time.monotonic()
    assert replied_at, f"no reply within {within_s} s: {raw[:200]!r}"
    return Refusal(parse_reply(raw), after, gone_at - replied_at)
