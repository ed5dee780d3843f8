"""The fused, chunked cross-entropy equals the unfused head + loss, and never holds [B, L, V]."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import model_config, model_inputs, small_config

from near_jax import model, sharding
from near_jax.model.xent import chunked_scores, fused_xent

jax.config.update("jax_default_matmul_precision", "highest")


def _reference(hidden_BxLxD, head_DxV, targets_BxL, weights_BxL):
    """The unfused sums: full float32 logits, log-sum-exp, target logit."""
    logits_BxLxV = jnp.einsum("bld,dv->blv", hidden_BxLxD, head_DxV)
    log_z_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
    target_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], -1)[..., 0]
    return ((log_z_BxL - target_BxL) * weights_BxL).sum(), (log_z_BxL**2 * weights_BxL).sum()


def _inputs(b, length, d, vocab, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    hidden_BxLxD = jax.random.normal(k[0], (b, length, d))
    head_DxV = jax.random.normal(k[1], (d, vocab)) * 0.5
    targets_BxL = jax.random.randint(k[2], (b, length), 0, vocab)
    weights_BxL = (jax.random.uniform(k[3], (b, length)) > 0.3).astype(jnp.float32)
    return hidden_BxLxD, head_DxV, targets_BxL, weights_BxL


def _combined(fn, z_coef):
    """A scalar mixing both sums with distinct coefficients, so each cotangent is tested."""
    return lambda h, w_head, t, w: (lambda xz: 0.7 * xz[0] + z_coef * xz[1])(fn(h, w_head, t, w))


# Tokens per chunk over 3 rows: 1, 5, 7, 24 and 24 (clamped) positions; 5 and 7 don't divide L.
@pytest.mark.parametrize("chunk", [3, 15, 21, 72, 1000])
def test_fused_equals_unfused_loss_and_grads(chunk):
    args = _inputs(3, 24, 16, 389)  # a prime vocab
    fused = jax.jit(lambda *a: fused_xent(*a, chunk, jnp.float32))
    np.testing.assert_allclose(fused(*args), _reference(*args), rtol=1e-5)
    grad = lambda f: jax.jit(jax.grad(_combined(f, 0.3), argnums=(0, 1)))  # noqa: E731
    got, want = grad(lambda *a: fused_xent(*a, chunk, jnp.float32))(*args), grad(_reference)(*args)
    for g, w in zip(got, want, strict=True):
        assert float(jnp.abs(w).max()) > 1e-3  # nonzero: the check could fail
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
    # A zero-weight position gets no gradient, a weighted one does.
    d_h = np.asarray(got[0])
    w = np.asarray(args[3])
    assert np.all(d_h[w == 0] == 0) and np.all(np.abs(d_h[w == 1]).sum(-1) > 0)


def test_bfloat16_compute_matches_unfused_bfloat16_head():
    h, head, t, w = _inputs(2, 40, 32, 300, seed=1)
    h = h.astype(jnp.bfloat16)

    def unfused(h, head, t, w):  # exactly what Transformer + loss_fn do in bf16
        logits = jnp.einsum(
            "bld,dv->blv", h, head.astype(jnp.bfloat16), preferred_element_type=jnp.float32
        )
        log_z = jax.nn.logsumexp(logits, axis=-1)
        tl = jnp.take_along_axis(logits, t[..., None], -1)[..., 0]
        return ((log_z - tl) * w).sum(), (log_z**2 * w).sum()

    fused = lambda *a: fused_xent(*a, 16, jnp.bfloat16)  # noqa: E731
    np.testing.assert_allclose(jax.jit(fused)(h, head, t, w), unfused(h, head, t, w), rtol=1e-5)
    grad = lambda f: jax.jit(jax.grad(_combined(f, 0.1), argnums=(0, 1)))  # noqa: E731
    got, want = grad(fused)(h, head, t, w), grad(unfused)(h, head, t, w)
    assert got[0].dtype == jnp.bfloat16 and got[1].dtype == jnp.float32
    for g, wt in zip(got, want, strict=True):
        np.testing.assert_allclose(
            np.asarray(g, np.float32), np.asarray(wt, np.float32), rtol=2e-2, atol=2e-3
        )


def test_chunked_scores_match_full_logits():
    h, head, t, _ = _inputs(2, 21, 16, 257, seed=2)
    t = t.at[0, :5].set(jnp.argmax(jnp.einsum("bld,dv->blv", h, head), -1)[0, :5])
    log_z, target, hit = jax.jit(chunked_scores, static_argnums=(3, 4))(h, head, t, 16, jnp.float32)
    logits = jnp.einsum("bld,dv->blv", h, head)
    np.testing.assert_allclose(log_z, jax.nn.logsumexp(logits, -1), rtol=1e-5)
    np.testing.assert_allclose(target, jnp.take_along_axis(logits, t[..., None], -1)[..., 0])
    np.testing.assert_array_equal(hit, jnp.argmax(logits, -1) == t)
    assert bool(hit[0, :5].all())


def _batch(cfg, b=4, length=24):
    tokens, positions, segments = model_inputs(jax.random.key(1), b, length)
    targets = jax.random.randint(jax.random.key(2), (b, length), 0, cfg.vocab_size)
    weights = (jax.random.uniform(jax.random.key(3), (b, length)) > 0.3).astype(jnp.float32)
    return dict(
        inputs=tokens, targets=targets, positions=positions, segment_ids=segments, weights=weights
    )


def _loss_and_grads(params, batch, cfg):
    return jax.jit(jax.value_and_grad(model.loss_fn, has_aux=True), static_argnums=2)(
        params, batch, cfg
    )


@pytest.mark.parametrize("tie", [False, True])
def test_loss_fn_fused_equals_unfused(tie):
    base = model_config(z_loss=1e-2, tie_embeddings=tie)
    fused_cfg = model_config(z_loss=1e-2, tie_embeddings=tie, loss_chunk=20)  # 5 positions
    params, batch = model.init(base, jax.random.key(0)), _batch(base)
    (loss0, aux0), g0 = _loss_and_grads(params, batch, base)
    (loss1, aux1), g1 = _loss_and_grads(params, batch, fused_cfg)
    np.testing.assert_allclose(loss1, loss0, rtol=1e-5)
    np.testing.assert_allclose(aux1["xent"], aux0["xent"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g1, g0)
    head = g0["embed"] if tie else g0["head"]
    assert float(jnp.abs(head).max()) > 1e-4


@pytest.mark.parametrize("vocab", [384, 386])  # 386: tensor=4 doesn't divide it (replicated)
def test_tensor_sharded_mesh_equals_one_device(vocab):
    base = model_config(z_loss=1e-3, vocab_size=vocab)
    fused_cfg = model_config(z_loss=1e-3, vocab_size=vocab, loss_chunk=10)  # 2 rows x 5
    params, batch = model.init(base, jax.random.key(0)), _batch(base)
    (want, _), want_g = _loss_and_grads(params, batch, base)
    cfg = small_config()
    cfg.mesh.data, cfg.mesh.tensor = 2, 4
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:8])
    shardings = sharding.logical_to_sharding(model.logical_axes(base), params, mesh)
    with jax.set_mesh(mesh):
        sharded = jax.device_put(params, shardings)
        batch = jax.device_put(batch, sharding.batch_sharding(mesh))
        (got, _), got_g = _loss_and_grads(sharded, batch, fused_cfg)
    if vocab == 384:  # the head really is split over tensor
        assert sharded["head"].sharding.spec[1] == "tensor"
    np.testing.assert_allclose(got, want, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got_g, want_g)


def _compiled_step(loss_chunk, rows=1, data=1, tensor=1):
    from near_jax.train.loop import trainer_for

    cfg = small_config(
        vocab_size=32768, d_model=64, n_layers=1, n_heads=1, n_kv_heads=1, loss_chunk=loss_chunk
    )
    cfg.data.seq_len, cfg.train.global_batch_size = 2048, rows
    cfg.mesh.data, cfg.mesh.tensor = data, tensor
    trainer = trainer_for(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[: data * tensor]))
    batch = {
        k: jax.ShapeDtypeStruct(
            (rows, 2048),
            jnp.float32 if k == "weights" else jnp.int32,
            sharding=trainer.batch_sharding,
        )
        for k in ("inputs", "targets", "positions", "segment_ids", "weights")
    }
    return trainer.step.lower(trainer.abstract_state, batch).compile()


def test_fused_train_step_holds_no_full_logits():
    full_logits = re.compile(r"\[1,2048,32768\]|\[2048,32768\]")
    unfused, fused = _compiled_step(0), _compiled_step(256)
    temp0 = unfused.memory_analysis().temp_size_in_bytes
    temp1 = fused.memory_analysis().temp_size_in_bytes
    print(f"temporaries: unfused {temp0 / 2**20:.0f} MiB, fused {temp1 / 2**20:.0f} MiB")
    assert full_logits.search(unfused.as_text())  # the pattern does find [B, L, V]
    assert not full_logits.search(fused.as_text())
    logits_bytes = 2048 * 32768 * 4
    assert temp1 < temp0 / 3 and temp1 < logits_bytes


def test_a_chunk_counts_tokens_per_device():
    from near_jax.model.xent import positions_per_chunk

    assert positions_per_chunk(4, 100, 40) == 10  # off a mesh: all 4 rows are local
    assert positions_per_chunk(4, 100, 1000) == 100 and positions_per_chunk(4, 100, 2) == 1
    cfg = small_config()
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2, 2
    with jax.set_mesh(sharding.make_mesh(cfg.mesh, jax.devices()[:8])):
        assert positions_per_chunk(8, 100, 40) == 20  # 8 rows over data x fsdp: 2 each
        assert positions_per_chunk(6, 100, 40) == 13  # fsdp doesn't divide 6: 3 rows each


def test_tensor_sharded_fused_step_holds_no_full_length_logits_shard():
    # 2 rows over data=2, vocab 32k over tensor=4: a device's full logits are [1, 2048, 8192].
    shard = re.compile(r"\[1,2048,8192\]|\[2048,8192\]")
    unfused, fused = (_compiled_step(c, rows=2, data=2, tensor=4) for c in (0, 256))
    assert shard.search(unfused.as_text()) and not shard.search(fused.as_text())
    temp0 = unfused.memory_analysis().temp_size_in_bytes
    temp1 = fused.memory_analysis().temp_size_in_bytes
    assert temp0 - temp1 > 2048 * 8192 * 4  # at least one [L, V / tensor] float32 buffer less
