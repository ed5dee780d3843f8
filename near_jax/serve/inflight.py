"""A request's sequences in flight: the engine thread's tokens handed to the event loop.

The engine calls `emit` from its own thread; `call_soon_threadsafe` moves each event onto
the server's event loop, where the handler awaits it, so no handler ever blocks a thread.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from near_jax.serve.text import TextStream


class EngineFailed(RuntimeError):
    """The engine failed while generating a sequence (the API answers 503)."""


class InFlight:
    """One prompt in flight: the engine's tokens, handed to the event loop, turned into text."""

    def __init__(self, loop: asyncio.AbstractEventLoop, text: TextStream, prompt_tokens: int):
        self.loop, self.text, self.prompt_tokens = loop, text, prompt_tokens
        self.events: asyncio.Queue = asyncio.Queue()
        self.ticket: Any = None
        self.generated = 0  # tokens generated and used (the EOS that ended it included)
        self.finish: str | None = None
        self.arrived = time.perf_counter()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None

    def emit(self, tokens: list[int], finish: str | None) -> None:
        """Called by the engine thread."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (tokens, finish))
        except RuntimeError:  # the loop is closed: the server is shutting down
            pass

    async def next_text(self) -> str | None:
        """The next released text ("" possible); None once the sequence has finished."""
        if self.finish is not None:
            return None
        tokens, finish = await self.events.get()
        now = time.perf_counter()
        if tokens:
            self.first_token_at = self.first_token_at or now
            self.last_token_at = now
            self.generated += len(tokens)
        released = self.text.add(tokens)
        if self.text.stopped:
            self.ticket.cancel()
            self.finish = "stop"
        elif finish is not None:
            if finish == "error":
                raise EngineFailed("the engine failed while generating")
            if finish == "stop":
                self.generated += 1  # the EOS
            self.finish = "length" if finish == "length" else "stop"
            released += self.text.finish()
        return released


async def merged(sequences: list[InFlight]) -> AsyncIterator[tuple[int, str]]:
    """(index, released text) of every sequence, in the order they come, until all finish."""
    pending = {asyncio.ensure_future(s.next_text()): i for i, s in enumerate(sequences)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                i = pending.pop(task)
                text = task.result()
                if text is None:
                    continue
                yield i, text
                if sequences[i].finish is None:
                    pending[asyncio.ensure_future(sequences[i].next_text())] = i
    finally:
        for task in pending:
            task.cancel()
