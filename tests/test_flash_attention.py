"""Flash attention kernels: numerics vs a float64 reference, both interpret paths, lowerings.

Interpret mode is slow, so the sweep is a covering set, not a cross product: every length
class (128 ... 1024, powers of two and not), head_dim 64/128 (and a padded 96 on GPU), GQA
ratios 1/2/4/8, causal and not, packed segments or none, float32 and bfloat16, sliding
windows, default and small blocks each appear, on both kernel families (TPU and GPU kernels
run in generic interpret mode on CPU). Every output starts as NaN (`poison_outputs`), so an
element a kernel never writes fails the finiteness check.
"""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from near_jax.model.kernels import flash_attention as flash
from near_jax.model.kernels import flash_blocks as fb

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


@dataclasses.dataclass(frozen=True)
class Case:
    backend: str
    length: int
    heads: int
    kv_heads: int
    head_dim: int
    causal: bool
    segments: bool
    dtype: type
    window: int = 0
    block: int = 0  # 0: the backend's defaults
    batch: int = 1


# Pairwise-style covering set (see the module docstring).
CASES = [
    Case("tpu", 128, 2, 2, 64, True, True, jnp.float32),
    Case("gpu", 200, 4, 2, 128, False, True, jnp.bfloat16, block=64, batch=2),
    Case("tpu", 384, 4, 1, 64, True, False, jnp.bfloat16, block=128),
    Case("gpu", 640, 8, 1, 64, True, True, jnp.float32, window=100, block=64),
    Case("tpu", 1000, 8, 1, 128, False, False, jnp.float32),
    Case("gpu", 1024, 2, 1, 128, True, True, jnp.bfloat16),
    Case("tpu", 512, 4, 4, 128, True, True, jnp.float32, window=64, block=128),
    Case("gpu", 300, 4, 2, 96, False, True, jnp.bfloat16, window=50, block=64),
    Case("tpu", 777, 8, 4, 64, False, True, jnp.bfloat16, window=200, block=128),
]


def _inputs(case: Case, seed: int = 0):
    rng = np.random.default_rng(seed)
    b, length, h, g, d = case.batch, case.length, case.heads, case.kv_heads, case.head_dim
    q, do = (rng.standard_normal((b, length, h, d)) for _ in range(2))
    k, v = (rng.standard_normal((b, length, g, d)) for _ in range(2))
    q, k, v, do = (jnp.asarray(x, case.dtype) for x in (q, k, v, do))
    seg = None
    if case.segments:  # packed rows of 1..5 documents of random lengths
        seg = jnp.asarray(np.sort(rng.integers(0, 5, (b, length)), axis=1), jnp.int32)
    return q, k, v, seg, do


def reference(q, k, v, seg, do, causal, window, scale):
    """Attention output and (dq, dk, dv) in float64 numpy."""
    q, k, v, do = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, v, do))
    b, length, h, d = q.shape
    g = k.shape[2]
    rep = h // g
    idx = np.arange(length)
    mask = np.ones((b, 1, length, length), bool)
    if causal:
        mask &= idx[:, None] >= idx[None, :]
    if window:
        mask &= np.abs(idx[:, None] - idx[None, :]) < window
    if seg is not None:
        seg = np.asarray(seg)
        mask &= (seg[:, :, None] == seg[:, None, :])[:, None]
    # Head-major [B, H, L, K] float64 matmuls (BLAS); K/V repeated per query head.
    qh, doh = q.transpose(0, 2, 1, 3), do.transpose(0, 2, 1, 3)
    kh = np.repeat(k, rep, axis=2).transpose(0, 2, 1, 3)
    vh = np.repeat(v, rep, axis=2).transpose(0, 2, 1, 3)
    s = np.where(mask, qh @ kh.swapaxes(-1, -2) * scale, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    dp = doh @ vh.swapaxes(-1, -2)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))

    def per_kv_head(x_BxHxLxK):  # sum the query heads of each group
        return x_BxHxLxK.transpose(0, 2, 1, 3).reshape(b, length, g, rep, d).sum(3)

    out = (p @ vh).transpose(0, 2, 1, 3)
    dq = (ds @ kh).transpose(0, 2, 1, 3) * scale
    dk = per_kv_head(ds.swapaxes(-1, -2) @ qh) * scale
    dv = per_kv_head(p.swapaxes(-1, -2) @ doh)
    return out, dq, dk, dv


def _run(case: Case, **kwargs):
    q, k, v, seg, do = _inputs(case)

    def f(q, k, v):
        return flash.flash_attention(
            q,
            k,
            v,
            seg,
            causal=case.causal,
            window=case.window,
            backend=case.backend,
            block_q=case.block,
            block_kv=case.block,
            poison_outputs=True,
            **kwargs,
        )

    @jax.jit
    def fwd_bwd(q, k, v, do):
        out, vjp = jax.vjp(f, q, k, v)
        return (out, *vjp(do))

    got = fwd_bwd(q, k, v, do)
    want = reference(q, k, v, seg, do, case.causal, case.window, case.head_dim**-0.5)
    return got, want


def _check(got, want, dtype, names=("out", "dq", "dk", "dv")):
    tol = TOLERANCE[dtype]
    for name, g, w in zip(names, got, want, strict=True):
        assert g.dtype == dtype, name
        g = np.asarray(jnp.asarray(g, jnp.float32), np.float64)
        assert np.isfinite(g).all(), f"{name}: unwritten (NaN-poisoned) or non-finite elements"
        scale = np.abs(w).max()
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol * scale, err_msg=name)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.backend}-L{c.length}-H{c.heads}")
def test_forward_and_gradients_match_float64_reference(case):
    got, want = _run(case)
    _check(got, want, case.dtype)


@pytest.mark.parametrize("interpret", [True, pltpu.InterpretParams()], ids=["generic", "tpu"])
def test_poisoned_outputs_expose_elements_a_kernel_never_writes(interpret):
    # The hook the kernel tests rely on: a block a kernel skips stays NaN. (In TPU interpret
    # mode outputs go through one VMEM buffer, as on hardware: an unwritten block after a
    # written one would hold stale values, which the comparison with the reference catches.)
    out_shape = [jax.ShapeDtypeStruct((256, 128), jnp.float32)]
    spec = pl.BlockSpec((128, 128), lambda i: (i, 0))
    args, in_specs, aliases = [], [], {}
    fb.alias_poisoned_outputs(out_shape, [spec], args, in_specs, aliases)

    def kernel(poison_ref, o_ref):
        del poison_ref

        @pl.when(pl.program_id(0) == 1)
        def _():
            o_ref[...] = jnp.ones(o_ref.shape, o_ref.dtype)

    [out] = pl.pallas_call(
        kernel,
        grid=(2,),
        in_specs=in_specs,
        out_specs=[spec],
        out_shape=out_shape,
        input_output_aliases=aliases,
        interpret=interpret,
    )(*args)
    assert np.isnan(out[:128]).all() and (out[128:] == 1).all()


def test_tpu_interpret_mode_checks_dma_and_bounds():
    # TPU interpret mode simulates VMEM and DMAs, raises on out-of-bounds block reads and
    # fills uninitialized memory with NaN: a stricter run of the Mosaic kernels.
    case = Case("tpu", 300, 4, 2, 64, True, True, jnp.float32, block=128, batch=2)
    params = pltpu.InterpretParams(out_of_bounds_reads="raise", uninitialized_memory="nan")
    got, want = _run(case, interpret=params)
    _check(got, want, case.dtype)


def test_force_tpu_interpret_mode_overrides_generic_interpret():
    case = Case("tpu", 256, 2, 1, 128, False, True, jnp.bfloat16, window=40, block=128)
    q, k, v, seg, _ = _inputs(case, seed=3)
    with pltpu.force_tpu_interpret_mode():
        out = flash.flash_attention(
            q, k, v, seg, causal=False, window=40, backend="tpu", block_q=128, block_kv=128
        )
    want = reference(q, k, v, seg, q, False, 40, 128**-0.5)[0]
    _check([out], [want], jnp.bfloat16, names=("out",))


def _lower(backend, platform, case: Case):
    q = jax.ShapeDtypeStruct((case.batch, case.length, case.heads, case.head_dim), case.dtype)
    k = jax.ShapeDtypeStruct((case.batch, case.length, case.kv_heads, case.head_dim), case.dtype)
    seg = jax.ShapeDtypeStruct((case.batch, case.length), jnp.int32) if case.segments else None

    def loss(q, k, v, seg):
        out = flash.flash_attention(
            q,
            k,
            v,
            seg,
            causal=case.causal,
            window=case.window,
            backend=backend,
            block_q=case.block,
            block_kv=case.block,
            interpret=False,
        )
        return out.astype(jnp.float32).sum()

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    if backend != "gpu":
        return grad.trace(q, k, k, seg).lower(lowering_platforms=(platform,)).as_text()
    # Triton lowering reads the GPU's compute capability: name the target (newer jax has
    # no default without a GPU).
    target = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=None, platform="gpu")
    with jax.sharding.use_abstract_mesh(
        jax.sharding.AbstractMesh((1,), ("x",), abstract_device=target)
    ):
        return grad.trace(q, k, k, seg).lower(lowering_platforms=(platform,)).as_text()


LOWERING_CASES = [
    Case("", 2048, 8, 2, 128, True, True, jnp.bfloat16),
    Case("", 1000, 4, 4, 64, False, False, jnp.float32, window=128),
    Case("", 4096, 16, 2, 128, True, False, jnp.bfloat16, window=1024, block=256, batch=2),
]


@pytest.mark.parametrize("case", LOWERING_CASES, ids=lambda c: f"L{c.length}-K{c.head_dim}")
def test_kernels_lower_for_tpu_mosaic_and_gpu_triton(case):
    # Cross-platform lowering runs the Pallas -> Mosaic and Pallas -> Triton lowerings
    # (block-shape rules, op support) without the hardware; compiling needs the device.
    tpu = _lower("tpu", "tpu", case)
    assert tpu.count("tpu_custom_call") == 3  # forward, dq, dk/dv
    gpu = _lower("gpu", "cuda", case)
    assert gpu.count("__gpu$xla.gpu.triton") == 3


def test_block_sizes_and_inputs_are_validated():
    q = jnp.zeros((1, 256, 4, 64), jnp.bfloat16)
    k = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="multiple of 128"):
        flash.flash_attention(q, k, k, backend="tpu", block_q=96)
    with pytest.raises(ValueError, match="power of two"):
        flash.flash_attention(q, k, k, backend="gpu", block_kv=48)
    with pytest.raises(ValueError, match="dtype int32"):
        flash.flash_attention(q.astype(jnp.int32), k, k)
    with pytest.raises(ValueError, match="self-attention"):
        flash.flash_attention(q, k[:, :128], k[:, :128])
    with pytest.raises(ValueError, match="backend='cpu'"):
        flash.flash_attention(q, k, k, backend="cpu")


def test_blocks_shrink_to_short_sequences_and_padding_is_minimal():
    for backend, length in itertools.product(("tpu", "gpu"), (7, 100, 300)):
        cfg = flash._config(
            backend=backend,
            length=length,
            head_dim=64,
            causal=True,
            window=0,
            segments=False,
            block_q=0,
            block_kv=0,
        )
        unit = 128 if backend == "tpu" else 16
        assert cfg.forward.len_q - length < max(unit, cfg.forward.block_q)
        assert cfg.forward.len_q % cfg.backward.block_q == 0
