"""grow_params: the grown model computes the source's function where the option says so."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import model_inputs, random_params, small_config

from near_jax import model
from near_jax.grow import grow_params, maps
from near_jax.grow.maps import NEW
from near_jax.plan.planner import load_ladder

SOURCE = small_config(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, mlp_dim=96)
WIDER = {"d_model": 96, "n_heads": 6, "n_kv_heads": 3, "mlp_dim": 160}  # x1.5, not whole
DEEPER = {"n_layers": 5}


def _cfg(base=SOURCE, **changes):
    cfg = base.copy_and_resolve_references()
    for key, value in changes.items():
        cfg.model[key] = value
    return cfg


@pytest.fixture(scope="module")
def source():
    params = random_params(SOURCE, seed=3)
    inputs = model_inputs(jax.random.key(1), 2, 24)
    return params, inputs, _logits(params, inputs, SOURCE)


@functools.partial(jax.jit, static_argnums=4)
def _apply(params, tokens, positions, segments, cfg):
    return model.apply(params, tokens, positions, segments, cfg)


def _logits(params, inputs, cfg):
    """model.apply, compiled whole (op by op, each new shape compiles on its own: slow)."""
    return _apply(params, *inputs, model.ModelConfig.from_config(cfg.model))


def _grown_logits(params, inputs, changes, width, depth, base=SOURCE, noise=0.05):
    new = _cfg(base, **changes)
    src_model, new_model = (model.ModelConfig.from_config(c.model) for c in (base, new))
    grow = functools.partial(
        grow_params, cfg=src_model, new_cfg=new_model, width=width, depth=depth, noise=noise
    )
    grown = jax.jit(grow)(params, rng=jax.random.key(7))
    return grown, _logits(grown, inputs, new)


@pytest.mark.parametrize(
    "changes,width,depth",
    [
        (WIDER, "clone", "stack"),  # depth unchanged: stack has nothing to repeat
        (WIDER, "zero", "stack"),
        ({"n_heads": 8}, "clone", "stack"),  # heads only: bigger query groups
        ({"n_kv_heads": 4}, "zero", "stack"),  # kv heads only
        ({"n_heads": 8, "n_kv_heads": 4}, "clone", "stack"),
        (DEEPER, "clone", "identity"),
        ({**WIDER, **DEEPER}, "clone", "identity"),
        ({**WIDER, **DEEPER}, "zero", "identity"),
    ],
)
def test_function_preserving_growth_gives_the_source_logits(source, changes, width, depth):
    params, inputs, want = source
    if width == "zero":  # exact only without RMSNorm's epsilon, which zero cannot rescale
        base = _cfg(norm_eps=1e-12)
        want = _logits(params, inputs, base)
        _, got = _grown_logits(params, inputs, changes, width, depth, base=base)
    else:
        _, got = _grown_logits(params, inputs, changes, width, depth)
    np.testing.assert_allclose(got, want, atol=2e-6 * float(jnp.max(jnp.abs(want))), rtol=0)


@pytest.mark.parametrize("width", ["clone", "zero"])
def test_tied_embeddings_grow_too(width):
    tied = _cfg(tie_embeddings=True, norm_eps=1e-12)
    params = random_params(tied, seed=5)
    inputs = model_inputs(jax.random.key(2), 2, 24)
    want = _logits(params, inputs, tied)
    grown, got = _grown_logits(params, inputs, WIDER, width, "stack", base=tied)
    assert "head" not in grown
    np.testing.assert_allclose(got, want, atol=2e-6 * float(jnp.max(jnp.abs(want))), rtol=0)


def test_zero_width_is_off_by_the_share_of_rmsnorms_epsilon(source):
    params, inputs, want = source
    _, got = _grown_logits(params, inputs, WIDER, "zero", "stack")
    # The residual stream here has mean square ~0.01 (random embeddings of std 0.1), so
    # epsilon = 1e-5 is ~1e-3 of it, and a third of the channels are new: ~3e-4 relative
    # per norm, over five norms.
    error = float(jnp.max(jnp.abs(got - want))) / float(jnp.max(jnp.abs(want)))
    assert 1e-5 < error < 1e-2


def test_function_preserving_growth_in_bfloat16_compute(source):
    params, inputs, _ = source
    base = _cfg(dtype="bfloat16")
    want = _logits(params, inputs, base)
    _, got = _grown_logits(params, inputs, {**WIDER, **DEEPER}, "clone", "identity", base=base)
    # bf16 keeps 8 bits of mantissa: sums over more (rescaled) channels round differently.
    np.testing.assert_allclose(got, want, atol=0.05 * float(jnp.max(jnp.abs(want))), rtol=0)


def test_stacking_does_not_preserve_the_function(source):
    params, inputs, want = source
    _, got = _grown_logits(params, inputs, DEEPER, "clone", "stack")
    assert float(jnp.max(jnp.abs(got - want))) > 1e-2 * float(jnp.max(jnp.abs(want)))


def test_stacking_copies_the_right_layers_in_the_right_order(source):
    params = source[0]
    grown, _ = _grown_logits(params, source[1], {"n_layers": 5}, "clone", "stack")
    order = maps.layer_order(2, 5, "stack")
    assert order.tolist() == [0, 1, 0, 1, 1]
    for target, src in enumerate(order):
        for path, leaf in jax.tree_util.tree_leaves_with_path(grown["blocks"]):
            want = jax.tree_util.tree_leaves_with_path(params["blocks"])
            want = dict((jax.tree_util.keystr(p), x) for p, x in want)[jax.tree_util.keystr(path)]
            np.testing.assert_array_equal(leaf[target], want[src])


def test_identity_blocks_are_fresh_with_silent_outputs(source):
    params = source[0]
    grown, _ = _grown_logits(params, source[1], DEEPER, "clone", "identity")
    order = maps.layer_order(2, 5, "identity")
    blocks = grown["blocks"]
    for target, src in enumerate(order):
        if src == NEW:
            assert not blocks["attn"]["o"][target].any() and not blocks["mlp"]["down"][target].any()
            assert float(jnp.std(blocks["attn"]["q"][target])) > 0  # trainable, not dead
        else:
            np.testing.assert_array_equal(
                blocks["attn"]["o"][target], params["blocks"]["attn"]["o"][src]
            )


def _grads(params, cfg, inputs):
    tokens = inputs[0]

    def loss(p):
        logits = _apply(p, *inputs, cfg)
        return -jnp.mean(jax.nn.log_softmax(logits)[..., :-1, :].max(-1) + 0 * tokens[:, 1:])

    return jax.grad(loss)(params)


@pytest.mark.parametrize("noise", [0.0, 0.05])
def test_clone_noise_is_what_lets_copies_learn_different_things(source, noise):
    params, inputs, want = source
    changes = {"d_model": 128, "mlp_dim": 192}
    grown, got = _grown_logits(params, inputs, changes, "clone", "stack", noise=noise)
    np.testing.assert_allclose(got, want, atol=1e-5 * float(jnp.max(jnp.abs(want))), rtol=0)
    grads = _grads(grown, model.ModelConfig.from_config(_cfg(**changes).model), inputs)
    # Residual channels j and j + 64 are copies; MLP units u and u + 96 too. At step 0 a
    # reader's copied rows see equal inputs and equal gradients whatever the noise; the
    # noise makes the units' and the channels' *outputs* learn differently.
    gate = grads["blocks"]["mlp"]["gate"]  # [L, d, f]: columns are units
    down = grads["blocks"]["mlp"]["down"]  # [L, f, d]: columns are residual channels
    units_differ = float(jnp.max(jnp.abs(gate[..., :96] - gate[..., 96:])))
    channels_differ = float(jnp.max(jnp.abs(down[..., :64] - down[..., 64:])))
    if noise == 0:  # copies would stay copies forever
        assert units_differ < 1e-7 and channels_differ < 1e-7
    else:
        assert units_differ > 1e-5 and channels_differ > 1e-5


def test_scanned_and_unrolled_layouts_grow_alike(source):
    params, inputs, want = source
    unrolled = _cfg(scan_layers=False)
    flat = {k: v for k, v in params.items() if k != "blocks"}
    for i in range(2):
        flat[f"block_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["blocks"])
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(_logits(flat, inputs, unrolled), want, atol=2e-6 * scale)
    grown, got = _grown_logits(flat, inputs, {**WIDER, **DEEPER}, "clone", "identity", unrolled)
    assert set(grown) >= {f"block_{i}" for i in range(5)} and "blocks" not in grown
    np.testing.assert_allclose(got, want, atol=4e-6 * scale, rtol=0)


def test_grown_params_come_in_the_targets_param_dtype(source):
    new = _cfg(**WIDER, param_dtype="bfloat16")
    grown = jax.eval_shape(
        lambda p: grow_params(p, SOURCE.model, new.model, jax.random.key(0)), source[0]
    )
    assert {x.dtype for x in jax.tree.leaves(grown)} == {jnp.dtype(jnp.bfloat16)}


LADDER = load_ladder()
PAIRS = list(zip(LADDER.RUNGS, list(LADDER.RUNGS)[1:], strict=False))


@pytest.mark.parametrize("small,big", PAIRS)
def test_each_rung_grows_into_the_next_with_the_targets_shapes(small, big):
    small_cfg, big_cfg = LADDER.get_config(small).model, LADDER.get_config(big).model
    want = jax.eval_shape(lambda: model.init(big_cfg, jax.random.key(0)))
    for width, depth in (("clone", "stack"), ("zero", "identity")):
        src = jax.eval_shape(lambda: model.init(small_cfg, jax.random.key(0)))
        got = jax.eval_shape(
            lambda p, w=width, d=depth: grow_params(
                p, small_cfg, big_cfg, jax.random.key(0), width=w, depth=d
            ),
            src,
        )
        assert jax.tree.map(lambda x: (x.shape, x.dtype), got) == jax.tree.map(
            lambda x: (x.shape, x.dtype), want
        )


def test_growth_that_cannot_work_raises_before_any_work(source):
    with pytest.raises(maps.GrowError, match="smaller"):
        grow_params(source[0], SOURCE.model, _cfg(n_layers=1).model, jax.random.key(0))
    # Same model config otherwise: nothing to grow.
    with pytest.raises(maps.GrowError, match="nothing to grow"):
        grow_params(
            source[0],
            SOURCE.model,
            dataclasses.replace(model.ModelConfig.from_config(SOURCE.model)),
            jax.random.key(0),
        )
