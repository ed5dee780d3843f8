"""Sequences in flight: tokens from another thread become text on the event loop."""

import asyncio
import threading

import pytest

from near_jax.data.tokenizer import load_tokenizer
from near_jax.serve.inflight import EngineFailed, InFlight, merged
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
