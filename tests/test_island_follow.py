"""Tests of near_jax.diloco.island.follow, in-process: waiting, reading `latest` that others
may have damaged, and catching up by updates or by a full pull. Islands run as processes in
test_islands.py."""

import pytest
from helpers import LR, MU, RUN, plan, push, tree

from near_jax.diloco import protocol
from near_jax.diloco.island import follow


def rounds(store, agg, n, seed=70):
    """Closes n rounds, each with one contribution of island "a"."""
    agg.quorum = 1
    for _ in range(n):
        push(store, "a", agg.state.version, tree(seed + agg.state.version, 1e-2))
        agg.run_round()


def test_kb():
    assert follow.kb(1234) == "1.2 kB" and follow.kb(0) == "0.0 kB"


def test_waiter_returns_the_first_true_value_or_times_out(monkeypatch):
    values = iter([None, 0, {"version": 3}])
    monkeypatch.setattr(follow.time, "sleep", lambda s: None)
    assert follow.Waiter(0.01, 0).until("x", lambda: next(values)) == {"version": 3}
    with pytest.raises(protocol.ProtocolError, match="^waited 0.05s for the decision$"):
        follow.Waiter(0.01, 0.05).until("the decision", lambda: follow.time.perf_counter() < 0)


def test_tolerant_turns_damage_into_none_and_warns_once(capsys):
    def damaged():
        raise protocol.ProtocolError("demo/latest is not JSON: boom-tolerant")

    assert follow.tolerant("x", lambda: 5) == 5
    assert follow.tolerant("x", damaged) is None
    assert follow.tolerant("x", damaged) is None
    err = capsys.readouterr().err
    assert err.count("boom-tolerant") == 1
    assert err.startswith("island x: warning: demo/latest is not JSON: boom-tolerant; ")


def test_newer_is_latest_once_past_the_version(started):
    store, _, agg = started
    assert follow.newer(store, RUN, 0, "x") is None
    rounds(store, agg, 2)
    assert follow.newer(store, RUN, 0, "x")["version"] == 2
    assert follow.newer(store, RUN, 2, "x") is None
    agg.finish()
    assert follow.newer(store, RUN, 2, "x")["version"] == 2  # finished: no newer will come


def test_newer_treats_a_damaged_latest_as_not_there(started, capsys):
    store, _, agg = started
    rounds(store, agg, 1)
    store.put(protocol.latest_key(RUN), protocol.dumps({"version": "9"}))
    assert follow.newer(store, RUN, 0, "x") is None
    store.put(protocol.latest_key(RUN), b"not json")
    assert follow.newer(store, RUN, 0, "x") is None
    err = capsys.readouterr().err
    assert f"{protocol.latest_key(RUN)}: it names no version" in err
    assert "is not JSON" in err


def test_catch_up_by_updates_when_close_else_by_a_full_pull(started):
    store, _, agg = started
    n = protocol.MAX_CHAIN + 1
    rounds(store, agg, n)
    cut = plan()
    v0 = protocol.pull_version(store, RUN, 0, cut)
    args = (cut, LR, MU)
    held, pulled = follow.catch_up(store, RUN, "x", v0, n - 1, *args)
    assert not pulled and held.version == n - 1
    assert held.hashes() == protocol.pull_version(store, RUN, n - 1, cut).hashes()
    held, pulled = follow.catch_up(store, RUN, "x", v0, n, *args)  # MAX_CHAIN + 1 behind
    assert pulled and held.hashes() == protocol.pull_version(store, RUN, n, cut).hashes()
    held, pulled = follow.catch_up(store, RUN, "x", None, 1, *args)  # nothing held
    assert pulled and held.version == 1


def test_catch_up_pulls_in_full_when_an_update_does_not_match(started, capsys):
    store, _, agg = started
    rounds(store, agg, 2)
    cut = plan()
    v0 = protocol.pull_version(store, RUN, 0, cut)
    v1 = protocol.load_version(store, RUN, 1, cut)
    store.put(v1.manifest.key("update", 2), protocol.tree_bytes(cut.split(tree(5, 1e-2))[2]))
    held, pulled = follow.catch_up(store, RUN, "x", v0, 2, cut, LR, MU)
    assert pulled and held.hashes() == protocol.pull_version(store, RUN, 2, cut).hashes()
    err = capsys.readouterr().err
    assert "cannot follow by updates" in err and "pulling the full version" in err


def test_catch_up_pulls_the_latest_when_the_target_was_collected(started):
    store, _, agg = started
    agg.keep_versions = 2
    rounds(store, agg, 4)  # versions 0..2 collected: only 3 and 4 are stored in full
    held, pulled = follow.catch_up(store, RUN, "x", None, 1, plan(), LR, MU)
    assert pulled and held.version == 4


def test_newer_rereads_latest_when_the_run_finished_meanwhile(started, monkeypatch):
    """The last round publishes `latest` and then `finished` between the island's read of
    `latest` and its check of `finished`: newer returns the final version, not the stale one."""
    store, _, _ = started
    real = protocol.read_latest
    reads = []

    def read_latest(store, run):
        reads.append(1)
        if len(reads) == 1:  # the island's first read: before the last round was published
            return real(store, run)
        return {**real(store, run), "version": 1}

    store.put(protocol.finished_key(RUN), protocol.dumps({"version": 1}))
    monkeypatch.setattr(protocol, "read_latest", read_latest)
    assert follow.newer(store, RUN, 0, "a")["version"] == 1 and len(reads) == 2
