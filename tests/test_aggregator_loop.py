"""Tests of near_jax.diloco.aggregator.loop, in-process: the run's outer settings, the rounds
loop (`aggregate`) on a numpy run with no eval, and contributor-run metrics. The program that
drives it runs as a process in test_islands.py."""

import ml_collections
from helpers import LIKE, RUN, metric_records, push, tree

from near_jax.diloco import protocol
from near_jax.diloco.aggregator import loop


def test_outer_settings_come_from_the_manifest_once_the_run_exists():
    cfg = ml_collections.ConfigDict(
        {"diloco": {"compression": "int8", "outer_lr": 0.7, "outer_momentum": 0.9}}
    )
    assert loop.outer_settings(cfg, None) == {"spec": "int8", "lr": 0.7, "momentum": 0.9}
    manifest = {"compression": "fp32", "outer_lr": 1.0, "outer_momentum": 0.0}
    assert loop.outer_settings(cfg, manifest) == {"spec": "fp32", "lr": 1.0, "momentum": 0.0}


def test_fixed_eval_of_no_batches_is_none():
    assert loop.fixed_eval(None, 0) is None


def test_contrib_stats():
    entries = [
        {"accepted": True, "score": 0.5},
        {"accepted": False, "score": 9.0},
        {"accepted": True, "score": 0.25},
    ]
    decision = {"contrib": {"entries": entries, "base_loss": 2.0}}
    assert loop.contrib_stats(decision) == {
        "contributions": 3,
        "score_base_loss": 2.0,
        "best_score": 0.5,
        "mean_score": 0.375,
    }
    none = {"contrib": {"entries": entries[1:2], "base_loss": None}}
    assert loop.contrib_stats(none) == {"contributions": 1}


def test_aggregate_closes_rounds_until_the_end_then_finishes(started, tmp_path):
    store, _, agg = started
    agg.quorum = 1
    logs = []
    agg.log = logs.append
    push(store, "a", 0, tree(50, 1e-2))
    loop.aggregate(
        agg, None, rounds=3, created=True, eval_batches=0, workdir=str(tmp_path / "work")
    )
    assert protocol.read_latest(store, RUN)["version"] == 3
    assert protocol.read_json(store, protocol.finished_key(RUN))["version"] == 3
    assert protocol.verify_run(store, RUN, LIKE) == []
    assert logs[0].startswith(f"run {RUN!r} created at version 0 in ")
    assert logs[1].startswith("round 0 -> version 1 (quorum) | accepted a | late - ")
    assert logs[2].startswith("round 1 -> version 2 (deadline) | accepted - ")
    assert logs[-1] == f"run {RUN!r} finished at version 3"
    records = metric_records(tmp_path / "work" / "metrics.jsonl", "aggregator")
    assert [r["round"] for r in records] == [0, 1, 2]
    assert [r["version"] for r in records] == [1, 2, 3]


def test_a_run_created_with_init_from_starts_at_that_runs_params(tmp_path):
    """The ladder's hand-off: the next rung's run starts from the grown (or trained) params."""
    import jax
    import numpy as np
    from helpers import random_params, save_run, small_config

    from near_jax import sharding
    from near_jax.diloco.aggregator import Aggregator
    from near_jax.diloco.store import ObjectStore
    from near_jax.train.loop import trainer_for

    cfg = small_config()
    params = random_params(cfg, seed=6)
    save_run(tmp_path / "rung", cfg, steps=(4,), params=params)
    cfg.checkpoint.init_from = str(tmp_path / "rung")
    trainer = trainer_for(cfg, sharding.make_mesh(cfg.mesh))
    store = ObjectStore.open(str(tmp_path / "store"), must_exist=False)
    like = trainer.abstract_state.params
    agg = Aggregator(
        store, "next", like, spec="fp32", lr=0.7, momentum=0.9, quorum=1, round_timeout=10.0
    )
    assert loop.create_run(agg, trainer, cfg, rounds=2)
    manifest = protocol.read_json(store, protocol.manifest_key("next"))
    assert manifest["init_from"] == {"run": str(tmp_path / "rung"), "step": 4}
    plan = protocol.run_plan(manifest, like)
    version0 = plan.assemble(protocol.pull_version(store, "next", 0, plan).params)
    for got, want in zip(jax.tree.leaves(version0), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(got, want)
