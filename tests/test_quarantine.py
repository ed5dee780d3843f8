"""Tests of near_jax.diloco.quarantine: planted objects in the aggregator's slots."""

import dataclasses

import pytest
from helpers import LIKE, RUN, make_aggregator, push, tree

from near_jax.diloco import island, protocol, quarantine
from near_jax.diloco import store as store_lib
from near_jax.diloco.store import ObjectStore

# ------------------------------------------------------------- through the aggregator


@pytest.mark.parametrize("planted", ["unframed", "not_json", "forged"])
def test_a_planted_decision_is_moved_aside_and_the_round_decided(started, tmp_path, planted):
    """Garbage or a forgery in the decision slot never stops the run: the aggregator moves
    it aside with a warning naming it and decides the round; islands keep waiting."""
    store, clock, agg = started
    logged = []
    agg.log = logged.append
    push(store, "good", 0, tree(20, 1e-2))
    key = protocol.decision_key(RUN, 0)
    if planted == "unframed":
        (tmp_path / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / key).write_bytes(b"garbage")
    elif planted == "not_json":
        store.put(key, b"{not json")
    else:  # well-formed, but its result is not what replaying its contributions gives
        base = agg.state
        fake = protocol.Derived(dataclasses.replace(base, version=1), "f" * 64)  # no step
        verdict = protocol.check_contribution(
            store, RUN, base, agg.plan, protocol.contrib_key(RUN, 0, "good")
        )
        decision = protocol.make_decision(RUN, base, fake, [verdict], [], "quorum", 1.0)
        store.put(key, protocol.dumps(decision))
    assert island.newer(store, RUN, 0, "eu-1") is None  # an island waits, it does not die
    stats = agg.run_round()
    assert stats["accepted"] == 1 and not stats["replayed"]
    aside = store.list(f"{RUN}/quarantine/")
    assert len(aside) == 1 and aside[0].startswith(f"{RUN}/quarantine/rounds.00000000.decision.")
    assert any(key in m and aside[0] in m for m in logged), logged
    assert protocol.verify_run(store, RUN, LIKE) == []


def test_a_planted_latest_is_moved_aside_and_rebuilt(started):
    store, clock, agg = started
    push(store, "good", 0, tree(20, 1e-2))
    agg.run_round()
    store.put(protocol.latest_key(RUN), b'{"version": 99}')
    assert island.newer(store, RUN, 1, "eu-1") is None
    again = make_aggregator(store, clock)
    assert not again.create(tree(1), {})
    assert again.load().version == 1 and again.state.hashes() == agg.state.hashes()
    assert protocol.read_latest(store, RUN)["version"] == 1
    assert len(store.list(f"{RUN}/quarantine/")) == 1


# ------------------------------------------------------------------ the module, directly

GOOD_LATEST = {"version": 3, "params_sha256": "ab", "momentum_sha256": "cd", "published_at": 1.5}


@pytest.mark.parametrize(
    "latest,problem",
    [
        (GOOD_LATEST, ""),
        ({**GOOD_LATEST, "version": -1}, "names no version"),
        ({**GOOD_LATEST, "version": True}, "names no version"),
        ({**GOOD_LATEST, "params_sha256": None}, "has no hashes"),
        ({**GOOD_LATEST, "published_at": "soon"}, "no publication time"),
    ],
)
def test_latest_problem_names_what_is_wrong(latest, problem):
    got = quarantine.latest_problem(latest)
    assert got.endswith(problem) and bool(got) == bool(problem)


def test_quarantine_key_flattens_the_key_and_stamps_milliseconds():
    key = protocol.decision_key(RUN, 0)
    assert quarantine.quarantine_key(RUN, key, 12.3456) == (
        f"{RUN}/quarantine/rounds.00000000.decision.12345"
    )


def test_read_own_keeps_good_objects_and_moves_others_aside_with_their_bytes(tmp_path):
    store, logged = ObjectStore.open(str(tmp_path)), []
    key = protocol.latest_key(RUN)

    def read():
        return quarantine.read_own(store, RUN, key, quarantine.latest_problem, logged.append, 7.0)

    assert read() is None and logged == []  # missing: nothing to move
    store.put(key, protocol.dumps(GOOD_LATEST))
    assert read() == GOOD_LATEST and logged == []
    for planted in (b'{"version": -1}', b"{not json"):
        store.put(key, planted)
        assert read() is None and store.get(key) is None
        aside = quarantine.quarantine_key(RUN, key, 7.0)
        assert store.get(aside) == store_lib.frame(planted)  # the raw bytes, as evidence
        assert key in logged[-1] and aside in logged[-1]
    assert len(logged) == 2
