"""Tests of near_jax.diloco.assignment: assigned seeds, process-count-free streams, batches by
index, their eval loss, and an island of an assigned-data run training on exactly them."""

import dataclasses

import jax
import numpy as np
import pytest
from helpers import data_cfg, data_it, doc_text, small_config, take

from near_jax import data, sharding
from near_jax.diloco import assignment, protocol, startup
from near_jax.diloco.aggregator import Aggregator
from near_jax.diloco.island import loop
from near_jax.diloco.island.exchange import RoundResult
from near_jax.diloco.startup import UsageError
from near_jax.diloco.store import ObjectStore
from near_jax.train.loop import trainer_for

KEY_A, KEY_B = "ab" * 32, "cd" * 32


@pytest.fixture
def txt_dir(tmp_path):
    d = tmp_path / "txt"
    d.mkdir()
    for i in range(60):
        (d / f"doc{i:04d}.txt").write_text(doc_text(i) * (1 + i % 4))
    return d


def _same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _concat(parts):
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def test_assigned_seed_is_31_bits_deterministic_and_distinct():
    seeds = {
        assignment.assigned_seed(run, rnd, key)
        for run in ("demo", "other")
        for rnd in (0, 1, 2)
        for key in (KEY_A, KEY_B)
    }
    assert len(seeds) == 12 and all(0 <= s < 2**31 for s in seeds)
    # pinned: islands, aggregators and auditors must all derive the same seed
    assert assignment.assigned_seed("demo", 3, KEY_A) == 512876083
    assert assignment.assigned_seed("demo", np.int64(3), KEY_A.upper()) == 512876083


def test_assigned_follows_the_contrib_policy():
    assert assignment.assigned({"contrib": {"policy": {"assigned_data": True}}})
    assert not assignment.assigned({"contrib": {"policy": {"assigned_data": False}}})
    assert not assignment.assigned({"contrib": {"policy": {}}})  # recorded before the field
    assert not assignment.assigned({"inner_steps": 3})  # no contributors


@pytest.mark.parametrize("shards", [0, 2])
def test_global_batches_do_not_depend_on_the_process_count(txt_dir, shards):
    cfg = data_cfg(source=str(txt_dir), shards=shards, shuffle_window=16)
    one = take(assignment.stream(cfg, 7, 8, process_index=0, process_count=1), 3)
    halves = [assignment.stream(cfg, 7, 8, process_index=p, process_count=2) for p in (0, 1)]
    two = [_concat([next(it) for it in halves]) for _ in range(3)]
    assert all(_same(a, b) for a, b in zip(one, two, strict=True))
    assert one[0]["inputs"].shape == (8, 64) and halves[0].num_shards == (shards or 1)
    if not shards:  # a train run's pipeline cuts by the process count: other global batches
        plain = [data_it(cfg, seed=7, process_index=p, process_count=2) for p in (0, 1)]
        assert not _same(_concat([next(it) for it in plain]), one[0])


def test_batch_is_the_index_th_batch_of_the_stream(txt_dir):
    cfg = data_cfg(source=str(txt_dir))
    want = take(assignment.stream(cfg, 3, 8, process_index=0, process_count=1), 4)
    for i in (0, 3):
        assert _same(assignment.batch(cfg, 3, i, 8), want[i])
    assert not _same(want[0], want[1])
    assert not _same(assignment.batch(cfg, 4, 0, 8), want[0])  # another seed, other batches
    with pytest.raises(ValueError, match="^batch index -1 is negative$"):
        assignment.batch(cfg, 3, -1, 8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(config, trainer) of the small model reading a few text files, on one device."""
    d = tmp_path_factory.mktemp("docs")
    for i in range(40):
        (d / f"doc{i:04d}.txt").write_text(doc_text(i) * (2 + i % 5))
    cfg = small_config()
    cfg.data.source = str(d)
    return cfg, trainer_for(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1]))


def test_loss_fn_is_the_eval_loss_of_the_assigned_batch(tiny, monkeypatch):
    cfg, trainer = tiny
    params = jax.device_get(trainer.init(jax.random.key(0)).params)
    evaluate = assignment.loss_fn(trainer)
    host = assignment.batch(cfg.data, 5, 2, cfg.train.global_batch_size)
    total, weight = trainer.eval_step(
        jax.device_put(params, trainer.state_shardings.params),
        data.to_global_batch(host, trainer.batch_sharding),
    )
    want = float(total) / float(weight)
    assert evaluate(params, 5, 2) == pytest.approx(want, rel=1e-6) and 3 < want < 10
    assert evaluate(params, 5, 0) != evaluate(params, 5, 2)
    # batches are cached, and the cache is cleared once it holds the most it may
    reads = []
    real = assignment.batch
    monkeypatch.setattr(assignment, "_MAX_CACHED", 2)
    monkeypatch.setattr(assignment, "batch", lambda *a: reads.append(a[1:3]) or real(*a))
    evaluate = assignment.loss_fn(trainer)
    for seed, index in [(5, 0), (5, 1), (5, 0), (5, 1), (6, 0), (5, 0)]:
        evaluate(params, seed, index)
    assert reads == [(5, 0), (5, 1), (6, 0), (5, 0)]


# ------------------------------------------------------------------ an island of such a run

RUN = "assign"


class _Exchange:
    """An exchange that every round publishes the next version with the same params."""

    def __init__(self, *args, **kwargs):
        pass

    def finished_version(self) -> int:
        return -1

    def round(self, held, *args) -> RoundResult:
        after = dataclasses.replace(held, version=held.version + 1)
        return RoundResult(after, False, -1, False, 0, 0.0, True, False, False, None, "ok", "", {})


def _island(tiny, tmp_path, monkeypatch, policy, rounds=3, **kwargs) -> list[tuple[int, list]]:
    """Runs `rounds` rounds (H=2) of an island in a run with the contrib `policy`; returns the
    (seed, batches read) of every assigned stream it made."""
    cfg, trainer = tiny
    (tmp_path / "store").mkdir(parents=True)
    store = ObjectStore.open(str(tmp_path / "store"))
    params0 = jax.device_get(trainer.init(jax.random.key(cfg.seed)).params)
    agg = Aggregator(
        store,
        RUN,
        params0,
        spec="int8",
        lr=0.7,
        momentum=0.9,
        quorum=1,
        round_timeout=10.0,
        split_axes=startup.split_axes(trainer.state_shardings.params),
    )
    manifest = {**startup.manifest_fields(cfg), "inner_steps": 2, "contrib": {"policy": policy}}
    assert agg.create(params0, manifest)
    streams, real = [], assignment.stream

    def recording(data_cfg, seed, size, *args):
        it, read = real(data_cfg, seed, size, *args), []
        streams.append((seed, read))
        return iter(lambda: read.append(next(it)) or read[-1], None)

    monkeypatch.setattr(assignment, "stream", recording)
    monkeypatch.setattr(loop, "Exchange", _Exchange)
    monkeypatch.setattr(loop, "trainer_for", lambda *_: trainer)  # its step compiled once
    loop.train_island(
        cfg,
        trainer.mesh,
        store,
        RUN,
        "a",
        protocol.read_json(store, protocol.manifest_key(RUN)),
        rounds=rounds,
        make_signer=lambda manifest: None,
        **kwargs,
    )
    return streams


# With overlap τ = 1 the step trained while round r is exchanged reads round r + 1's first
# batch (the last round's reaches into round 3's): each round's Δ holds its H batches.
@pytest.mark.parametrize("overlap, reads", [(None, [2, 2, 2]), (1, [2, 2, 2, 1])])
def test_an_island_trains_round_r_on_its_assigned_batches(
    tiny, tmp_path, monkeypatch, capsys, overlap, reads
):
    cfg = tiny[0]
    streams = _island(
        tiny, tmp_path, monkeypatch, {"assigned_data": True}, assigned_key=KEY_A, overlap=overlap
    )
    want = [assignment.assigned_seed(RUN, r, KEY_A) for r in range(len(reads))]
    assert [s for s, _ in streams] == want
    # round r's H steps from index 0 of its stream: the τ trained while round r − 1 was
    # exchanged, then H − τ
    assert [len(read) for _, read in streams] == reads
    monkeypatch.undo()  # the real streams again
    seed, read = streams[1]
    for i, got in enumerate(read):
        assert _same(got, assignment.batch(cfg.data, seed, i, cfg.train.global_batch_size))
    assert "data: assigned per round (seed of round r from the key)" in capsys.readouterr().err


def test_an_island_of_an_assigned_run_needs_the_key(tiny, tmp_path, monkeypatch):
    with pytest.raises(UsageError, match="^run 'assign' assigns data by contributor key: no key"):
        _island(tiny, tmp_path, monkeypatch, {"assigned_data": True})


def test_an_island_of_a_run_recorded_before_assignments_reads_its_own_stream(
    tiny, tmp_path, monkeypatch, capsys
):
    streams = _island(tiny, tmp_path, monkeypatch, {}, rounds=1, assigned_key=KEY_A)
    assert streams == [] and "| data: seed " in capsys.readouterr().err
