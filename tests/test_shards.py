"""Tests of near_jax.diloco.protocol.shards: the run's shard plan, splitting and assembling."""

import jax
import numpy as np
import pytest
from helpers import random_tree

from near_jax.diloco.protocol import shards

SHAPES = {"emb": (64, 16), "blocks": {"w": (3, 16, 40), "n": (3, 16)}, "s": ()}


def test_small_leaves_group_and_large_ones_are_cut_in_powers_of_two():
    like = random_tree(0, SHAPES)
    plan = shards.plan_shards(like, 1024, {"['blocks']['w']": 1})
    # Tree order: blocks.n (192 B), blocks.w (7680 B: 8 slices of 2 rows along axis 1),
    # emb (4096 B: 4 slices of 16 rows), s (4 B).
    sizes = [4 * plan.shard_elements(s) for s in range(plan.num_shards)]
    assert sizes == [192] + [960] * 8 + [1024] * 4 + [4]
    w = [p for shard in plan.shards for p in shard if plan.paths[p.leaf] == "['blocks']['w']"]
    assert [(p.axis, p.start, p.stop) for p in w] == [(1, 2 * k, 2 * k + 2) for k in range(8)]
    assert all(size <= 1024 for size in sizes)


def test_grouping_starts_a_new_shard_when_the_next_leaf_would_overflow():
    like = {"a": np.zeros(100, np.float32), "b": np.zeros(100, np.float32), "c": np.zeros(10)}
    plan = shards.plan_shards(like, 800)  # a, b: 400 B each; c: 40 B
    assert [len(s) for s in plan.shards] == [2, 1]
    plan = shards.plan_shards(like, 799)
    assert [len(s) for s in plan.shards] == [1, 2]


@pytest.mark.parametrize("shard_bytes", [64, 200, 1024, 1 << 20])
def test_split_then_assemble_is_the_identity_bit_for_bit(shard_bytes):
    like = random_tree(1, SHAPES)
    plan = shards.plan_shards(like, shard_bytes, {"['emb']": 1})
    pieces = plan.split(like)
    assert sorted(pieces) == list(range(plan.num_shards))
    for s, shard in pieces.items():
        assert [x.shape for x in shard] == [tuple(x.shape) for x in plan.shard_like(s)]
    back = plan.assemble(pieces)
    assert jax.tree.structure(back) == jax.tree.structure(like)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(like), strict=True):
        np.testing.assert_array_equal(np.asarray(x).view(np.uint32), np.asarray(y).view(np.uint32))


def test_a_slice_is_at_least_one_index_thick():
    plan = shards.plan_shards({"w": np.zeros((2, 1000), np.float32)}, 64)
    assert plan.num_shards == 2 and plan.shard_elements(0) == 1000


def test_the_plan_is_a_function_of_shapes_bytes_and_axes():
    like = random_tree(0, SHAPES)
    a = shards.plan_shards(like, 512)
    assert a.plan_id() == shards.plan_shards(random_tree(9, SHAPES), 512).plan_id()
    assert a.plan_id() != shards.plan_shards(like, 1024).plan_id()
    assert a.plan_id() != shards.plan_shards(like, 512, {"['emb']": 1}).plan_id()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), like)
    assert shards.plan_shards(abstract, 512).plan_id() == a.plan_id()
    record = shards.plan_shards(like, 512, {"['emb']": 1}).describe()
    assert (
        shards.from_record(like, record).plan_id()
        == shards.plan_shards(like, 512, {"['emb']": 1}).plan_id()
    )


@pytest.mark.parametrize(
    "shard_bytes, axes, message",
    [
        (63, None, "too small"),
        (True, None, "must be an integer"),
        (1.5e6, None, "must be an integer"),
        (1024, {"['nope']": 0}, "do not have"),
        (1024, {"['emb']": 2}, "out of range"),
    ],
)
def test_bad_plans_are_one_line_errors(shard_bytes, axes, message):
    with pytest.raises(ValueError, match=message) as e:
        shards.plan_shards(random_tree(0, SHAPES), shard_bytes, axes)
    assert "\n" not in str(e.value)


def test_split_and_assemble_refuse_trees_and_pieces_that_do_not_fit():
    like = random_tree(0, SHAPES)
    plan = shards.plan_shards(like, 1024)
    with pytest.raises(ValueError, match="leaves"):
        plan.split({"emb": like["emb"]})
    pieces = plan.split(like)
    del pieces[2]
    with pytest.raises(ValueError, match=r"shards \[2\] are missing"):
        plan.assemble(pieces)


@pytest.mark.parametrize("fragments", [1, 2, 3, 5])
def test_fragments_cover_every_shard_once_per_f_rounds(fragments):
    plan = shards.plan_shards(random_tree(0, SHAPES), 1024, {"['blocks']['w']": 1})
    n = plan.num_shards  # 14
    rounds = [plan.fragment(fragments, r) for r in range(2 * fragments)]
    assert sorted(s for f in rounds[:fragments] for s in f) == list(range(n))
    assert rounds[:fragments] == rounds[fragments:]  # the same cycle again
    for f in rounds:  # contiguous, near-equal groups
        assert list(f) == list(range(f[0], f[-1] + 1))
        assert n // fragments <= len(f) <= -(-n // fragments)


def test_more_fragments_than_shards_is_a_one_line_error():
    plan = shards.plan_shards({"a": np.zeros(4, np.float32)}, 64)
    with pytest.raises(ValueError, match="2 fragments need 1 to 1 shards .* lower"):
        plan.fragment(2, 0)
