"""Tests of near_jax.diloco.outer: the jax outer step of in-mesh DiLoCo (and its reference).

The protocol's numpy `versions.outer_update` claims the same operations in the same order as
`outer_step(outer_optimizer(lr, mu), …)`, so the eager jax step is checked against it bit for
bit on random float32 trees over several steps; a jitted step may fuse and is held to float32
tolerance.
"""

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import bits_equal

from near_jax.diloco import outer
from near_jax.diloco.outer import outer_optimizer, outer_step, pseudo_gradient
from near_jax.diloco.protocol.objects import zeros_like
from near_jax.diloco.protocol.versions import outer_update

SHAPES = {"emb": (7, 16), "blocks": [{"w": (16, 8), "b": (8,)}, {"w": (8, 16)}], "s": ()}


def random_tree(seed, scale=1.0):
    return helpers.random_tree(seed, SHAPES, scale)


@pytest.mark.parametrize("lr,mu", [(0.7, 0.9), (0.5, 0.0), (1.3, 0.5)])
def test_outer_step_equals_the_numpy_protocol_step_over_several_steps(lr, mu):
    params = random_tree(1)
    opt = outer_optimizer(lr, mu)
    jax_params, state = params, opt.init(params)
    np_params, np_momentum = params, zeros_like(params)
    jitted = jax.jit(lambda p, s, d: outer_step(opt, p, s, d))
    for step in range(6):
        delta = random_tree(100 + step, scale=1e-2)
        jit_params, _ = jitted(jax_params, state, delta)
        jax_params, state = outer_step(opt, jax_params, state, delta)
        np_params, np_momentum = outer_update(np_params, np_momentum, delta, lr, mu)
        assert bits_equal(jax_params, np_params)
        if mu:
            assert bits_equal(state[0].trace, np_momentum)
        for x, y in zip(jax.tree.leaves(jit_params), jax.tree.leaves(np_params), strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def test_momentum_zero_is_plain_sgd_with_no_trace():
    params, delta = random_tree(2), random_tree(3, scale=1e-2)
    opt = outer_optimizer(0.7, 0.0)
    state = opt.init(params)
    assert not any(
        hasattr(s, "trace") for s in jax.tree.leaves(state, is_leaf=lambda x: hasattr(x, "trace"))
    )
    new, _ = outer_step(opt, params, state, delta)
    for p, d, n in zip(*(jax.tree.leaves(t) for t in (params, delta, new)), strict=True):
        np.testing.assert_array_equal(n, p + np.float32(-0.7) * d)


def test_pseudo_gradient_is_global_minus_local_in_float32():
    glob = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), random_tree(4))
    local = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), random_tree(5))
    delta = pseudo_gradient(glob, local)
    for g, p, d in zip(*(jax.tree.leaves(t) for t in (glob, local, delta)), strict=True):
        assert d.dtype == jnp.float32
        np.testing.assert_array_equal(d, g.astype(jnp.float32) - p.astype(jnp.float32))


def test_lr1_momentum0_of_the_mean_pseudo_gradient_is_parameter_averaging():
    glob = random_tree(6)
    replicas = [random_tree(10 + r) for r in range(4)]
    delta = jax.tree.map(lambda *d: sum(d) / 4, *(pseudo_gradient(glob, r) for r in replicas))
    opt = outer_optimizer(1.0, 0.0)
    new, _ = outer_step(opt, glob, opt.init(glob), delta)
    mean = jax.tree.map(lambda *r: sum(r) / 4, *replicas)
    for x, y in zip(jax.tree.leaves(new), jax.tree.leaves(mean), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)


def test_params_keep_their_dtype():
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), random_tree(7))
    opt = outer_optimizer(0.7, 0.9)
    new, _ = outer_step(opt, params, opt.init(params), random_tree(8, scale=1e-2))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(new))


def test_mask_steps_only_the_masked_params_and_momentum():
    """Streaming fragments: masked-out leaves keep params and momentum; masked-in leaves take
    exactly the unmasked step."""
    params = random_tree(9)
    opt = outer_optimizer(0.7, 0.9)
    state = opt.init(params)
    params, state = outer_step(opt, params, state, random_tree(20, scale=1e-2))  # momentum ≠ 0
    mask = {"emb": True, "blocks": [{"w": False, "b": True}, {"w": False}], "s": True}
    delta = random_tree(21, scale=1e-2)
    full_params, full_state = outer_step(opt, params, state, delta)
    got_params, got_state = outer_step(opt, params, state, delta, mask)
    before, full, got = (jax.tree.leaves(t) for t in (params, full_params, got_params))
    traces = (jax.tree.leaves(s[0].trace) for s in (state, full_state, got_state))
    for m, p, fp, gp, tr, ftr, gtr in zip(
        jax.tree.leaves(mask), before, full, got, *traces, strict=True
    ):
        np.testing.assert_array_equal(gp, fp if m else p)
        np.testing.assert_array_equal(gtr, ftr if m else tr)


def test_settings_fill_each_minus_one_with_the_optimizers_default():
    from near_jax import config as config_lib

    dl = config_lib.default_config().diloco
    assert outer.settings(dl) == outer.OuterSettings("nesterov", 0.7, 0.9, 1.0)
    dl.outer_optimizer = "sparseloco"
    assert outer.settings(dl) == outer.OuterSettings("sparseloco", 1.0, 0.0, 0.95)
    dl.outer_lr, dl.feedback_decay = 0.5, 0.9
    assert outer.settings(dl.to_dict()) == outer.OuterSettings("sparseloco", 0.5, 0.0, 0.9)


def test_sparseloco_refuses_outer_momentum():
    with pytest.raises(ValueError, match="no outer momentum"):
        outer.OuterSettings("sparseloco", 1.0, 0.9, 0.95)
    with pytest.raises(ValueError, match="unknown outer optimizer 'adam'"):
        outer.settings({"outer_optimizer": "adam"})


def test_config_refuses_sparseloco_with_outer_momentum():
    from near_jax import config as config_lib
    from near_jax.config import ConfigError

    cfg = config_lib.default_config()
    cfg.diloco.outer_optimizer, cfg.diloco.outer_momentum = "sparseloco", 0.9
    with pytest.raises(ConfigError, match="diloco.outer_momentum=0.9 is not allowed"):
        config_lib.validate(cfg)
    cfg.diloco.outer_momentum = 0.0  # 0 (or -1) is sparseloco's only momentum
    config_lib.validate(cfg)
