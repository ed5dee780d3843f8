"""The scanned transformer: init and logical axes, packed documents, remat/unrolled equivalence."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import model_config, model_inputs

from near_jax import model

jax.config.update("jax_default_matmul_precision", "highest")
# Eager flax scans dispatch op by op; jit keeps these tests fast.
apply = jax.jit(model.apply, static_argnums=4)


def test_init_is_plain_pytree_with_logical_axes():
    cfg = model_config()
    params = model.init(cfg, jax.random.key(0))
    axes = model.logical_axes(cfg)
    assert jax.tree.structure(params) == jax.tree.structure(
        axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
    )
    assert params["blocks"]["attn"]["q"].shape == (2, 64, 4, 16)
    assert params["blocks"]["attn"]["k"].shape == (2, 64, 2, 16)
    assert tuple(axes["blocks"]["attn"]["q"]) == ("layers", "embed", "heads", "head_dim")
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))


def test_packed_documents_do_not_see_each_other_and_positions_restart():
    cfg = model_config()
    params = model.init(cfg, jax.random.key(0))
    a_len, b_len = 11, 13
    tok_a = jax.random.randint(jax.random.key(1), (1, a_len), 0, 384)
    tok_a2 = jax.random.randint(jax.random.key(2), (1, a_len), 0, 384)
    tok_b = jax.random.randint(jax.random.key(3), (1, b_len), 0, 384)
    positions = jnp.concatenate([jnp.arange(a_len), jnp.arange(b_len)])[None]
    segments = jnp.concatenate([jnp.ones(a_len, jnp.int32), 2 * jnp.ones(b_len, jnp.int32)])[None]

    packed = apply(params, jnp.concatenate([tok_a, tok_b], 1), positions, segments, cfg)
    packed2 = apply(params, jnp.concatenate([tok_a2, tok_b], 1), positions, segments, cfg)
    alone = apply(params, tok_b, jnp.arange(b_len)[None], jnp.ones((1, b_len), jnp.int32), cfg)
    # Document B's logits don't depend on document A's tokens...
    np.testing.assert_allclose(packed[:, a_len:], packed2[:, a_len:], rtol=1e-5, atol=1e-5)
    # ...and equal B's logits on its own, since its positions restart at 0.
    np.testing.assert_allclose(packed[:, a_len:], alone, rtol=1e-5, atol=1e-5)
    # Document A's logits do change (the test can fail).
    assert not np.allclose(packed[:, :a_len], packed2[:, :a_len], atol=1e-3)


@pytest.mark.parametrize("remat", ["full", "dots_saveable"])
def test_remat_and_unrolled_layers_match_scan(remat):
    cfg = model_config()
    params = model.init(cfg, jax.random.key(0))
    tokens, positions, segments = model_inputs(jax.random.key(1), 2, 16)
    base, base_grad = jax.jit(
        jax.value_and_grad(lambda p: apply(p, tokens, positions, segments, cfg).sum())
    )(params)

    remat_cfg = dataclasses.replace(cfg, remat=remat)
    out, grad = jax.jit(
        jax.value_and_grad(lambda p: apply(p, tokens, positions, segments, remat_cfg).sum())
    )(params)
    np.testing.assert_allclose(out, base, rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grad, base_grad
    )

    unrolled_cfg = dataclasses.replace(cfg, scan_layers=False)
    unrolled = {k: v for k, v in params.items() if k != "blocks"}
    for i in range(cfg.n_layers):
        unrolled[f"block_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["blocks"])
    got = apply(unrolled, tokens, positions, segments, unrolled_cfg)
    want = apply(params, tokens, positions, segments, cfg)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_tied_embeddings_have_no_head():
    cfg = model_config(tie_embeddings=True)
    params = model.init(cfg, jax.random.key(0))
    assert "head" not in params
    tokens, positions, segments = model_inputs(jax.random.key(1), 1, 8)
    assert apply(params, tokens, positions, segments, cfg).shape == (1, 8, 384)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_cached_chunks_and_ragged_decode_match_the_full_forward(scan_layers):
    cfg = model_config(scan_layers=scan_layers)
    params = model.init(model_config(), jax.random.key(0))
    if not scan_layers:
        params = {k: v for k, v in params.items() if k != "blocks"} | {
            f"block_{i}": jax.tree.map(lambda x, i=i: x[i], params["blocks"])
            for i in range(cfg.n_layers)
        }
    tokens, positions, segments = model_inputs(jax.random.key(1), 2, 20)
    full = apply(params, tokens, positions, segments, cfg)
    step = jax.jit(model.apply_with_cache, static_argnums=4, donate_argnums=3)
    cache = model.init_cache(cfg, 2, 24)
    # A prefill chunk of 8, then rows go their own ways: row 0 a chunk of 4 at 8..11 while
    # row 1 decodes 8 (one row's chunk, another's decode: ragged starts within a batch).
    got, cache = step(params, tokens[:, :8], positions[:, :8], cache, cfg)
    np.testing.assert_allclose(got, full[:, :8], rtol=1e-5, atol=1e-5)
    chunk = jnp.stack([tokens[0, 8:12], tokens[1, 8:12]])
    got, cache = step(params, chunk, positions[:, 8:12], cache, cfg)
    np.testing.assert_allclose(got, full[:, 8:12], rtol=1e-5, atol=1e-5)
    lag = jnp.array([[0], [3]])  # row 1 redoes 9..11 (overwrites them) before going on
    for t in range(12, 20):
        pos = jnp.minimum(t - lag, 19)
        got, cache = step(params, jnp.take_along_axis(tokens, pos, 1), pos, cache, cfg)
        want = jnp.take_along_axis(full, pos[:, :, None], 1)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_a_decode_step_updates_the_donated_cache_in_place():
    cfg = model_config(n_layers=3)
    params = model.init(cfg, jax.random.key(0))
    b, s = 4, 32
    cache = model.init_cache(cfg, b, s)
    step = jax.jit(model.apply_with_cache, static_argnums=4, donate_argnums=3)
    tokens = jnp.zeros((b, 1), jnp.int32)
    hlo = step.lower(params, tokens, tokens + 5, cache, cfg).compile().as_text()
    # Neither a copy nor a transpose of the whole stacked cache (into or out of the layer
    # loop, or for the write): only its in-place scatter produces one.
    shape = f"f32[{cfg.n_layers},{b},{s},{cfg.n_kv_heads},{cfg.head_dim}]"
    lines = [line.strip() for line in hlo.splitlines() if f"= {shape}" in line]
    ops = {line.split(f"= {shape}")[1].split("(")[0].split()[-1] for line in lines}
    assert ops <= {"parameter", "get-tuple-element", "bitcast", "fusion", "scatter"}, ops
    fusions = [line.split()[0] for line in lines if " fusion(" in line]
    assert len(fusions) == 2 and all("scatter" in name for name in fusions), fusions


@pytest.mark.parametrize("length", [1, 3])
def test_a_batch_uses_the_first_rows_of_a_larger_cache_and_leaves_the_rest(length):
    cfg = model_config()
    params = model.init(cfg, jax.random.key(0))
    tokens, positions, _ = model_inputs(jax.random.key(1), 2, 8)
    step = jax.jit(model.apply_with_cache, static_argnums=4)
    # Reference: a cache of exactly the batch's 2 rows, prefilled with 5 tokens.
    small = model.init_cache(cfg, 2, 16)
    _, small = step(params, tokens[:, :5], positions[:, :5], small, cfg)
    # The same 2 rows as the first of 4, whose other rows hold NaN: never read or written.
    big = {k: jnp.concatenate([v, jnp.full_like(v, jnp.nan)], axis=1) for k, v in small.items()}
    new = tokens[:, 5 : 5 + length], positions[:, 5 : 5 + length]
    want, small = step(params, *new, small, cfg)
    got, big = step(params, *new, big, cfg)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    for k in ("k", "v"):
        np.testing.assert_array_equal(big[k][:, :2], small[k])
        assert bool(jnp.all(jnp.isnan(big[k][:, 2:])))


@pytest.mark.parametrize("length", [1, 3])
def test_attend_len_reads_only_the_start_of_the_cache_and_writes_in_place(length):
    cfg = model_config()
    params = model.init(cfg, jax.random.key(0))
    tokens, positions, _ = model_inputs(jax.random.key(1), 2, 8)
    step = jax.jit(model.apply_with_cache, static_argnums=(4, 6))
    ref = model.init_cache(cfg, 2, 32)
    _, ref = step(params, tokens[:, :5], positions[:, :5], ref, cfg)
    # The same cache with NaN from position 8 on: attend_len=8 must never read there.
    poisoned = {k: v.at[:, :, 8:].set(jnp.nan) for k, v in ref.items()}
    new = tokens[:, 5 : 5 + length], positions[:, 5 : 5 + length]
    want, ref = step(params, *new, ref, cfg)
    got, poisoned = step(params, *new, poisoned, cfg, None, 8)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    for k in ("k", "v"):
        # Close, not equal: a shorter softmax sums in another order (later layers' K/V).
        np.testing.assert_allclose(poisoned[k][:, :, :8], ref[k][:, :, :8], rtol=1e-6, atol=1e-6)
        assert bool(jnp.all(jnp.isnan(poisoned[k][:, :, 8:])))
