"""A generation's text as its tokens come, for streaming: each piece is text that later
tokens cannot change, so a multi-byte character split across tokens, or a word a tokenizer
renders differently at the start of a text, is never sent wrong.

The method is vLLM's incremental detokenisation: the text of the newest tokens is decoded
together with a few tokens before them, and only what they add is new, once it does not end
in an incomplete character (U+FFFD).  What is sent is the answer as the server states it
(the whole text, stripped): leading whitespace is dropped, trailing whitespace held back
until more text follows it, so the pieces always add up to the final answer."""

from __future__ import annotations

from collections.abc import Callable, Iterable

INCOMPLETE = "\ufffd"


class TextStream:
    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self.decode = decode
        self.tokens: list[int] = []
        self.text = ""  # what the pieces returned so far add up to
        self._decoded = ""  # the text of the tokens read, unstripped
        self._prefix = 0  # the window of context starts here
        self._read = 0  # the text of tokens before this one is in `_decoded`
        self._closed = False

    def add(self, tokens: Iterable[int]) -> str:
        """Take new tokens (one at a time, as they were generated); the text now certain
        that was not returned before."""
        for token in tokens:
            self.tokens.append(token)
            self._read_window(final=False)
        return self._visible(self._decoded.lstrip().rstrip())

    def close(self) -> str:
        """The last piece, once no token will follow."""
        if self._closed:
            return ""
        self._closed = True
        self._read_window(final=True)
        return self._visible(self._decoded.strip())

    def _read_window(self, final: bool) -> None:
        if self._read == len(self.tokens):
            return
        before = self.decode(self.tokens[self._prefix : self._read])
        after = self.decode(self.tokens[self._prefix :])
        if len(after) > len(before) and (final or not after.endswith(INCOMPLETE)):
            self._decoded += after[len(before) :]
            self._prefix, self._read = self._read, len(self.tokens)

    def _visible(self, visible: str) -> str:
        piece = visible[len(self.text) :]
        self.text = visible if len(visible) > len(self.text) else self.text
        return piece
