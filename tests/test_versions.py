"""Tests of near_jax.diloco.protocol.versions: the numpy outer step and mean, bit for bit.

Islands and the aggregator must reach the same bits on any machine (versions are checked by
sha256), so the goldens pin what `outer_update` and `average` make of fixed inputs that use no
RNG. They were produced with numpy 2.4.6 on x86-64 (AMD EPYC, AVX-512) by these tests' own
code; a numpy upgrade or another CPU that changes one byte fails here. The outer step's
agreement with optax is tested first.
"""

import os

import jax
import numpy as np
import pytest
from helpers import LIKE, LR, RUN, bits_equal, hashed_tree, leaves_sha256, plan, push, tree

from near_jax.diloco import protocol
from near_jax.diloco.outer import outer_optimizer, outer_step


@pytest.mark.parametrize("mu", [0.9, 0.0])
def test_numpy_outer_update_is_bit_identical_to_optax(mu):
    """Host numpy float32 == optax op by op. A jitted step may fuse (e.g. into FMAs) and
    differ in the last bit, which is why islands and the aggregator step on the host."""
    params, momentum = tree(1), protocol.zeros_like(LIKE)
    opt = outer_optimizer(LR, mu)
    ref_params, ref_state = params, opt.init(params)
    jitted = jax.jit(lambda p, s, d: outer_step(opt, p, s, d))
    for step in range(5):
        delta = tree(10 + step, scale=1e-2)
        params, momentum = protocol.outer_update(params, momentum, delta, LR, mu)
        eager = outer_step(opt, ref_params, ref_state, delta)
        jit_params, _ = jitted(ref_params, ref_state, delta)
        ref_params, ref_state = eager
        assert bits_equal(params, ref_params)
        for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(jit_params), strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
        if mu:
            assert bits_equal(momentum, ref_state[0].trace)


# -------------------------------------------------------------------------------- goldens

GOLDEN_PARAMS0 = "05cab80b78d68edf0e3d24a449730a21dec15a96ec286ad3a512c6e9cecb202c"
# momentum μ → (params, momentum) after three steps of lr 0.7 from hashed_tree(100, 1.0) and
# zero momentum, with updates hashed_tree(200), (201), (202).
GOLDEN_OUTER = {
    0.9: (
        "e36d3ff793d145f93443dd783eedf5a70e187d9b846b6eb8af12d53370c4e7ce",
        "ca2a792d40652688d1795111177cb924ccc6a6c0324b99402211fbcb3f698d41",
    ),
    0.0: (
        "efe239b8a61eb012c776e97590b1a3bfea89e7648169e9e0c3584b6b2ca8db1e",
        "7f940f388dff02a4f956e483bb83d796c6b7e80d40704e13c67505a1cdf779b0",  # zeros: kept as is
    ),
}
# The mean of hashed_tree(300), (301), (302).
GOLDEN_AVERAGE = "557585ded1c9335a7178694367886c41d466433f99655a8d09224d2ffd8d7412"


@pytest.mark.parametrize("mu", sorted(GOLDEN_OUTER))
def test_outer_update_bytes_are_pinned(mu):
    params = hashed_tree(100, scale=1.0)
    assert leaves_sha256(params) == GOLDEN_PARAMS0  # else the input moved, not the step
    momentum = protocol.zeros_like(params)
    for seed in (200, 201, 202):
        params, momentum = protocol.outer_update(params, momentum, hashed_tree(seed), 0.7, mu)
    assert (leaves_sha256(params), leaves_sha256(momentum)) == GOLDEN_OUTER[mu]


def test_average_bytes_are_pinned():
    mean = protocol.average([hashed_tree(seed) for seed in (300, 301, 302)])
    assert leaves_sha256(mean) == GOLDEN_AVERAGE


# ------------------------------------------------------------------ shard-by-shard pulls


class Interrupted(Exception):
    pass


def test_an_interrupted_full_pull_resumes_without_rereading_finished_shards(started, tmp_path):
    store, _, agg = started
    agg.quorum = 1
    push(store, "a", 0, tree(40, 1e-2))
    agg.run_round()
    cut = plan()
    read, real_get = [], store.get

    def get(key, max_bytes=None):
        if "/params/" in key or "/momentum/" in key:
            if len(read) == 5:  # the 6th shard object: the connection drops
                raise Interrupted()
            read.append(key)
        return real_get(key) if max_bytes is None else real_get(key, max_bytes=max_bytes)

    store.get = get
    cache = protocol.PullCache(str(tmp_path / "cache"))
    with pytest.raises(Interrupted):
        protocol.pull_version(store, RUN, 1, cut, cache=cache)
    first = list(read)
    assert len(first) == 5 and len(os.listdir(tmp_path / "cache")) == 5
    read.clear()
    cache = protocol.PullCache(str(tmp_path / "cache"))  # a restarted island: from disk
    held = protocol.pull_version(store, RUN, 1, cut, cache=cache)
    assert not set(read) & set(first) and len(read) == 2 * cut.num_shards - 5
    assert os.listdir(tmp_path / "cache") == []  # done: the cache is cleared
    store.get = real_get
    assert held.hashes() == protocol.pull_version(store, RUN, 1, cut).hashes()
    assert bits_equal(held.tree(cut), protocol.pull_version(store, RUN, 1, cut).tree(cut))


def test_a_damaged_cache_file_is_fetched_again(tmp_path):
    cache = protocol.PullCache(str(tmp_path))
    body = b"shard bytes"
    sha = protocol.sha256(body)
    cache.put(sha, body)
    assert cache.get(sha) == body
    (tmp_path / sha).write_bytes(b"shard bytez")
    assert cache.get(sha) is None
    memory = protocol.PullCache()
    memory.put(sha, body)
    assert memory.get(sha) == body and memory.get("0" * 64) is None
    memory.clear()
    assert memory.get(sha) is None
