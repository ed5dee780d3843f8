"""Tests of near_jax.contrib.streamed: the Gram pass over stored shards, with and without
the indicator Gram matrix of the decoded Δs' non-zero positions, and sparse_spec."""

import jax
import numpy as np
import pytest

from near_jax.contrib import streamed
from near_jax.diloco import protocol
from near_jax.diloco.store import ObjectStore

RUN = "srun"
LIKE = {"w": np.zeros((12, 20), np.float32), "b": np.zeros(20, np.float32)}


def test_sparse_spec():
    assert streamed.sparse_spec("int8+topk=0.1") and streamed.sparse_spec("int2:chunk=64+topk=0.01")
    assert not streamed.sparse_spec("int8") and not streamed.sparse_spec("fp32+topk=0")
    with pytest.raises(ValueError, match="bad compression spec"):
        streamed.sparse_spec("int9+topk=0.1")


@pytest.fixture
def round0(tmp_path):
    """(store, plan, candidates, history, whole Δs as the validator decodes them): five
    islands' int8+topk=0.1 contributions to round 0 over several shards."""
    store = ObjectStore.open(str(tmp_path))
    plan = protocol.plan_shards(LIKE, 256)
    assert plan.num_shards > 2
    hashes = protocol.write_version0(store, RUN, plan, LIKE)
    base = protocol.load_version(store, RUN, 0, plan, hashes)
    rng = np.random.default_rng(0)
    sources = []
    for i in range(5):
        delta = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in LIKE.items()}
        island = f"i{i}"
        spec = "int8+topk=0.1"
        assert protocol.push_contribution(store, RUN, island, base, plan, plan.split(delta), spec)[
            0
        ]
        sha = protocol.sha256(store.get(protocol.contrib_key(RUN, 0, island)))
        sources.append(streamed.contribution_source(store, RUN, plan, 0, island, sha))
    whole = [
        np.concatenate(
            [
                np.ravel(x)
                for x in jax.tree.leaves(protocol.read_contribution(store, RUN, 0, plan, f"i{i}"))
            ]
        ).astype(np.float64)
        for i in range(5)
    ]
    return store, plan, [s.verdict for s in sources[:4]], sources[4:], whole


def test_gram_with_indicators_counts_shared_positions(round0):
    store, plan, candidates, history, whole = round0
    g = streamed.gram(store, RUN, plan, 0, candidates, history, indicators=True)
    dots = np.array([[a @ b for b in whole] for a in whole])
    both = np.array([[np.sum((a != 0) & (b != 0)) for b in whole] for a in whole])
    assert all(0.05 < np.mean(w != 0) < 0.15 for w in whole)  # top-k: sparse
    np.testing.assert_allclose(g.matrix, dots, rtol=1e-10)
    assert g.overlap.tolist() == both.tolist()
    chosen = [candidates[3], candidates[1]]
    rows = [3, 1, 4]
    np.testing.assert_allclose(g.sub(chosen), dots[np.ix_(rows, rows)], rtol=1e-10)
    assert g.sub_overlap(chosen).tolist() == both[np.ix_(rows, rows)].tolist()
    plain = streamed.gram(store, RUN, plan, 0, candidates, history)
    assert plain.overlap is None and plain.sub_overlap(chosen) is None
    np.testing.assert_array_equal(plain.matrix, g.matrix)


def test_a_candidate_with_a_bad_shard_drops_out_of_both_matrices(round0):
    store, plan, candidates, history, whole = round0
    store.put(protocol.contrib_shard_key(RUN, 0, "i2", 1), b"junk")
    g = streamed.gram(store, RUN, plan, 0, candidates, history, indicators=True)
    assert [c.island for c in g.candidates] == ["i0", "i1", "i3"]
    assert candidates[2].reason.startswith("invalid: shard 1") and candidates[2].manifest is None
    keep = [0, 1, 3, 4]
    both = np.array([[np.sum((whole[a] != 0) & (whole[b] != 0)) for b in keep] for a in keep])
    assert g.overlap.shape == g.matrix.shape == (4, 4)
    assert g.overlap.tolist() == both.tolist()
