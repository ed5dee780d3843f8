"""The aggregator's ledger (`near_jax.contrib.recorder`): every contribution recorded once,
across restarts, rebuilt from the signed decisions rather than a forged store copy.
"""

import json

import pytest
from contrib_world import HONEST, POLICY, RUN, World, close_round, inner

from near_jax.contrib import identity, ledger, ledger_mirror, ledger_verify
from near_jax.diloco import protocol


def test_ledger_records_every_contribution_and_verifies(adversarial_run, tmp_path):
    world, decisions = adversarial_run
    copy = tmp_path / "ledger.sqlite"
    assert ledger_mirror.download(world.store, RUN, str(copy), world.agg_key.public_hex)
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


def run_rounds(world, n: int) -> None:
    for _ in range(n):
        base = world.base()
        for name in HONEST[:2]:
            world.push(name, inner(world.tree(base), name, base.version))
        close_round(world, quorum=2)


def restart(world, monkeypatch) -> tuple:
    """A new aggregator loaded on the same store: (it, the ledger keys it put, its log)."""
    world.agg.close()
    put, keys, log = world.store.put, [], []

    def spy(key, body):
        if key.startswith(f"{RUN}/ledger/"):
            keys.append(key)
        return put(key, body)

    monkeypatch.setattr(world.store, "put", spy)
    again = world.make_aggregator()
    again.log = log.append
    again.load()
    world.agg = again
    return again, keys, log


def test_each_round_puts_its_segment_and_the_index_and_a_restart_resumes(tmp_path, monkeypatch):
    world = World(tmp_path, HONEST[:2], POLICY)
    run_rounds(world, 2)
    index = ledger_mirror.read_index(world.store, RUN, world.agg_key.public_hex)
    assert index["last_round"] == 1 and index["entries"] == 4
    again, keys, log = restart(world, monkeypatch)
    assert keys == [] and log == []  # the store is up to date: nothing put again
    run_rounds(world, 1)
    assert keys == [ledger_mirror.segment_key(RUN, 2), ledger_mirror.index_key(RUN)]
    # an older index, genuinely signed (rolled back): the segments after it are put again
    with ledger.Ledger.open(str(tmp_path / "local" / "ledger.sqlite"), RUN) as book:
        ledger_mirror.upload_rounds(world.store, book, 1, 0, world.agg_key)
    again, keys, log = restart(world, monkeypatch)
    assert keys == [
        *(ledger_mirror.segment_key(RUN, r) for r in (1, 2)),
        ledger_mirror.index_key(RUN),
    ]
    assert log == []
    again.close()
    copy = tmp_path / "copy.sqlite"
    assert ledger_mirror.download(world.store, RUN, str(copy), world.agg_key.public_hex)
    with ledger.Ledger.open(str(copy), RUN) as book:
        assert [r["round"] for r in book.entries()] == [0, 0, 1, 1, 2, 2]


def test_a_round_without_entries_still_gets_a_segment(tmp_path):
    world = World(tmp_path, HONEST[:2], POLICY)
    close_round(world, quorum=0)  # nobody pushed
    seg = json.loads(world.store.get(ledger_mirror.segment_key(RUN, 0)))
    assert seg["round"] == 0 and seg["entries"] == []
    assert ledger_mirror.read_index(world.store, RUN, world.agg_key.public_hex)["last_round"] == 0


def test_a_forged_store_ledger_is_never_adopted(tmp_path, monkeypatch):
    world = World(tmp_path, HONEST[:2], POLICY)
    run_rounds(world, 2)
    world.agg.close()
    local = tmp_path / "local" / "ledger.sqlite"
    # A forged mirror: a valid chain that pays honest1 everything, one round ahead,
    # under an index signed by another key.
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
    ledger_mirror.upload(world.store, RUN, str(forged), identity.generate())
    local.unlink()  # a fresh machine: only the store and the decisions
    again, keys, log = restart(world, monkeypatch)
    assert again.state.version == 2
    again.close()
    assert len(log) == 1 and "not signed by the aggregator key" in log[0], log
    assert keys == [
        *(ledger_mirror.segment_key(RUN, r) for r in (0, 1)),
        ledger_mirror.index_key(RUN),
    ]
    with ledger.Ledger.open(str(local), RUN) as book:
        rows = book.entries()
    assert [r["contributor"] for r in rows] == HONEST[:2] * 2  # rebuilt from the decisions
    copy = tmp_path / "mirror.sqlite"
    # the mirror was replaced (the planted round-2 segment is no continuation of its chain)
    assert ledger_mirror.download(world.store, RUN, str(copy), world.agg_key.public_hex)
    with ledger.Ledger.open(str(copy), RUN) as book:
        assert book.entries() == rows
