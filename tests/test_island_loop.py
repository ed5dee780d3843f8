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


@pytest.mark.parametrize("h, f", [(3, 1), (10, 3), (4, 2), (7, 7)])
def test_round_steps_of_f_fragments_add_up_to_h(h, f):
    steps = [loop.round_steps(h, f, r) for r in range(2 * f)]
    assert sum(steps[:f]) == h and steps[:f] == steps[f:]
    assert min(steps) == h // f and max(steps) - min(steps) <= 1


def _pieces(seed):
    rng = np.random.default_rng(seed)
    return {s: [rng.standard_normal((3, 5)).astype(np.float32)] for s in range(3)}


def test_restart_params_with_nothing_trained_since_the_push_is_the_new_version_bitwise():
    held, now = _pieces(0), _pieces(1)
    held[0][0][0, :2] = [-0.0, 0.0]  # signed zeros survive θ − (+0)
    out = loop.restart_params(held, now, now, {0, 2})  # τ = 0: pushed == now
    for s in (0, 2):
        assert out[s][0].tobytes() == held[s][0].tobytes()
    assert out[1] is now[1]  # not changed by the version: trained on as it is


def test_restart_params_keep_the_progress_made_since_the_push():
    held, pushed, now = _pieces(0), _pieces(1), _pieces(2)
    out = loop.restart_params(held, pushed, now, {1})
    want = held[1][0] - (pushed[1][0] - now[1][0])
    assert out[1][0].dtype == np.float32 and np.array_equal(out[1][0], want)
    assert out[0] is now[0] and out[2] is now[2]
    synchronous = loop.restart_params(held, None, now, {0, 1, 2})
    assert all(synchronous[s] is held[s] for s in range(3))
