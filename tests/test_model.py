"""The transformer: masking, positions, GQA, RoPE, scan/remat equivalence, FLOPs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import small_config

from near_jax import model
from near_jax.model.kernels import attention

jax.config.update("jax_default_matmul_precision", "highest")
# Eager flax scans dispatch op by op; jit keeps these tests fast.
apply = jax.jit(model.apply, static_argnums=4)


def _cfg(**overrides) -> model.ModelConfig:
    return model.ModelConfig.from_config(small_config(**overrides).model)


def _inputs(rng, batch, length, vocab=384):
    tokens = jax.random.randint(rng, (batch, length), 0, vocab)
    positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    return tokens, positions, jnp.ones((batch, length), jnp.int32)


def test_init_is_plain_pytree_with_logical_axes():
    cfg = _cfg()
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
    cfg = _cfg()
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


def _reference_attention(q, k, v, segment_ids, causal, window=0):
    """Multi-head attention in float64 numpy, one head at a time, K/V repeated per group."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, length, h, d = q.shape
    rep = h // k.shape[2]
    out = np.zeros_like(q)
    for bi in range(b):
        for hi in range(h):
            logits = q[bi, :, hi] @ k[bi, :, hi // rep].T / np.sqrt(d)
            mask = np.ones((length, length), bool)
            if causal:
                mask &= np.tril(mask)
            if window:
                idx = np.arange(length)
                mask &= np.abs(idx[:, None] - idx[None, :]) < window
            if segment_ids is not None:
                seg = np.asarray(segment_ids[bi])
                mask &= seg[:, None] == seg[None, :]
            logits = np.where(mask, logits, -np.inf)
            p = np.exp(logits - logits.max(-1, keepdims=True))
            out[bi, :, hi] = (p / p.sum(-1, keepdims=True)) @ v[bi, :, hi // rep]
    return out


@pytest.mark.parametrize("kv_heads", [8, 4, 2, 1])
@pytest.mark.parametrize("causal", [True, False])
def test_gqa_attention_matches_reference(kv_heads, causal):
    rng = np.random.default_rng(kv_heads)
    b, length, h, d = 2, 24, 8, 16
    q = rng.standard_normal((b, length, h, d)).astype(np.float32)
    k = rng.standard_normal((b, length, kv_heads, d)).astype(np.float32)
    v = rng.standard_normal((b, length, kv_heads, d)).astype(np.float32)
    seg = np.sort(rng.integers(1, 4, (b, length)), axis=1).astype(np.int32)
    got = attention(q, k, v, segment_ids_BxL=seg, causal=causal, impl="xla")
    want = _reference_attention(q, k, v, seg, causal)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_sliding_window_attention_matches_reference(causal):
    rng = np.random.default_rng(7)
    q = rng.standard_normal((2, 20, 4, 8)).astype(np.float32)
    k, v = (rng.standard_normal((2, 20, 2, 8)).astype(np.float32) for _ in range(2))
    seg = np.sort(rng.integers(1, 3, (2, 20)), axis=1).astype(np.int32)
    got = attention(q, k, v, segment_ids_BxL=seg, causal=causal, impl="xla", window=5)
    np.testing.assert_allclose(
        got, _reference_attention(q, k, v, seg, causal, 5), rtol=1e-5, atol=1e-5
    )
    assert not np.allclose(got, _reference_attention(q, k, v, seg, causal), atol=1e-3)


def test_gqa_with_equal_heads_is_multi_head_attention():
    # n_kv_heads == n_heads must be exactly MHA: K/V head i serves query head i.
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 16, 4, 8)).astype(np.float32) for _ in range(3))
    got = attention(q, k, v, causal=True, impl="xla")
    want = _reference_attention(q, k, v, None, True)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


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


@pytest.mark.parametrize("remat", ["full", "dots_saveable"])
def test_remat_and_unrolled_layers_match_scan(remat):
    cfg = _cfg()
    params = model.init(cfg, jax.random.key(0))
    tokens, positions, segments = _inputs(jax.random.key(1), 2, 16)
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
    cfg = _cfg(tie_embeddings=True)
    params = model.init(cfg, jax.random.key(0))
    assert "head" not in params
    tokens, positions, segments = _inputs(jax.random.key(1), 1, 8)
    assert apply(params, tokens, positions, segments, cfg).shape == (1, 8, 384)


def test_loss_weights_and_z_loss():
    cfg = _cfg(z_loss=1e-2)
    params = model.init(cfg, jax.random.key(0))
    tokens, positions, segments = _inputs(jax.random.key(1), 2, 16)
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


def test_flops_per_token_counts_matmuls_and_causal_attention():
    cfg = _cfg()
    params = model.init(cfg, jax.random.key(0))
    matmul = sum(
        x.size
        for path, x in jax.tree_util.tree_leaves_with_path(params)
        if path[-1].key not in ("embed", "scale")
    )
    c = model.ModelConfig.from_config(cfg)
    for length in (1, 128, 1000):
        attn = 3 * 4 * c.n_layers * c.n_heads * c.head_dim * (length + 1) / 2
        assert model.flops_per_token(cfg, length) == pytest.approx(6 * matmul + attn)
    counts = model.param_counts(cfg)
    assert counts["total"] == sum(x.size for x in jax.tree.leaves(params))
    assert counts["embedding"] == 384 * 64
