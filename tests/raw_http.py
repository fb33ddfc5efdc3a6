"""HTTP spoken by hand over a socket, for what httpx will not do: a body sent slowly, or
never finished."""

from __future__ import annotations

import socket
import time


def post_in_parts(port: int, length: int, parts: list[bytes], gap_s: float) -> bytes:
    """POST /rag declaring a body of `length` bytes, send `parts` `gap_s` apart, then wait
    for the reply (the server closes after either answer)."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(
            b"POST /rag HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % length
        )
        for part in parts:
            time.sleep(gap_s)
            sock.sendall(part)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
        return reply
