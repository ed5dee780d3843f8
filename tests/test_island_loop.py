"""Tests of near_jax.diloco.island.loop, in-process: the island's data seed, waiting for the
run to be created, and reading its push's outcome from a decision. `train_island` runs as a
process (the island program) in test_islands.py."""

import numpy as np
import pytest
from helpers import small_config

from near_jax.diloco import protocol, startup
from near_jax.diloco.island import loop
from near_jax.diloco.startup import UsageError
from near_jax.diloco.store import ObjectStore


def test_island_seed_is_31_bits_and_differs_by_seed_island_and_version():
    seeds = {
        loop.island_seed(seed, island, version)
        for seed in (0, 1)
        for island in ("a", "b")
        for version in (0, 1, 2)
    }
    assert len(seeds) == 12 and all(0 <= s < 2**31 for s in seeds)
    # pinned: every process (and numpy ints from a config) must derive the same seed
    assert loop.island_seed(0, "a", 3) == 18445200
    assert loop.island_seed(np.int64(0), "a", np.int64(3)) == 18445200


def test_wait_for_run_returns_the_manifest(tmp_path):
    store = ObjectStore.open(str(tmp_path))
    cfg = small_config()
    manifest = {"run": "demo", **startup.manifest_fields(cfg)}
    store.put(protocol.manifest_key("demo"), protocol.dumps(manifest))
    assert loop._wait_for_run(cfg, store, "demo", "a", 1.0, 0.01) == manifest


def test_wait_for_run_refuses_an_unknown_run_or_another_model(tmp_path, capsys):
    store = ObjectStore.open(str(tmp_path))
    cfg = small_config()
    with pytest.raises(UsageError, match=r"^unknown run 'demo' in .*: no demo/run.json$"):
        loop._wait_for_run(cfg, store, "demo", "a", 0.05, 0.01)
    assert "island a: waiting up to 0.05s for run 'demo' to be created" in capsys.readouterr().err
    manifest = {"run": "demo", **startup.manifest_fields(small_config(n_layers=3))}
    store.put(protocol.manifest_key("demo"), protocol.dumps(manifest))
    with pytest.raises(UsageError, match="^config.model.n_layers=2 is not allowed: run 'demo' "):
        loop._wait_for_run(cfg, store, "demo", "a", 1.0, 0.01)
