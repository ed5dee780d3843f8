"""Index maps of growth: residual channels, units, heads, layer orders, and the refusals."""

import dataclasses

import numpy as np
import pytest
from helpers import model_config

from near_jax.grow import maps
from near_jax.grow.maps import NEW, GrowError


@pytest.mark.parametrize("d,d_new", [(4, 8), (4, 6), (6, 16), (5, 7), (8, 8)])
def test_clone_residual_keeps_every_channels_mean_square_and_reads_back_once(d, d_new):
    m = maps.residual_map(d, d_new, "clone")
    assert sorted(set(m.src.tolist())) == list(range(d))
    for j in range(d):
        copies = m.src == j
        # Sum of squares over a channel's copies = d'/d, so mean(x'^2) over d' = mean(x^2).
        np.testing.assert_allclose(np.sum(m.scale[copies] ** 2), d_new / d, rtol=1e-12)
        # A reader sums the copies back to exactly one source channel.
        np.testing.assert_allclose(np.sum(m.scale[copies] * m.read[copies]), 1.0, rtol=1e-12)
    assert m.norm == 1.0
    x = np.random.default_rng(0).standard_normal((3, d))
    x_new = x[:, m.src] * m.scale
    np.testing.assert_allclose(np.mean(x_new**2, -1), np.mean(x**2, -1), rtol=1e-12)


def test_zero_residual_keeps_the_channels_and_shrinks_the_norms():
    m = maps.residual_map(4, 6, "zero")
    assert m.src.tolist() == [0, 1, 2, 3, NEW, NEW]
    assert m.scale.tolist() == [1, 1, 1, 1, 0, 0]
    assert m.norm == pytest.approx(np.sqrt(4 / 6))


def test_units_are_tiled_and_counted():
    m = maps.unit_map(3, 7)
    assert m.src.tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert m.copies.tolist() == [3, 2, 2]
    assert m.first.tolist() == [True, True, True, False, False, False, False]


@pytest.mark.parametrize(
    "heads,kv,heads_new,kv_new",
    [
        (4, 2, 8, 2),
        (4, 2, 8, 4),
        (4, 2, 4, 4),
        (8, 2, 8, 8),
        (4, 2, 6, 3),
        (6, 2, 8, 4),
        (4, 1, 6, 3),
    ],
)
def test_every_query_head_keeps_its_own_kv_head_and_every_source_head_has_a_place(
    heads, kv, heads_new, kv_new
):
    cfg = model_config(n_heads=heads, n_kv_heads=kv, head_dim=16, d_model=64)
    new = model_config(n_heads=heads_new, n_kv_heads=kv_new, head_dim=16, d_model=64)
    q, kvm = maps.head_maps(cfg, new)
    group, group_new = heads // kv, heads_new // kv_new
    for head in range(heads_new):
        assert kvm.src[head // group_new] == q.src[head] // group
    assert (q.copies >= 1).all() and q.copies.sum() == heads_new
    assert kvm.src.tolist() == [j % kv for j in range(kv_new)]


def test_heads_that_have_no_place_are_refused():
    cfg = model_config(n_heads=9, n_kv_heads=3, head_dim=16, d_model=64)
    new = model_config(n_heads=10, n_kv_heads=5, head_dim=16, d_model=64)
    with pytest.raises(GrowError, match=r"n_heads/n_kv_heads 10/5 cannot hold the source's 9/3"):
        maps.head_maps(cfg, new)


@pytest.mark.parametrize(
    "depth,n,n_new,order",
    [
        ("stack", 2, 4, [0, 1, 0, 1]),
        ("stack", 3, 8, [0, 1, 2, 0, 1, 2, 1, 2]),
        ("stack", 4, 6, [0, 1, 2, 3, 2, 3]),
        ("stack", 3, 3, [0, 1, 2]),
        ("identity", 2, 5, [0, NEW, 1, NEW, NEW]),
        ("identity", 4, 6, [0, 1, NEW, 2, 3, NEW]),
        ("identity", 2, 2, [0, 1]),
    ],
)
def test_layer_orders(depth, n, n_new, order):
    assert maps.layer_order(n, n_new, depth).tolist() == order


def test_identity_keeps_source_layers_in_order_with_new_blocks_spread_evenly():
    order = maps.layer_order(16, 24, "identity")
    assert [x for x in order if x != NEW] == list(range(16))
    gaps = np.diff(np.flatnonzero(order == NEW))
    assert len(gaps) == 7 and set(gaps.tolist()) == {3}


SOURCE = model_config(d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, mlp_dim=128)


def _target(**changes):
    return dataclasses.replace(SOURCE, **{"d_model": 128, **changes})


@pytest.mark.parametrize(
    "changes,width,depth,match",
    [
        ({"vocab_size": 512}, "clone", "stack", r"model.vocab_size is 512 in the target but 384"),
        ({"head_dim": 32}, "clone", "stack", r"model.head_dim .*grow n_heads instead"),
        ({"rope_theta": 1e6}, "zero", "stack", r"model.rope_theta .*RoPE base"),
        ({"tie_embeddings": True}, "zero", "stack", r"must stay tied \(or untied\)"),
        ({"norm_eps": 1e-3}, "clone", "stack", r"model.norm_eps .*epsilon is part of the function"),
        ({"attention_window": 4}, "clone", "stack", r"model.attention_window .*span"),
        ({"n_layers": 1}, "clone", "stack", r"smaller: model.n_layers is 1 in the target, 2"),
        ({"d_model": 32}, "clone", "stack", r"smaller: model.d_model is 32"),
        ({"mlp_dim": 64}, "clone", "stack", r"smaller: model.mlp_dim is 64"),
        ({"n_kv_heads": 1, "n_heads": 4}, "clone", "stack", r"smaller: model.n_kv_heads"),
        ({"d_model": 64}, "clone", "stack", r"the source's shape: nothing to grow"),
        ({}, "copy", "stack", r"--width='copy' is not allowed: one of clone, zero"),
        ({}, "clone", "interleave", r"--depth='interleave' is not allowed: one of stack, iden"),
    ],
)
def test_growth_that_cannot_work_is_one_line(changes, width, depth, match):
    with pytest.raises(GrowError, match=match) as e:
        maps.check(SOURCE, _target(**changes), width, depth)
    assert "\n" not in str(e.value)


def test_what_is_preserved_says_n_a_for_a_dimension_that_does_not_grow():
    wider = dataclasses.replace(SOURCE, mlp_dim=256)
    assert maps.preserved(SOURCE, wider, "clone", "stack") == {
        "clone": maps.PRESERVES_FUNCTION["clone"],
        "stack": "n/a (unchanged)",
    }
    deeper = dataclasses.replace(SOURCE, n_layers=4)
    assert maps.preserved(SOURCE, deeper, "zero", "stack")["zero"] == "n/a (unchanged)"


def test_every_option_says_whether_it_preserves_the_function():
    assert set(maps.PRESERVES_FUNCTION) == set(maps.WIDTHS) | set(maps.DEPTHS)
    assert maps.PRESERVES_FUNCTION["stack"].startswith("no")
    assert all(maps.PRESERVES_FUNCTION[o].startswith("yes") for o in ("clone", "zero", "identity"))
