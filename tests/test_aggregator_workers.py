"""Tests of near_jax.diloco.aggregator.workers: a round closed over K workers equals K = 1."""

import pytest
from helpers import LIKE, RUN, FakeClock, make_aggregator, plan, push, tree

from near_jax.diloco import protocol
from near_jax.diloco.aggregator import ShardWorker, parse_shards, workers
from near_jax.diloco.protocol import streaming
from near_jax.diloco.store import ObjectStore

ROUNDS = 3


class Crash(Exception):
    pass


def run_rounds(path, count, crash_worker_in_round=None, bad_shard_in_round=None):
    """ROUNDS rounds of 3 islands with K = count; the coordinator's sleeps drive the
    workers (one poll each), so everything runs in this thread. In `crash_worker_in_round`
    worker 1 dies after writing one shard's outputs and a new one takes over. Returns
    (store, decisions, proposals each worker derived, rounds in which a worker died)."""
    path.mkdir()
    store, clock = ObjectStore.open(str(path)), FakeClock()
    agg = make_aggregator(store, clock)
    agg.workers = count
    assert agg.create(tree(1), {"inner_steps": 3})
    agg.load()
    pool = {i: ShardWorker(store, RUN, LIKE, i, count) for i in range(1, count)}
    crashed, original = [], streaming.derive_shard

    def crashing(*args, **kwargs):
        if crashing.calls == 1:  # the second shard: the first one's outputs are written
            raise Crash()
        crashing.calls += 1
        return original(*args, **kwargs)

    def sleep(dt):
        clock.sleep(dt)
        r = agg.state.version
        if r == crash_worker_in_round and not crashed:
            crashing.calls = 0
            streaming.derive_shard = crashing
            try:
                pool[1].poll_once()
            except Crash:
                crashed.append(r)
                pool[1] = ShardWorker(store, RUN, LIKE, 1, count)  # restarted: all from store
            finally:
                streaming.derive_shard = original
        for worker in pool.values():
            worker.poll_once()

    agg.sleep = sleep
    for r in range(ROUNDS):
        for k, name in enumerate("abc"):
            push(store, name, r, tree(100 * r + k, 1e-2))
        if r == bad_shard_in_round:  # "b" rewrites shard 3 (worker 1's) after its manifest
            body = protocol.tree_bytes(plan().split(tree(5))[3])
            store.put(protocol.contrib_shard_key(RUN, r, "b", 3), body)
        agg.run_round()
    decisions = [protocol.read_json(store, protocol.decision_key(RUN, r)) for r in range(ROUNDS)]
    return store, decisions, {i: w.done for i, w in pool.items()}, crashed


def comparable(decision):
    return {k: v for k, v in decision.items() if k != "closed_at"}


def test_k_workers_give_the_same_bits_as_one(tmp_path):
    _, one, _, _ = run_rounds(tmp_path / "k1", 1)
    store, three, done, _ = run_rounds(tmp_path / "k3", 3)
    assert [comparable(d) for d in three] == [comparable(d) for d in one]
    assert done == {1: ROUNDS, 2: ROUNDS}
    assert protocol.verify_run(store, RUN, LIKE) == []
    # Worker 2 wrote only its shards (2 of 5: shard 2 only, s mod 3 == 2) and a result.
    prefix = protocol.load_version(store, RUN, 1, plan()).manifest.prefix
    result = protocol.read_json(store, workers.result_key(RUN, 0, prefix.split("/")[4], 2, 3))
    assert sorted(result["shards"]) == ["2"]


def test_a_worker_killed_mid_round_and_restarted_gives_the_same_decision(tmp_path):
    _, one, _, _ = run_rounds(tmp_path / "k1", 1)
    store, two, _, crashed = run_rounds(tmp_path / "k2", 2, crash_worker_in_round=1)
    assert crashed == [1]
    assert [comparable(d) for d in two] == [comparable(d) for d in one]
    assert protocol.verify_run(store, RUN, LIKE) == []


def test_a_bad_shard_found_by_a_worker_rejects_its_contribution(tmp_path):
    _, one, _, _ = run_rounds(tmp_path / "k1", 1, bad_shard_in_round=1)
    store, two, _, _ = run_rounds(tmp_path / "k2", 2, bad_shard_in_round=1)
    assert [comparable(d) for d in two] == [comparable(d) for d in one]
    rejected = two[1]["rejected"]
    assert [e["island"] for e in rejected] == ["b"] and "shard 3" in rejected[0]["reason"]
    # The abandoned proposal's outputs are gone once round 1 committed.
    outs = {k.split("/")[4] for k in store.list(protocol.outs_prefix(RUN, 1))}
    assert len(outs) == 1


@pytest.mark.parametrize("text, parsed", [("0/1", (0, 1)), ("1/2", (1, 2)), ("3/4", (3, 4))])
def test_parse_shards(text, parsed):
    assert parse_shards(text) == parsed


@pytest.mark.parametrize("text", ["", "1", "2/2", "-1/2", "a/b", "1/0", "0/1/2", " 0/1"])
def test_parse_shards_refuses_with_one_line(text):
    with pytest.raises(ValueError, match="is not i/K") as e:
        parse_shards(text)
    assert "\n" not in str(e.value)
