"""The adversarial harness (tests/contrib_world.py's gauntlet): contributors who cheat cheaply
against a run that checks assigned data, rates contributors and caps new keys.

Honest contributors train on their assignments (batches with "topics": a Δ improves the
batches it trained on most). The cheats: a lazy one (trains on data it chose), one that
trains on the scoring split, a near-copy (an honest Δ plus noise, cosine < 0.99), and a
sybil flood (20 fresh keys sending copies, exact or near) against an open run and against
an allowlisted one. Each is caught or earns nothing, with its reason in the ledger; honest
contributors keep at least 90% of the rewards; the eval loss stays within 2% of a run
without them. (`bench/contrib.py --adversarial` prints the same as a table.)
"""

import dataclasses

import numpy as np
import pytest
from contrib_world import (
    CHEATS,
    GAUNTLET_POLICY,
    HONEST,
    SYBILS,
    allowlist_of,
    by_contributor,
    gauntlet,
    near_copy,
    rewards_by_contributor,
    screening_cosine,
)

from near_jax.contrib import identity

ROUNDS = 8


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(honest-only, adversarial) gauntlet runs with the same aggregator key (same seeds)."""
    key = identity.generate()
    path = tmp_path_factory.mktemp("gauntlet")
    honest = gauntlet(path / "honest", ROUNDS, aggregator_key=key)
    adversarial = gauntlet(
        path / "adversarial", ROUNDS, cheats=tuple(CHEATS), sybils=SYBILS, aggregator_key=key
    )
    return honest, adversarial


def entries_of(decisions, name):
    return [e for d in decisions for e in d["contrib"]["entries"] if e["contributor"] == name]


def test_each_cheat_is_caught_or_earns_nothing_with_its_reason_in_the_ledger(runs):
    _, (_, decisions, _) = runs
    totals = rewards_by_contributor(decisions)
    honest_mean = np.mean([totals[n] for n in HONEST])
    for name in CHEATS:
        rows = entries_of(decisions, name)
        assert len(rows) == ROUNDS
        caught = [e["reason"] for e in rows if not e["accepted"]]
        assert caught, name  # rejected, with its reason, in some rounds...
        assert all(e["reward"] == 0 for e in rows if not e["accepted"])
        # ...and in the others its rating (ranked last by the assigned-data margin) keeps
        # its pay far below an honest contributor's
        assert totals.get(name, 0.0) <= 0.25 * honest_mean, (name, totals)
    lazy = {e["reason"].split(":")[0] for e in entries_of(decisions, "lazy") if e["reason"]}
    assert "lazy" in lazy
    nearcopy = [e["reason"] for e in entries_of(decisions, "nearcopy")]
    assert any(r.startswith("copy") for r in nearcopy), nearcopy


def test_the_near_copy_is_below_the_plain_cosine_threshold():
    rng = np.random.default_rng(0)
    honest = {"w": rng.standard_normal(64).astype(np.float32)}
    assert screening_cosine(honest, near_copy(honest, 3)) < 0.99


def test_a_sybil_flood_against_an_open_run_earns_nothing(runs):
    _, (_, decisions, _) = runs
    totals = rewards_by_contributor(decisions)
    for name in SYBILS:
        rows = entries_of(decisions, name)
        assert all(not e["accepted"] and e["reward"] == 0 for e in rows), rows
        reasons = {e["reason"].split(":")[0] for e in rows}
        assert reasons <= {"deferred", "copy", "duplicate"}, reasons
        assert totals.get(name, 0.0) == 0
    # the cap: at most new_keys_per_round newcomers a round get past admission
    for d in decisions:
        admitted = [
            e
            for e in d["contrib"]["entries"]
            if e["contributor"] in SYBILS and not e["reason"].startswith("deferred")
        ]
        assert len(admitted) <= GAUNTLET_POLICY.new_keys_per_round


def test_honest_contributors_keep_the_rewards_and_the_loss_holds(runs):
    (_, _, honest_losses), (_, decisions, losses) = runs
    totals = rewards_by_contributor(decisions)
    share = sum(totals[n] for n in HONEST) / sum(totals.values())
    assert share >= 0.9, totals
    gap = (losses[-1] - honest_losses[-1]) / honest_losses[-1]
    assert gap <= 0.02, (losses, honest_losses)


def test_a_sybil_flood_against_an_allowlisted_run_is_refused(tmp_path):
    policy = dataclasses.replace(GAUNTLET_POLICY)
    _, decisions, _ = gauntlet(
        tmp_path, 2, sybils=SYBILS, policy=policy, allowlist=allowlist_of(HONEST)
    )
    for d in decisions:
        entries = by_contributor(d)
        for name in SYBILS:
            assert entries[name]["reason"].startswith("not on the run's allowlist"), entries[name]
            assert entries[name]["reward"] == 0
        # admitted keys are not "new" in an allowlisted run: no cap defers them
        assert all(entries[n]["accepted"] for n in HONEST), [entries[n] for n in HONEST]
