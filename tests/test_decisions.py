"""Tests of near_jax.diloco.protocol.decisions: closing rounds, following them, checking runs."""

import dataclasses
import json

import numpy as np
import pytest
from helpers import (
    LIKE,
    LR,
    MU,
    RUN,
    bits_equal,
    optax_rounds,
    plan,
    push,
    reference_update,
    tree,
)

from near_jax.diloco import protocol
from near_jax.diloco.store import HEADER


def test_round_of_three_matches_independent_recomputation(started):
    store, _, agg = started
    deltas = {name: tree(20 + i, scale=1e-2) for i, name in enumerate("abc")}
    for name, delta in deltas.items():
        written, nbytes, _ = push(store, name, 0, delta, inner_loss=1.0)
        assert written and nbytes > 0
    stats = agg.run_round()
    assert (stats["round"], stats["version"], stats["reason"]) == (0, 1, "quorum")
    assert [e["island"] for e in stats["decision"]["accepted"]] == ["a", "b", "c"]

    # Independently: per shard, decode each island's payload, average in fp32, compress the
    # mean with the run's spec; then optax's outer step on the whole tree.
    cut = plan()
    ref_params, ref_momentum = optax_rounds(tree(1), [reference_update(deltas.values())])
    v1 = protocol.pull_version(store, RUN, 1, cut)
    assert bits_equal(v1.tree(cut), ref_params)
    assert bits_equal(v1.tree(cut, "momentum"), ref_momentum)
    # An island following by the update alone reaches the same bits (hash-checked).
    island_v0 = protocol.pull_version(store, RUN, 0, cut)
    island_v1 = protocol.apply_update(store, RUN, cut, island_v0, LR, MU)
    assert island_v1.hashes() == v1.hashes() and bits_equal(island_v1.tree(cut), ref_params)
    assert json.loads(store.get(protocol.latest_key(RUN)))["version"] == 1
    assert protocol.verify_run(store, RUN, LIKE) == []


def test_late_push_is_recorded_late_and_never_applied(started):
    store, _, agg = started
    agg.quorum = 2
    push(store, "a", 0, tree(20, 1e-2))
    push(store, "b", 0, tree(21, 1e-2))
    agg.run_round()  # closes round 0 with a and b
    written, _, _ = push(store, "c", 0, tree(22, 1e-2))  # after the decision: late
    assert written
    push(store, "a", 1, tree(23, 1e-2))
    push(store, "b", 1, tree(24, 1e-2))
    stats = agg.run_round()
    assert stats["decision"]["late"] == [
        {"island": "c", "round": 0, "key": protocol.contrib_key(RUN, 0, "c")}
    ]
    d0 = json.loads(store.get(protocol.decision_key(RUN, 0)))
    assert [e["island"] for e in d0["accepted"]] == ["a", "b"]
    stats = agg.run_round()  # round 2 (deadline, empty): c is not reported twice
    assert stats["decision"]["late"] == [] and stats["reason"] == "deadline"
    assert protocol.verify_run(store, RUN, LIKE) == []  # every version = its decision, once


def test_empty_round_publishes_the_same_version(started):
    store, clock, agg = started
    stats = agg.run_round()
    assert (stats["reason"], stats["accepted"], stats["version"]) == ("deadline", 0, 1)
    v0, v1 = (protocol.pull_version(store, RUN, v, plan()) for v in (0, 1))
    assert v0.hashes() == v1.hashes() and v1.manifest.update is None
    assert stats["decision"]["update_sha256"] is None
    assert not store.list(protocol.outs_prefix(RUN, 0))  # nothing written for it


def test_island_follows_by_updates_and_detects_mismatch(started):
    store, _, agg = started
    agg.quorum = 1
    for r in range(3):
        push(store, "a", r, tree(40 + r, 1e-2))
        agg.run_round()
    cut = plan()
    held = protocol.pull_version(store, RUN, 0, cut)
    for _ in range(3):
        held = protocol.apply_update(store, RUN, cut, held, LR, MU)
    assert held.hashes() == protocol.pull_version(store, RUN, 3, cut).hashes()
    drifted = dataclasses.replace(protocol.pull_version(store, RUN, 0, cut), version=1)
    with pytest.raises(protocol.ProtocolError, match="another base"):
        protocol.apply_update(store, RUN, cut, drifted, LR, MU)
    # A held shard that drifted (a bit flip in host memory) is caught by its hash.
    held = protocol.pull_version(store, RUN, 1, cut)
    held.params[3][0] = held.params[3][0] + np.float32(1e-3)
    with pytest.raises(protocol.ProtocolError, match="shard 3 locally"):
        protocol.apply_update(store, RUN, cut, held, LR, MU)


def test_a_host_holding_some_shards_follows_only_those(started):
    """A host of a multi-host island pulls and applies only its own shards."""
    store, _, agg = started
    agg.quorum = 1
    push(store, "a", 0, tree(40, 1e-2))
    agg.run_round()
    cut = plan()
    mine = [1, 3]
    read0 = store.bytes_read
    held = protocol.pull_version(store, RUN, 0, cut, shards=mine)
    pulled = store.bytes_read - read0
    assert sorted(held.params) == mine and sorted(held.momentum) == mine
    read1 = store.bytes_read
    full = protocol.pull_version(store, RUN, 0, cut)
    full_pulled = store.bytes_read - read1
    others = sum(
        len(store.get(full.manifest.key(part, s))) + HEADER.size
        for part in ("params", "momentum")
        for s in (0, 2, 4)
    )
    assert full_pulled - others - pulled == 0  # exactly the other 3 shards more
    new = protocol.apply_update(store, RUN, cut, held, LR, MU)
    every = protocol.apply_update(store, RUN, cut, full, LR, MU)
    assert sorted(new.params) == mine
    for s in mine:
        assert bits_equal(new.params[s], every.params[s])


def fragmented_run(tmp_path, keep_versions=0):
    """(store, aggregator) of run RUN created with 2 fragments (quorum 2)."""
    from helpers import FakeClock, make_aggregator

    from near_jax.diloco.store import ObjectStore

    store = ObjectStore.open(str(tmp_path))
    agg = make_aggregator(store, FakeClock(), quorum=2)
    agg.fragments, agg.keep_versions = 2, keep_versions
    assert agg.create(tree(1), {"inner_steps": 4})
    agg.load()
    return store, agg


def push_fragment(store, island, r, delta, shards):
    cut = plan()
    base = protocol.pull_version(store, RUN, r, cut)
    return protocol.push_contribution(
        store, RUN, island, base, cut, cut.split(delta, shards), "int8"
    )


def test_a_fragmented_run_syncs_one_fragment_a_round(tmp_path):
    store, agg = fragmented_run(tmp_path)
    cut = plan()
    assert protocol.read_json(store, protocol.manifest_key(RUN))["fragments"] == 2
    follower = protocol.pull_version(store, RUN, 0, cut)  # an island following by updates
    synced = []
    for r in range(4):
        fragment = cut.fragment(2, r)
        synced.append(fragment)
        for i, name in enumerate("ab"):
            assert push_fragment(store, name, r, tree(30 + 2 * r + i, 1e-2), fragment)[0]
        stats = agg.run_round()
        assert stats["accepted"] == 2 and stats["rejected"] == 0, stats["decision"]
        old, new = (protocol.pull_version(store, RUN, v, cut) for v in (r, r + 1))
        for s in range(cut.num_shards):  # only the fragment moved, params and momentum
            for part in ("params", "momentum"):
                same = all(
                    bits_equal(a, b)
                    for a, b in zip(getattr(old, part)[s], getattr(new, part)[s], strict=True)
                )
                assert same == (s not in fragment), (r, s, part)
            assert (new.manifest.update[s] is None) == (s not in fragment)
        follower = protocol.apply_update(store, RUN, cut, follower, LR, MU)
        assert follower.hashes() == new.hashes()
    # Each shard is synced exactly once every F = 2 rounds.
    assert (
        sorted(synced[0] + synced[1])
        == list(range(cut.num_shards))
        == sorted(synced[2] + synced[3])
    )
    assert synced[0] == synced[2] and not set(synced[0]) & set(synced[1])
    assert protocol.verify_run(store, RUN, LIKE) == []
    # A whole Δ, or another fragment, is not this round's contribution.
    push_fragment(store, "c", 4, tree(9, 1e-2), None)
    push_fragment(store, "d", 4, tree(9, 1e-2), cut.fragment(2, 5))
    base = protocol.pull_version(store, RUN, 4, cut)
    for island in "cd":
        verdict = agg.check(base, protocol.contrib_key(RUN, 4, island))
        assert not verdict.valid and "not the" in verdict.reason, verdict.reason


def test_a_fragmented_version_keeps_what_it_carries_when_old_versions_are_collected(tmp_path):
    store, agg = fragmented_run(tmp_path, keep_versions=1)
    cut = plan()
    for r in range(4):
        for i, name in enumerate("ab"):
            push_fragment(store, name, r, tree(50 + 2 * r + i, 1e-2), cut.fragment(2, r))
        agg.run_round()
    latest = protocol.load_version(store, RUN, 4, cut)
    assert len({latest.manifest.shard_prefix(s) for s in range(cut.num_shards)}) == 2
    pulled = protocol.pull_version(store, RUN, 4, cut)  # carried shards were not collected
    assert pulled.hashes() == latest.hashes()
    old = protocol.load_version(store, RUN, 2, cut)  # replaced everywhere by version 4
    assert not any(store.exists(old.manifest.key("params", s)) for s in cut.fragment(2, 2))
