"""Tests of near_jax.diloco.island.exchange: reading a push's outcome from a decision. The
exchange itself runs in the island program (test_islands.py)."""

import pytest

from near_jax.diloco.island import exchange

DECISION = {
    "accepted": [{"island": "a"}, {"island": "b"}],
    "rejected": [{"island": "c", "reason": "norm outlier"}],
}


NOT_STORED = "this push was NOT stored; the object already in our slot was "


@pytest.mark.parametrize(
    "island,written,expected",
    [
        ("a", True, (True, False, "accepted")),
        ("c", True, (False, False, "rejected: norm outlier")),
        ("d", True, (False, True, "late")),
        ("a", False, (True, False, NOT_STORED + "accepted")),
        ("c", False, (False, False, NOT_STORED + "rejected: norm outlier")),
        ("d", False, (False, True, "late")),
    ],
)
def test_outcome_of_a_push(island, written, expected):
    assert exchange._outcome(DECISION, island, written) == (*expected, {})


def test_outcome_of_an_unreadable_decision_is_late():
    assert exchange._outcome({}, "a", True) == (False, True, "late", {})


def test_outcome_with_a_score():
    decision = {
        **DECISION,
        "contrib": {
            "entries": [
                {"contributor": "a", "key_id": "k1", "score": 0.12345, "reward": 0.5},
                {"contributor": "b", "key_id": "", "score": 9.0, "reward": 1.0},
            ]
        },
    }
    assert exchange._outcome(decision, "a", True) == (
        True,
        False,
        "accepted (score 0.1235, reward 0.500)",
        {"score": 0.12345, "reward": 0.5},
    )
    assert exchange._outcome(decision, "b", True) == (True, False, "accepted", {})  # not ours
