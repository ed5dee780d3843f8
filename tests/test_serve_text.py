"""Incremental decoding with stop strings: released text is final, never a stop's start."""

import random

import pytest

from near_jax.data.tokenizer import load_tokenizer
from near_jax.serve.text import TextStream


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("byte")


def _feed(tok, text_stream, ids):
    out = "".join(text_stream.add([i]) for i in ids)
    return out + text_stream.finish()


def test_without_stops_the_stream_equals_decoding_everything(tok):
    rng = random.Random(0)
    for _ in range(20):
        text = "".join(rng.choice("ab cé€😀\n") for _ in range(rng.randint(1, 30)))
        ids = tok.encode(text)
        assert _feed(tok, TextStream(tok), ids) == text


def test_incomplete_characters_are_held_back(tok):
    stream = TextStream(tok)
    ids = tok.encode("€")  # three bytes, three tokens
    assert [stream.add([i]) for i in ids] == ["", "", "€"]


@pytest.mark.parametrize("seed", range(10))
def test_text_stops_before_the_earliest_stop_string(tok, seed):
    rng = random.Random(seed)
    alphabet = "abc\n"
    text = "".join(rng.choice(alphabet) for _ in range(40))
    stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(2)]
    stream = TextStream(tok, stops)
    released = []
    for i in tok.encode(text):
        piece = stream.add([i])
        released.append(piece)
        # What was released never ends in something that might still become a stop string.
        assert not any(s in stream.text for s in stops)
    out = "".join(released) + stream.finish()
    hits = [text.find(s) for s in stops if s in text]
    expected = text[: min(hits)] if hits else text
    assert out == expected
    assert stream.stopped == bool(hits)


def test_nothing_is_released_after_a_stop(tok):
    stream = TextStream(tok, ["END"])
    out = "".join(stream.add([i]) for i in tok.encode("hello END more"))
    assert out == "hello " and stream.stopped
    assert stream.add(tok.encode("x")) == "" and stream.finish() == ""
