"""The layers: RoPE is relative, RMSNorm against a float64 reference, the KV-cache write."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import small_config

from near_jax import model, sharding
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


def _reference_write(cache_NxBxSxGxK, new_NxBxLxGxK, positions_BxL):
    """The former write: a per-row dynamic_update_slice (start clamped), per layer."""
    row = jax.vmap(lambda c, n, p: jax.lax.dynamic_update_slice_in_dim(c, n, p, axis=0))
    layer = jax.vmap(row, in_axes=(0, 0, None))
    return layer(cache_NxBxSxGxK, new_NxBxLxGxK, positions_BxL[:, 0])


@pytest.mark.parametrize("length", [1, 3])
@pytest.mark.parametrize("sharded", [False, True])
def test_write_cache_matches_per_row_dynamic_update_slice(length, sharded):
    n, b, s, g, k = 2, 8, 16, 2, 4
    rng = np.random.default_rng(length)
    cache = rng.standard_normal((n, b, s, g, k)).astype(np.float32)
    new = rng.standard_normal((n, b, length, g, k)).astype(np.float32)
    # Ragged rows, one at the last slots that fit and one past the end (clamped).
    start_B = rng.integers(0, s - length + 1, b)
    start_B[0], start_B[1] = s - length, s + 2
    positions = (start_B[:, None] + np.arange(length)).astype(np.int32)
    want = _reference_write(cache, new, positions)
    if sharded:  # batch over data, kv heads over tensor, as model.CACHE_AXES map them
        mcfg = small_config().mesh
        mcfg.update(dict(data=4, fsdp=1, tensor=2))
        mesh = sharding.make_mesh(mcfg)
        logical = jax.sharding.PartitionSpec(*model.CACHE_AXES)
        with jax.set_mesh(mesh):
            cache, new = (
                jax.device_put(x, sharding.logical_to_sharding(logical, x, mesh))
                for x in (cache, new)
            )
            got = jax.jit(layers.write_cache)(cache, new, positions)
        assert got.sharding.spec == cache.sharding.spec
    else:
        got = jax.jit(layers.write_cache)(cache, new, positions)
    np.testing.assert_array_equal(got, want)
    assert (got != cache).any()


@pytest.mark.parametrize("length", [1, 3])
def test_attention_sees_the_layer_as_write_cache_leaves_it(length):
    n, b, s, g, k = 3, 4, 12, 2, 4
    rng = np.random.default_rng(0)
    cache = jnp.asarray(rng.standard_normal((n, b, s, g, k)), jnp.float32)
    new_BxLxGxK = jnp.asarray(rng.standard_normal((b, length, g, k)), jnp.float32)
    start_B = np.array([0, 5, s - length, s + 1])
    positions = (start_B[:, None] + np.arange(length)).astype(np.int32)
    written = layers.write_cache(cache, jnp.stack([new_BxLxGxK] * n), positions)
    for layer in range(n):
        got = layers._with_new_entries(cache, layer, new_BxLxGxK, positions)
        np.testing.assert_array_equal(got, written[layer])
