"""Turning a request's generated tokens into text: incremental decoding and stop strings.

Tokens arrive one at a time; text is released to the client only once it is final:
- a trailing U+FFFD is held back, since a byte-level tokenizer may be in the middle of a
  multi-byte character that the next token completes;
- the longest tail that could still grow into a stop string is held back, so a stream never
  shows the start of a stop string that the next token would have cut.
When a stop string appears, the text ends just before it and the request is finished.
"""

from __future__ import annotations

from collections.abc import Sequence

from near_jax.data.tokenizer import Tokenizer


class TextStream:
    """The text of one sequence as its tokens arrive."""

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str] = ()):
        self.tokenizer, self.stops = tokenizer, tuple(stops)
        self.ids: list[int] = []
        self.text = ""  # released so far
        self.stopped = False  # a stop string was found

    def add(self, ids: Sequence[int]) -> str:
        """Takes new tokens; returns the newly released text ("" after a stop string)."""
        if self.stopped or not ids:
            return ""
        self.ids.extend(ids)
        decoded = self.tokenizer.decode(self.ids)
        stable = decoded.rstrip("\ufffd")
        end = len(stable)
        for stop in self.stops:
            # Only a stop that ends in the new text can be new: search from just before it.
            at = stable.find(stop, max(0, len(self.text) - len(stop) + 1))
            if at != -1 and at < end:
                end, self.stopped = at, True
        if not self.stopped:
            end -= _partial_stop(stable, self.stops)
        return self._release(stable[:end])

    def finish(self) -> str:
        """The text still held back, released at the end of the sequence."""
        if self.stopped:
            return ""
        return self._release(self.tokenizer.decode(self.ids))

    def _release(self, upto: str) -> str:
        # Decoding more tokens may rewrite earlier characters (rare, e.g. a merged space);
        # what was released stays released, and only what lies past it is new.
        if len(upto) <= len(self.text):
            return ""
        new = upto[len(self.text) :]
        self.text += new
        return new


def _partial_stop(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest
