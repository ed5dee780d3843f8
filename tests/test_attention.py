"""The attention dispatcher: impl selection and errors, sharded kernels, the model, and the
XLA path (GQA, sliding windows, packed segments) against a float64 reference.

The kernels' own numerics are in test_flash_attention.py (the splash wrapper's in
test_splash.py); here the Pallas paths run through
`attention(...)` and the model as a user would (interpret mode, automatically, on CPU).
"""

import importlib
import importlib.util
import json
import logging
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import REPO, attention_qkv, small_config
from jax.sharding import NamedSharding, PartitionSpec

from near_jax import model, sharding
from near_jax.model.kernels.attention import attention, xla_attention
from near_jax.train.loop import trainer_for

# The package re-exports the function `attention`, which shadows the module's name.
dispatch = importlib.import_module("near_jax.model.kernels.attention")


@pytest.mark.parametrize(
    "impl,dtype,match",
    [
        ("cudnn", jnp.bfloat16, "cudnn needs a GPU"),
        ("splash", jnp.bfloat16, "splash needs a TPU"),
        ("pallas", jnp.int32, "dtype int32"),
        ("flash", jnp.float32, "not allowed"),
    ],
)
def test_an_impl_that_cannot_serve_raises_one_line_naming_it(impl, dtype, match):
    q, k, v, _ = attention_qkv(length=16, dtype=jnp.float32)
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    with pytest.raises(ValueError, match=match) as err:
        attention(q, k, v, impl=impl)
    assert f"impl={impl!r}" in str(err.value) and "\n" not in str(err.value)


def test_auto_picks_the_platforms_preferred_impl_and_logs_fallbacks(monkeypatch, caplog):
    q, k, _, seg = attention_qkv(length=256)
    odd_q, odd_k, _, _ = attention_qkv(length=100)
    pick = dispatch._pick_auto
    assert pick(q, k, True, 0, seg) == "xla"  # CPU
    monkeypatch.setattr(dispatch, "_logged", set())
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    caplog.set_level(logging.INFO)
    assert pick(q, k, True, 0, seg) == "splash"
    assert pick(odd_q, odd_k, True, 0, seg) == "pallas"
    assert pick(odd_q, odd_k, True, 0, seg) == "pallas"
    lines = [r.getMessage() for r in caplog.records if "splash cannot serve" in r.getMessage()]
    assert len(lines) == 1 and "length 100" in lines[0]
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert pick(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), True, 0, seg) == "cudnn"
    assert pick(q, k, True, 0, seg) == "pallas"  # float32: cudnn can't
    bf_q, bf_k = q.astype(jnp.bfloat16), k.astype(jnp.bfloat16)
    assert pick(bf_q, bf_k, False, 64, seg) == "pallas"  # non-causal window: cudnn can't


def test_auto_on_cpu_is_the_xla_reference():
    q, k, v, seg = attention_qkv(length=40)
    got = attention(q, k, v, segment_ids_BxL=seg, impl="auto", window=9)
    want = xla_attention(q, k, v, seg, True, 64**-0.5, window=9)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kv_heads,mesh_axes", [(2, (2, 2, 2)), (1, (4, 1, 2))])
def test_pallas_runs_per_shard_under_a_mesh(kv_heads, mesh_axes):
    # Batch over data x fsdp, heads over tensor; with kv_heads=1 < tensor=2 the heads stay
    # whole so every query head finds its kv head in its shard.
    q, k, v, seg = attention_qkv(length=160, heads=4, kv_heads=kv_heads, batch=4)
    cfg = small_config().mesh
    cfg.data, cfg.fsdp, cfg.tensor = mesh_axes
    mesh = sharding.make_mesh(cfg)

    def loss(q, k, v, impl):
        out = attention(q, k, v, segment_ids_BxL=seg, impl=impl, block_q=128, block_kv=128)
        return (out * q).sum(), out

    with jax.set_mesh(mesh):
        spec = sharding.logical_to_spec(
            PartitionSpec("batch", "length", "heads", "head_dim"), q.shape, mesh
        )
        q_sharded = jax.device_put(q, NamedSharding(mesh, spec))
        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True), static_argnums=3)
        (dq, dk, dv), out = grad(q_sharded, k, v, "pallas")
        hlo = grad.lower(q_sharded, k, v, "pallas").as_text()
    (dq_x, dk_x, dv_x), out_x = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, "xla")
    assert "shard_map" in hlo or "sdy.manual_computation" in hlo
    for got, want in ((out, out_x), (dq, dq_x), (dk, dk_x), (dv, dv_x)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def _packed_batch(seed, batch, length, vocab=384):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch, length + 1)).astype(np.int32)
    seg = np.sort(rng.integers(1, 4, (batch, length)), axis=1).astype(np.int32)
    starts = np.concatenate([np.ones((batch, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    idx = np.broadcast_to(np.arange(length), (batch, length))
    positions = idx - np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
    return dict(
        inputs=tokens[:, :-1],
        targets=tokens[:, 1:],
        positions=positions.astype(np.int32),
        segment_ids=seg,
        weights=np.ones((batch, length), np.float32),
    )


def _train_losses(attention_impl, steps=3):
    cfg = small_config()
    cfg.model.attention = attention_impl
    cfg.mesh.data = 1
    trainer = trainer_for(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1]))
    state = trainer.init(jax.random.key(0))
    losses = []
    for step in range(steps):
        batch = jax.device_put(_packed_batch(step, 8, 32), trainer.batch_sharding)
        state, stats = trainer.step(state, batch)
        losses.append((float(stats["loss"]), float(stats["grad_norm"])))
    return np.array(losses)


def test_training_with_pallas_attention_matches_xla():
    pallas = _train_losses("pallas")
    xla = _train_losses("xla")
    np.testing.assert_allclose(pallas, xla, rtol=1e-5)
    assert len(set(pallas[:, 0])) == len(pallas)  # the loss moves: the test can fail


def _compiled_grad(attention_impl, length):
    cfg = small_config()
    cfg.model.attention = attention_impl
    mcfg = model.ModelConfig.from_config(cfg.model)
    params = jax.eval_shape(lambda: model.init(mcfg, jax.random.key(0)))
    batch = {
        key: jax.ShapeDtypeStruct((1, length), jnp.int32)
        for key in ("inputs", "targets", "positions", "segment_ids")
    }
    batch["weights"] = jax.ShapeDtypeStruct((1, length), jnp.float32)
    grad = jax.jit(jax.grad(lambda p, b: model.loss_fn(p, b, mcfg)[0]))
    return grad.lower(params, batch).compile()


def test_pallas_holds_no_length_squared_buffer_at_4096():
    # Compile only: the model's loss gradient at length 4096 (4 heads, 2 kv heads).
    square = re.compile(r"\w+\[[0-9,]*4096,4096[0-9,]*\]")
    xla = _compiled_grad("xla", 4096)
    pallas = _compiled_grad("pallas", 4096)
    assert square.search(xla.as_text()), "the reference should materialize [L x L] scores"
    assert not square.search(pallas.as_text()), square.findall(pallas.as_text())[:5]
    per_head_scores = 4096 * 4096 * 4
    assert xla.memory_analysis().temp_size_in_bytes > 4 * per_head_scores
    assert pallas.memory_analysis().temp_size_in_bytes < per_head_scores * 1.5


def test_benchmark_quick_run_prints_a_table_and_one_json_line(capsys):
    path = pathlib.Path(REPO) / "bench" / "attention.py"
    spec = importlib.util.spec_from_file_location("bench_attention", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--quick", "--shapes=1,128,2,1,64", "--causal=1"])
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["bench"] == "attention" and result["causal"] is True
    assert {row["impl"] for row in result["rows"]} == {"pallas", "xla"}
    assert all(row["fwd_bwd_tflops"] > 0 for row in result["rows"])
    assert lines[1].split()[:2] == ["impl", "B"]


def _bench_module():
    path = pathlib.Path(REPO) / "bench" / "attention.py"
    spec = importlib.util.spec_from_file_location("bench_attention", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_benchmark_packed_segments_rows_go_to_the_rows_file_as_measured(capsys, tmp_path):
    bench = _bench_module()
    rows_out = tmp_path / "rows.jsonl"
    argv = ["--quick", "--shapes=1,128,4,1,64", "--segments=0,4", f"--rows_out={rows_out}"]
    bench.main(argv + ["--impls=xla"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [row["segments"] for row in result["rows"]] == [0, 4]
    written = [json.loads(line) for line in rows_out.read_text().splitlines()]
    assert written == result["rows"]
    assert all(row["fwd_bwd_ms"] > 0 for row in written)
    ids = bench.packed_segments(2, 8, 4)
    assert ids.shape == (2, 8) and ids[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert bench.packed_segments(2, 8, 0) is None


def test_benchmark_bad_segments_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        _bench_module().main(["--quick", "--segments=-1"])
    assert exc.value.code == 2
    assert "segments" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The XLA path against a float64 reference: GQA, sliding windows, packed segments


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
    with jax.default_matmul_precision("highest"):
        got = attention(q, k, v, segment_ids_BxL=seg, causal=causal, impl="xla")
    want = _reference_attention(q, k, v, seg, causal)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_sliding_window_attention_matches_reference(causal):
    rng = np.random.default_rng(7)
    q = rng.standard_normal((2, 20, 4, 8)).astype(np.float32)
    k, v = (rng.standard_normal((2, 20, 2, 8)).astype(np.float32) for _ in range(2))
    seg = np.sort(rng.integers(1, 3, (2, 20)), axis=1).astype(np.int32)
    with jax.default_matmul_precision("highest"):
        got = attention(q, k, v, segment_ids_BxL=seg, causal=causal, impl="xla", window=5)
    np.testing.assert_allclose(
        got, _reference_attention(q, k, v, seg, causal, 5), rtol=1e-5, atol=1e-5
    )
    assert not np.allclose(got, _reference_attention(q, k, v, seg, causal), atol=1e-3)


def test_gqa_with_equal_heads_is_multi_head_attention():
    # n_kv_heads == n_heads must be exactly MHA: K/V head i serves query head i.
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 16, 4, 8)).astype(np.float32) for _ in range(3))
    with jax.default_matmul_precision("highest"):
        got = attention(q, k, v, causal=True, impl="xla")
    want = _reference_attention(q, k, v, None, True)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("length", [1, 5])
@pytest.mark.parametrize("window", [0, 4])
def test_cached_attention_matches_reference(length, window):
    # Decode (one query: multiply-reduces) and chunks (einsums) over a cache with ragged
    # rows; slots past each query's position hold garbage that must be masked.
    rng = np.random.default_rng(length + window)
    b, s, h, g, d = 3, 16, 4, 2, 8
    q = rng.standard_normal((b, length, h, d)).astype(np.float32)
    k, v = (rng.standard_normal((b, s, g, d)).astype(np.float32) for _ in range(2))
    start_B = np.array([0, 6, s - length])
    positions = (start_B[:, None] + np.arange(length)).astype(np.int32)
    with jax.default_matmul_precision("highest"):
        got = dispatch.cached_attention(q, k, v, positions, window=window)
    want = np.zeros_like(q)
    for bi in range(b):
        for li in range(length):
            p = positions[bi, li]
            visible = (np.arange(s) <= p) & ((np.arange(s) > p - window) if window else True)
            for hi in range(h):
                logits = np.where(
                    visible, k[bi, :, hi // (h // g)] @ q[bi, li, hi] / d**0.5, -np.inf
                )
                e = np.exp(logits - logits.max())
                want[bi, li, hi] = (e / e.sum()) @ v[bi, :, hi // (h // g)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
