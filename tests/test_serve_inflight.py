"""Sequences in flight: tokens from another thread become text on the event loop."""

import asyncio
import threading

import pytest

from near_jax.data.tokenizer import load_tokenizer
from near_jax.serve.inflight import EngineFailed, InFlight, mailbox, merged
from near_jax.serve.text import TextStream


class Ticket:
    cancelled = False

    def cancel(self):
        self.cancelled = True


def _start(tok, events, stops=()):
    """An InFlight fed `events` ((tokens, finish) pairs) from a separate thread."""
    seq = InFlight(asyncio.get_running_loop(), TextStream(tok, stops), prompt_tokens=3)
    seq.ticket = Ticket()
    threading.Thread(target=lambda: [seq.emit(*e) for e in events]).start()
    return seq


async def _drain(seq):
    out = []
    while (piece := await seq.next_text()) is not None:
        out.append(piece)
    return "".join(out)


def test_tokens_become_text_and_eos_is_counted():
    tok = load_tokenizer("byte")

    async def main():
        ids = tok.encode("hello")
        seq = _start(tok, [([i], None) for i in ids] + [([], "stop")])
        assert await _drain(seq) == "hello"
        assert (seq.finish, seq.generated) == ("stop", len(ids) + 1)  # EOS included
        seq = _start(tok, [([i], None) for i in ids] + [([], "length")])
        assert await _drain(seq) == "hello" and (seq.finish, seq.generated) == ("length", 5)

    asyncio.run(main())


def test_a_stop_string_cancels_the_ticket_and_counts_tokens_up_to_it():
    tok = load_tokenizer("byte")

    async def main():
        seq = _start(tok, [([i], None) for i in tok.encode("ab|cd")], stops=["|"])
        assert await _drain(seq) == "ab"
        assert seq.ticket.cancelled and seq.finish == "stop" and seq.generated == 3

    asyncio.run(main())


def test_an_engine_error_raises_and_merged_interleaves_sequences():
    tok = load_tokenizer("byte")

    async def main():
        seq = _start(tok, [([104], None), ([], "error")])
        with pytest.raises(EngineFailed):
            await _drain(seq)
        a = _start(tok, [([i], None) for i in tok.encode("aaa")] + [([], "length")])
        b = _start(tok, [([i], None) for i in tok.encode("bb")] + [([], "stop")])
        got = {0: "", 1: ""}
        async for i, text in merged([a, b]):
            got[i] += text
        assert got == {0: "aaa", 1: "bb"} and (a.finish, b.finish) == ("length", "stop")

    asyncio.run(main())


def test_the_mailbox_wakes_the_loop_once_per_burst_and_keeps_order():
    async def main():
        loop = asyncio.get_running_loop()
        box = mailbox(loop)
        assert mailbox(loop) is box  # one per loop
        wakeups = []
        schedule = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a: (wakeups.append(a), schedule(*a))
        queues = [asyncio.Queue() for _ in range(3)]

        def burst():
            for i in range(90):
                box.post(queues[i % 3], i)

        thread = threading.Thread(target=burst)
        thread.start()
        thread.join()  # the loop was busy meanwhile: the whole burst waits for it
        await asyncio.sleep(0)
        assert len(wakeups) == 1
        for q, queue in enumerate(queues):
            assert [queue.get_nowait() for _ in range(30)] == list(range(q, 90, 3))
        box.post(queues[0], "next")  # a later burst wakes the loop again
        await asyncio.sleep(0.01)
        assert len(wakeups) == 2 and queues[0].get_nowait() == "next"

    asyncio.run(main())


def test_a_handler_behind_takes_every_waiting_event_at_once():
    tok = load_tokenizer("byte")

    async def main():
        seq = InFlight(asyncio.get_running_loop(), TextStream(tok, ["|"]), prompt_tokens=3)
        seq.ticket = Ticket()
        for i in tok.encode("ab|cd"):
            seq.emit([i], None)
        seq.emit([], "length")
        await asyncio.sleep(0)
        assert await seq.next_text() == "ab"  # one call; nothing past the stop counted
        assert (seq.finish, seq.generated, seq.ticket.cancelled) == ("stop", 3, True)
        assert await seq.next_text() is None
        seq = InFlight(asyncio.get_running_loop(), TextStream(tok, ()), prompt_tokens=3)
        for i in tok.encode("hello"):
            seq.emit([i], None)
        seq.emit([], "stop")
        await asyncio.sleep(0)
        assert await seq.next_text() == "hello"
        assert (seq.finish, seq.generated) == ("stop", 6)

    asyncio.run(main())
