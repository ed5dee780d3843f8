"""The optimizer: schedule shape, weight-decay mask, clipping."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import small_config

from near_jax.train import optim


def _optim_cfg(**kw):
    cfg = small_config().optim
    for k, v in kw.items():
        cfg[k] = v
    return cfg


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedule_warms_up_then_decays(schedule):
    cfg = _optim_cfg(lr=1e-3, warmup_steps=10, schedule=schedule, min_lr_ratio=0.1)
    fn = optim.make_schedule(cfg, total_steps=110)
    assert float(fn(0)) == 0.0
    np.testing.assert_allclose(fn(5), 0.5e-3, rtol=1e-6)
    np.testing.assert_allclose(fn(10), 1e-3, rtol=1e-6)
    final = 1e-3 if schedule == "constant" else 1e-4
    np.testing.assert_allclose(fn(110), final, rtol=1e-5)
    if schedule == "cosine":
        np.testing.assert_allclose(fn(60), 1e-4 + 0.5 * (1e-3 - 1e-4), rtol=1e-5)
    if schedule == "linear":
        np.testing.assert_allclose(fn(60), 0.55e-3, rtol=1e-5)


@pytest.mark.parametrize("decay_embeddings", [False, True])
def test_weight_decay_skips_norms_and_optionally_embeddings(decay_embeddings):
    rng = np.random.default_rng(0)
    params = {
        "embed": jnp.asarray(rng.standard_normal((8, 4)), jnp.float32),
        "blocks": {
            "mlp": {"up": jnp.asarray(rng.standard_normal((4, 4)), jnp.float32)},
            "attn_norm": {"scale": jnp.asarray(rng.uniform(1, 2, (4,)), jnp.float32)},
        },
    }
    cfg = _optim_cfg(
        lr=0.1,
        warmup_steps=0,
        schedule="constant",
        weight_decay=0.5,
        decay_embeddings=decay_embeddings,
        clip_norm=0.0,
    )
    opt, _ = optim.make_optimizer(cfg, total_steps=10)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = opt.update(zero_grads, opt.init(params), params)
    new = optax.apply_updates(params, updates)
    # With zero gradients only decay moves a weight: p <- p - lr * wd * p.
    np.testing.assert_allclose(
        new["blocks"]["mlp"]["up"], params["blocks"]["mlp"]["up"] * 0.95, rtol=1e-6
    )
    np.testing.assert_array_equal(
        new["blocks"]["attn_norm"]["scale"], params["blocks"]["attn_norm"]["scale"]
    )
    want = params["embed"] * (0.95 if decay_embeddings else 1.0)
    np.testing.assert_allclose(new["embed"], want, rtol=1e-6)


def test_gradients_are_clipped_to_global_norm():
    params = {"w": jnp.ones((3,))}
    # b1 = b2 = 0 and a large eps make the update -lr * g / (|g| + eps): not scale-invariant,
    # so it shows whether g was clipped.
    cfg = _optim_cfg(
        lr=1.0,
        warmup_steps=0,
        schedule="constant",
        weight_decay=0.0,
        clip_norm=0.5,
        b1=0.0,
        b2=0.0,
        eps=10.0,
    )
    opt, _ = optim.make_optimizer(cfg, total_steps=10)
    grads = {"w": jnp.asarray([3.0, -4.0, 0.0])}
    updates, _ = opt.update(grads, opt.init(params), params)
    clipped = np.array([0.3, -0.4, 0.0])
    np.testing.assert_allclose(updates["w"], -clipped / (np.abs(clipped) + 10.0), rtol=1e-5)
