"""A request's sequences in flight: the engine thread's tokens handed to the event loop.

The engine calls `emit` from its own thread; the loop's `Mailbox` moves the events onto the
server's event loop, where the handler awaits them, so no handler ever blocks a thread. A
decode step emits a token to every running sequence: the mailbox wakes the loop once for
all of them (one `call_soon_threadsafe`, one self-pipe write), and a handler that fell
behind takes every event waiting for it at once.
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections.abc import AsyncIterator
from typing import Any

from near_jax.serve.text import TextStream


class EngineFailed(RuntimeError):
    """The engine failed while generating a sequence (the API answers 503)."""


class Mailbox:
    """Events posted from other threads to one event loop's queues, in order, delivered by
    one loop callback per burst."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Queue, Any]] = []

    def post(self, queue: asyncio.Queue, event: Any) -> None:
        """Puts `event` on `queue` (owned by the loop) soon; callable from any thread."""
        with self._lock:
            first = not self._items
            self._items.append((queue, event))
        if first:  # otherwise a delivery is already scheduled and will take this one too
            try:
                self.loop.call_soon_threadsafe(self._deliver)
            except RuntimeError:  # the loop is closed: the server is shutting down
                pass

    def _deliver(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for queue, event in items:
            queue.put_nowait(event)


_MAILBOXES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def mailbox(loop: asyncio.AbstractEventLoop) -> Mailbox:
    """The loop's mailbox (one per loop; call it on the loop's thread)."""
    box = _MAILBOXES.get(loop)
    if box is None:
        box = _MAILBOXES[loop] = Mailbox(loop)
    return box


class InFlight:
    """One prompt in flight: the engine's tokens, handed to the event loop, turned into text."""

    def __init__(self, loop: asyncio.AbstractEventLoop, text: TextStream, prompt_tokens: int):
        self.loop, self.text, self.prompt_tokens = loop, text, prompt_tokens
        self.mailbox = mailbox(loop)
        self.events: asyncio.Queue = asyncio.Queue()
        self.ticket: Any = None
        self.generated = 0  # tokens generated and used (the EOS that ended it included)
        self.finish: str | None = None
        self.arrived = time.perf_counter()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None

    def emit(self, tokens: list[int], finish: str | None) -> None:
        """Called by the engine thread."""
        self.mailbox.post(self.events, (tokens, finish))

    async def next_text(self) -> str | None:
        """The text released by the events waiting (at least one; "" possible); None once
        the sequence has finished."""
        if self.finish is not None:
            return None
        released = self._take(*await self.events.get())
        # A handler that fell behind takes every waiting event in one go, one by one so
        # that tokens past a stop string are neither counted nor shown.
        while self.finish is None and not self.events.empty():
            released += self._take(*self.events.get_nowait())
        return released

    def _take(self, tokens: list[int], finish: str | None) -> str:
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
