"""The loss: weighted next-token cross-entropy and z-loss against a float64 reference."""

import jax
import jax.numpy as jnp
import numpy as np
from helpers import model_config, model_inputs

from near_jax import model

jax.config.update("jax_default_matmul_precision", "highest")
# Eager flax scans dispatch op by op; jit keeps these tests fast.
apply = jax.jit(model.apply, static_argnums=4)


def test_loss_weights_and_z_loss():
    cfg = model_config(z_loss=1e-2)
    params = model.init(cfg, jax.random.key(0))
    tokens, positions, segments = model_inputs(jax.random.key(1), 2, 16)
    targets = jax.random.randint(jax.random.key(2), (2, 16), 0, 384)
    weights = (jax.random.uniform(jax.random.key(3), (2, 16)) > 0.3).astype(jnp.float32)
    batch = dict(
        inputs=tokens, targets=targets, positions=positions, segment_ids=segments, weights=weights
    )
    loss, aux = jax.jit(model.loss_fn, static_argnums=2)(params, batch, cfg)

    logits = np.asarray(apply(params, tokens, positions, segments, cfg), np.float64)
    lse = np.log(np.exp(logits).sum(-1))
    nll = lse - np.take_along_axis(logits, np.asarray(targets)[..., None], -1)[..., 0]
    w = np.asarray(weights)
    want_xent = (nll * w).sum() / w.sum()
    want = want_xent + 1e-2 * (lse**2 * w).sum() / w.sum()
    np.testing.assert_allclose(aux["xent"], want_xent, rtol=1e-5)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
