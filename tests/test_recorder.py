"""The aggregator's ledger (`near_jax.contrib.recorder`): every contribution recorded once,
across restarts, rebuilt from the signed decisions rather than a forged store copy.
"""

import pytest
from contrib_world import HONEST, POLICY, RUN, World, close_round, inner

from near_jax.contrib import ledger, ledger_mirror, ledger_verify
from near_jax.diloco import protocol


def test_ledger_records_every_contribution_and_verifies(adversarial_run, tmp_path):
    world, decisions = adversarial_run
    copy = tmp_path / "ledger.sqlite"
    assert ledger_mirror.download(world.store, RUN, str(copy))
    assert ledger_verify.verify_chain(str(copy), RUN) == []
    with ledger.Ledger.open(str(copy), RUN) as book:
        rows = book.entries()
    assert len(rows) == sum(len(d["contrib"]["entries"]) for d in decisions) == 5 * 11 - 1
    replays = [r for r in rows if r["contributor"] == "replayer"]
    assert all("already seen from 'honest3'" in r["reason"] for r in replays)


def test_restarted_aggregator_records_a_committed_round_once(tmp_path):
    world = World(tmp_path, HONEST[:3], POLICY)
    base = world.base()
    for name in HONEST[:3]:
        world.push(name, inner(world.tree(base), name, 0))
    world.agg.quorum = 3

    def crash(*_):
        raise KeyboardInterrupt  # dies after the decision, before the ledger/publication

    world.agg._publish = crash
    with pytest.raises(KeyboardInterrupt):
        world.agg.run_round()
    world.agg.close()
    assert protocol.read_json(world.store, protocol.decision_key(RUN, 0)) is not None
    again = world.make_aggregator()
    assert again.load().version == 0
    stats = again.run_round()
    assert stats["replayed"] == 1 and stats["version"] == 1
    again.close()
    third = world.make_aggregator()
    assert third.load().version == 1  # nothing to catch up: no duplicate rows
    with ledger.Ledger.open(str(tmp_path / "local" / "ledger.sqlite"), RUN) as book:
        assert [r["contributor"] for r in book.entries()] == HONEST[:3]
    third.close()


def test_a_forged_store_ledger_is_never_adopted(tmp_path):
    world = World(tmp_path, HONEST[:2], POLICY)
    for _ in range(2):
        base = world.base()
        for name in HONEST[:2]:
            world.push(name, inner(world.tree(base), name, base.version))
        close_round(world, quorum=2)
    world.agg.close()
    local = tmp_path / "local" / "ledger.sqlite"
    # A forged mirror: a valid chain that pays honest1 everything, one round ahead.
    forged = tmp_path / "forged.sqlite"
    with ledger.Ledger.open(str(forged), RUN) as book:
        for rnd in range(3):
            book.append_round(
                rnd,
                [
                    {
                        "contributor": "honest1",
                        "key_id": "",
                        "payload_sha256": "",
                        "statement": "",
                        "signature": "",
                        "score": 9.0,
                        "accepted": True,
                        "applied": True,
                        "reason": "",
                        "reward": 1.0,
                    }
                ],
            )
    world.store.put(ledger_mirror.store_key(RUN), forged.read_bytes())
    local.unlink()  # a fresh machine: only the store and the decisions
    again = world.make_aggregator()
    assert again.load().version == 2
    again.close()
    with ledger.Ledger.open(str(local), RUN) as book:
        rows = book.entries()
    assert [r["contributor"] for r in rows] == HONEST[:2] * 2  # rebuilt from the decisions
    copy = tmp_path / "mirror.sqlite"
    assert ledger_mirror.download(world.store, RUN, str(copy))  # and the mirror was replaced
    with ledger.Ledger.open(str(copy), RUN) as book:
        assert book.entries() == rows
