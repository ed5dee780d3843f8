"""Tests of near_jax.diloco.aggregator.core (the Aggregator, in-process): restarts, garbage
collection, runs that cannot be created. The programs run as processes in test_islands.py."""

import json

import pytest
from helpers import (
    LIKE,
    LR,
    MU,
    RUN,
    SPEC,
    FakeClock,
    bits_equal,
    make_aggregator,
    optax_rounds,
    plan,
    push,
    reference_update,
    tree,
)

from near_jax.diloco import protocol
from near_jax.diloco.aggregator import Aggregator
from near_jax.diloco.store import ObjectStore


class Crash(Exception):
    pass


@pytest.mark.parametrize("where", ["after_decision", "before_latest"])
def test_aggregator_restart_after_commit_finishes_the_round_once(started, tmp_path, where):
    store, clock, agg = started
    deltas = [tree(30 + i, 1e-2) for i in range(3)]
    for name, delta in zip("abc", deltas, strict=True):
        push(store, name, 0, delta)

    def crash(*args, **kwargs):
        raise Crash()

    if where == "after_decision":
        agg._publish = crash  # dies right after writing the decision
    else:
        real = protocol.advance_latest
        protocol.advance_latest = crash  # dies after the derived objects, before `latest`
    try:
        with pytest.raises(Crash):
            agg.run_round()
    finally:
        if where == "before_latest":
            protocol.advance_latest = real
    decision_bytes = store.get(protocol.decision_key(RUN, 0))
    assert decision_bytes is not None
    assert json.loads(store.get(protocol.latest_key(RUN)))["version"] == 0
    # Version 1 and the update were written before the decision, under the set's prefix.
    written = {k: (tmp_path / k).read_bytes() for k in store.list(protocol.outs_prefix(RUN, 0))}
    assert len(written) == 4 * plan().num_shards + 1

    fresh = make_aggregator(store, clock)  # a new process: all state from the store
    assert fresh.load().version == 0
    stats = fresh.run_round()
    assert stats["replayed"] == 1 and stats["version"] == 1
    assert store.get(protocol.decision_key(RUN, 0)) == decision_bytes  # the commit stands
    for key, raw in written.items():
        assert (tmp_path / key).read_bytes() == raw  # recomputed: identical bytes
    # Applied exactly once: version 1 = version 0 + one outer step; version 2 continues.
    ref_params, _ = optax_rounds(tree(1), [reference_update(deltas)])
    assert bits_equal(protocol.pull_version(store, RUN, 1, plan()).tree(plan()), ref_params)
    assert fresh.load().version == 1
    assert fresh.run_round()["reason"] == "deadline"  # round 1: nothing was pushed
    assert protocol.verify_run(store, RUN, LIKE) == []


def test_keep_versions_collects_old_full_versions(started):
    store, _, agg = started
    agg.keep_versions, agg.quorum = 2, 1
    cut = plan()
    held = protocol.pull_version(store, RUN, 0, cut)  # an island that falls behind
    for r in range(4):
        push(store, "a", r, tree(60 + r, 1e-2))
        agg.run_round()
    kept = []
    for v in range(5):
        version = protocol.load_version(store, RUN, v, cut)  # manifests are kept
        there = [store.exists(version.manifest.key(p, s)) for p in protocol.PARTS for s in range(5)]
        assert all(there) or not any(there)  # a version's shards go together
        kept.append(all(there))
    assert kept == [False, False, False, True, True]
    for _ in range(4):  # updates and decisions are kept: it can still follow
        held = protocol.apply_update(store, RUN, cut, held, LR, MU)
    assert held.hashes() == protocol.pull_version(store, RUN, 4, cut).hashes()


def test_an_invalid_run_writes_nothing_to_the_store(tmp_path):
    store, clock = ObjectStore.open(str(tmp_path)), FakeClock()
    with pytest.raises(ValueError, match="outer lr is nan"):
        Aggregator(
            store, RUN, LIKE, spec=SPEC, lr=float("nan"), momentum=MU, quorum=1, round_timeout=1.0
        )
    agg = make_aggregator(store, clock)
    with pytest.raises(ValueError, match="cannot be created"):
        agg.create(tree(1), {"inner_steps": 3, "round_timeout": float("inf")})
    assert store.list("") == []
