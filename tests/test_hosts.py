"""Tests of near_jax.diloco.island.hosts in one process (8 CPU devices): boxes, pieces of
sharded global arrays, and device arrays built from held shards. Two real processes:
test_islands.py (a two-host island)."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from near_jax.diloco import protocol
from near_jax.diloco.island.hosts import Hosts, _box, _local, _overlap

SHAPES = {"emb": (64, 16), "w": (3, 16, 40), "n": (3, 16), "s": ()}
SPECS = {
    "emb": PartitionSpec(None, "fsdp"),
    "w": PartitionSpec(None, "fsdp", None),
    "n": PartitionSpec(None, "fsdp"),
    "s": PartitionSpec(),
}


def setup(shard_bytes=1024):
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    shardings = {k: NamedSharding(mesh, SPECS[k]) for k in SHAPES}
    rng = np.random.default_rng(0)
    tree = {k: rng.standard_normal(v).astype(np.float32) for k, v in SHAPES.items()}
    axes = {"['emb']": 1, "['w']": 1, "['n']": 1}
    plan = protocol.plan_shards(tree, shard_bytes, axes)
    arrays = {k: jax.device_put(tree[k], shardings[k]) for k in SHAPES}
    return plan, shardings, tree, arrays


def test_boxes_and_overlaps():
    assert _box((slice(None), slice(4, 8)), (3, 16)) == ((0, 3), (4, 8))
    assert _overlap(((0, 4), (0, 4)), ((2, 6), (3, 9))) == ((2, 4), (3, 4))
    assert _overlap(((0, 4),), ((4, 8),)) is None
    assert _local(((2, 4), (3, 4)), ((2, 6), (0, 9))) == (slice(0, 2), slice(3, 4))


def test_one_process_holds_and_owns_every_shard():
    plan, shardings, _, _ = setup()
    hosts = Hosts(plan, shardings)
    everything = list(range(plan.num_shards))
    assert (hosts.index, hosts.count) == (0, 1)
    assert hosts.held == everything and hosts.owned == everything and hosts.gathered == []
    assert hosts.agree(7) == 7
    assert hosts.gather_entries({1: ("ab" * 32, 5)}) == {1: ("ab" * 32, 5)}


@pytest.mark.parametrize("shard_bytes", [64, 1024, 1 << 20])
def test_pieces_of_sharded_arrays_are_the_plans_pieces(shard_bytes):
    """Assembled from the addressable shards of 8 devices (replicated over `data`)."""
    plan, shardings, tree, arrays = setup(shard_bytes)
    hosts = Hosts(plan, shardings)
    hosts.gather_leaves(arrays)
    got = hosts.pieces(arrays, hosts.owned)
    want = plan.split(tree)
    for s in hosts.owned:
        for x, y in zip(got[s], want[s], strict=True):
            np.testing.assert_array_equal(x, y)


def test_device_params_are_built_from_held_shards_bit_for_bit():
    plan, shardings, tree, _ = setup(256)
    hosts = Hosts(plan, shardings)
    dtypes = {k: np.dtype(np.float32) for k in SHAPES}
    params = hosts.device_params(plan.split(tree), shardings, dtypes)
    for k in SHAPES:
        assert params[k].sharding == shardings[k]
        np.testing.assert_array_equal(np.asarray(params[k]), tree[k])
    bf16 = hosts.device_params(plan.split(tree), shardings, {k: jax.numpy.bfloat16 for k in SHAPES})
    assert bf16["emb"].dtype == jax.numpy.bfloat16


def test_hosts_refuse_shardings_of_another_tree():
    plan, shardings, _, _ = setup()
    with pytest.raises(ValueError, match="param shardings"):
        Hosts(plan, {"emb": shardings["emb"]})
