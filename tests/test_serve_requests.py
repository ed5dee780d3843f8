"""Requests the engine refuses, each in one line, and what Request normalises."""

import pytest

from near_jax.serve.requests import Request, check_request


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(prompt=()), r"^an empty prompt is not allowed"),
        (dict(prompt=(1, 300)), r"^prompt token 300 at index 1 is not allowed: .*\[0, 300\)$"),
        (dict(max_tokens=0), r"^max_tokens=0 is not allowed: must be >= 1$"),
        (dict(prompt=(1,) * 32), r"^a prompt of 32 tokens is not allowed: .* context is 32 "),
        (dict(prompt=(1,) * 5, max_tokens=28), r"^max_tokens=28 is not allowed: at most 27 "),
        (dict(temperature=-1.0), r"^temperature=-1.0 is not allowed"),
        (dict(top_k=-1), r"^top_k=-1 is not allowed"),
        (dict(top_p=0.0), r"^top_p=0.0 is not allowed"),
        (dict(seed=-1), r"^seed=-1 is not allowed: must be in \[0, 2\*\*32\)$"),
    ],
)
def test_bad_requests_are_refused_in_one_line(fields, message):
    request = Request(**{**dict(prompt=(1, 2), max_tokens=4), **fields})
    with pytest.raises(ValueError, match=message) as err:
        check_request(request, vocab_limit=300, max_len=32)
    assert "\n" not in str(err.value)


def test_the_longest_request_that_fits_is_accepted_and_prompts_become_int_tuples():
    import numpy as np

    request = Request(np.array([1, 299, 5]), 29, temperature=1.0, top_k=3, seed=2**32 - 1)
    assert request.prompt == (1, 299, 5) and all(type(t) is int for t in request.prompt)
    check_request(request, vocab_limit=300, max_len=32)
