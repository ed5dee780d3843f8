"""Tests of near_jax.diloco.protocol.decisions: closing rounds, following them, checking runs."""

import json

import jax
import numpy as np
import pytest
from helpers import LIKE, LR, MU, RUN, SPEC, bits_equal, optax_rounds, push, tree

from near_jax.diloco import protocol
from near_jax.diloco.codec.compress import decode, encode


def test_round_of_three_matches_independent_recomputation(started):
    store, _, agg = started
    deltas = {name: tree(20 + i, scale=1e-2) for i, name in enumerate("abc")}
    for name, delta in deltas.items():
        written, nbytes, _ = push(store, name, 0, delta, inner_loss=1.0)
        assert written and nbytes > 0
    stats = agg.run_round()
    assert (stats["round"], stats["version"], stats["reason"]) == (0, 1, "quorum")
    assert [e["island"] for e in stats["decision"]["accepted"]] == ["a", "b", "c"]

    # Independently: decode each island's payload, average in fp32, compress the mean with
    # the run's spec, apply optax's outer step to version 0.
    decoded = [decode(encode(deltas[n], SPEC)[0]) for n in "abc"]
    mean = jax.tree.map(lambda a, b, c: (a + b + c) / np.float32(3), *decoded)
    update = decode(encode(mean, SPEC)[0])
    ref_params, ref_momentum = optax_rounds(tree(1), [update])
    v1 = protocol.pull_version(store, RUN, 1, LIKE, with_server_ef=True)
    assert bits_equal(v1.params, ref_params) and bits_equal(v1.momentum, ref_momentum)
    # An island following by the update alone reaches the same bits (hash-checked).
    island_v0 = protocol.pull_version(store, RUN, 0, LIKE)
    island_v1 = protocol.apply_update(store, RUN, island_v0, SPEC, LR, MU, LIKE)
    assert island_v1.params_sha256 == v1.params_sha256 and bits_equal(island_v1.params, ref_params)
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
    v0, v1 = (protocol.pull_version(store, RUN, v, LIKE) for v in (0, 1))
    assert v0.hashes() == v1.hashes() and store.get(protocol.update_key(RUN, 0)) is None


def test_island_follows_by_updates_and_detects_mismatch(started):
    store, _, agg = started
    agg.quorum = 1
    for r in range(3):
        push(store, "a", r, tree(40 + r, 1e-2))
        agg.run_round()
    held = protocol.pull_version(store, RUN, 0, LIKE)
    for _ in range(3):
        held = protocol.apply_update(store, RUN, held, SPEC, LR, MU, LIKE)
    assert held.hashes() == protocol.pull_version(store, RUN, 3, LIKE).hashes()
    drifted = protocol.make_version(1, tree(7), protocol.pull_version(store, RUN, 1, LIKE).momentum)
    with pytest.raises(protocol.ProtocolError, match="another base"):
        protocol.apply_update(store, RUN, drifted, SPEC, LR, MU, LIKE)
