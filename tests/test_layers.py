"""The layers: RoPE is relative, RMSNorm against a float64 reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from near_jax import model
from near_jax.model import layers

jax.config.update("jax_default_matmul_precision", "highest")
# Eager flax scans dispatch op by op; jit keeps these tests fast.
apply = jax.jit(model.apply, static_argnums=4)


def test_rope_depends_only_on_relative_position():
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((1, 6, 2, 16)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 6, 2, 16)), jnp.float32)
    pos = jnp.arange(6)[None]

    def scores(offset):
        qr = model.rope(q, pos + offset, 10_000.0)
        kr = model.rope(k, pos + offset, 10_000.0)
        return jnp.einsum("blhd,bmhd->bhlm", qr, kr)

    np.testing.assert_allclose(scores(0), scores(37), rtol=1e-4, atol=1e-4)
    # The rotation is not the identity and preserves norms.
    rotated = model.rope(q, pos + 5, 10_000.0)
    assert not np.allclose(rotated, q, atol=1e-3)
    np.testing.assert_allclose(
        jnp.linalg.norm(rotated, axis=-1), jnp.linalg.norm(q, axis=-1), rtol=1e-5
    )


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_rms_norm_matches_a_float64_reference(dtype, tol):
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((2, 5, 64)) * 3 + 0.5).astype(np.float32)
    scale = rng.uniform(0.5, 1.5, 64).astype(np.float32)
    norm = layers.RMSNorm(eps=1e-6, dtype=dtype, param_dtype=jnp.float32)
    got = norm.apply({"params": {"scale": scale}}, jnp.asarray(x, dtype))
    x64 = np.asarray(jnp.asarray(x, dtype), np.float64)  # the input as the layer reads it
    want = x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + 1e-6) * scale
    assert got.dtype == dtype
    # float32 math inside; a bfloat16 output is rounded once (relative error 2^-9).
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tol, atol=tol)
    assert np.abs(want).mean() > 0.5  # the comparison has something to compare
