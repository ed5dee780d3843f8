"""Flash attention for GPU through the Pallas Triton lowering: forward, dQ and dK/dV kernels.

Why Triton and not Mosaic GPU (decided for JAX 0.10/0.11, revisit when Triton is removed):
- Mosaic GPU's supported entry point is `plgpu.kernel` (warp-specialized, explicit TMA,
  barriers and wgmma); `pl.pallas_call` on Mosaic GPU already warns as deprecated in 0.10.2.
  That is a different program from the block-grid kernels here, Hopper-and-later only, and
  its interpret mode runs a single-block grid, so none of it could be exercised on the CPU
  machines this project is developed and tested on. A Hopper-tuned Mosaic GPU kernel is the
  path to the issue's H100 target (>= 0.8x cuDNN) and is left for a session with a GPU.
- The Triton lowering is deprecated in JAX 0.11 but still ships and works there; it runs on
  Ampere, Hopper and ROCm, and the same kernels run in interpret mode on CPU and lower to
  Triton IR on a CPU-only machine (tests cross-lower them), which catches most mistakes.
- On GPU the dispatcher's `auto` prefers cuDNN's flash attention whenever it can serve the
  call, so this kernel covers what cuDNN cannot (float32, sliding windows without causal
  masking, head_dim cuDNN rejects) and is the reference Pallas path for GPU.
Untested here: compiling through Triton to PTX and running on a GPU (no GPU in development);
block sizes and warp counts are conventional starting points, not tuned measurements.

Layout is the model's, q [B, L, H, K] and k/v [B, L, G, K]; Triton has no block-shape
alignment rule, so heads are indexed in place. Each program owns one query block (forward,
dQ) or one key block (dK/dV) and loops over exactly the partner blocks the causal/window band
needs, so masked-out blocks cost nothing. GQA: query head h reads K/V head h // R; a dK/dV
program loops over the R query heads of its group, so nothing is materialized per query head.
Triton needs power-of-two tiles: blocks are powers of two and `flash_attention.py` pads
head_dim up to one.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from near_jax.model.kernels import flash_blocks as fb
from near_jax.model.kernels.flash_blocks import Tiling


def _params(block_rows: int, head_dim: int) -> pltriton.CompilerParams:
    warps = 4 if block_rows * head_dim <= 64 * 128 else 8
    return pltriton.CompilerParams(num_warps=warps, num_stages=2)


def forward(q, k, v, seg, *, t: Tiling, scale, interpret, poison):
    """Returns out [B, L, H, K] (q's dtype) and log-sum-exp [B, H, L] float32."""
    b, length, h, d = q.shape
    rep = h // k.shape[2]
    bq = t.block_q
    q_spec = pl.BlockSpec((None, bq, None, d), lambda b_, h_, i: (b_, i, h_, 0))
    kv_spec = pl.BlockSpec(
        (None, t.len_kv, None, d), lambda b_, h_, i: (b_, 0, lax.div(h_, rep), 0)
    )
    in_specs, args = [q_spec, kv_spec, kv_spec], [q, k, v]
    if t.segments:
        in_specs += [
            pl.BlockSpec((None, bq), lambda b_, h_, i: (b_, i)),
            pl.BlockSpec((None, t.len_kv), lambda b_, h_, i: (b_, 0)),
        ]
        args += [seg, seg]
    out_shape = [
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        jax.ShapeDtypeStruct((b, h, length), jnp.float32),
    ]
    out_specs = [q_spec, pl.BlockSpec((None, None, bq), lambda b_, h_, i: (b_, h_, i))]
    aliases: dict[int, int] = {}
    if poison:
        fb.alias_poisoned_outputs(out_shape, out_specs, args, in_specs, aliases)
    kernel = functools.partial(
        _forward_kernel, t=t, scale=scale, precision=fb.precision_for(q.dtype)
    )
    return pl.pallas_call(
        kernel,
        grid=(b, h, t.num_q),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=_params(bq, d),
        interpret=interpret,
        name="flash_fwd_gpu",
    )(*args)


def _forward_kernel(*refs, t: Tiling, scale, precision):
    q_ref, k_ref, v_ref = refs[:3]
    qs_ref, ks_ref = refs[3:5] if t.segments else (None, None)
    o_ref, lse_ref = refs[-2:]
    bq, bk = t.block_q, t.block_kv
    i = pl.program_id(2)
    q = q_ref[...]
    q_seg = qs_ref[...][:, None] if t.segments else None
    lo, hi = t.kv_range(i)

    def body(j, carry):
        start = pl.multiple_of(j * bk, bk)
        keys = pl.ds(start, bk)
        keep = t.mask(
            fb.positions(i * bq, (bq, bk), 0),
            fb.positions(start, (bq, bk), 1),
            q_seg,
            ks_ref[keys][None, :] if t.segments else None,
        )
        return fb.forward_step(q, k_ref[keys, :], v_ref[keys, :], *carry, keep, scale, precision)

    init = (
        jnp.full((bq, 1), fb.NEG_INF, jnp.float32),
        jnp.zeros((bq, 1), jnp.float32),
        jnp.zeros((bq, q.shape[-1]), jnp.float32),
    )
    out, lse = fb.forward_finish(*lax.fori_loop(lo, hi + 1, body, init))
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse[:, 0]


def backward(q, k, v, seg, lse, delta, do, *, t: Tiling, scale, interpret, poison):
    """Returns dq [B, L, H, K], dk and dv [B, L, G, K] in the inputs' dtypes."""
    dq = _dq(q, k, v, seg, lse, delta, do, t, scale, interpret, poison)
    dk, dv = _dkv(q, k, v, seg, lse, delta, do, t, scale, interpret, poison)
    return dq, dk, dv


def _dq(q, k, v, seg, lse, delta, do, t: Tiling, scale, interpret, poison):
    b, length, h, d = q.shape
    rep = h // k.shape[2]
    bq = t.block_q
    q_spec = pl.BlockSpec((None, bq, None, d), lambda b_, h_, i: (b_, i, h_, 0))
    kv_spec = pl.BlockSpec(
        (None, t.len_kv, None, d), lambda b_, h_, i: (b_, 0, lax.div(h_, rep), 0)
    )
    row_spec = pl.BlockSpec((None, None, bq), lambda b_, h_, i: (b_, h_, i))
    in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
    args = [q, k, v, do, lse, delta]
    if t.segments:
        in_specs += [
            pl.BlockSpec((None, bq), lambda b_, h_, i: (b_, i)),
            pl.BlockSpec((None, t.len_kv), lambda b_, h_, i: (b_, 0)),
        ]
        args += [seg, seg]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    out_specs = [q_spec]
    aliases: dict[int, int] = {}
    if poison:
        fb.alias_poisoned_outputs(out_shape, out_specs, args, in_specs, aliases)
    kernel = functools.partial(_dq_kernel, t=t, scale=scale, precision=fb.precision_for(q.dtype))
    [dq] = pl.pallas_call(
        kernel,
        grid=(b, h, t.num_q),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=_params(bq, d),
        interpret=interpret,
        name="flash_dq_gpu",
    )(*args)
    return dq


def _dq_kernel(*refs, t: Tiling, scale, precision):
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs[:6]
    qs_ref, ks_ref = refs[6:8] if t.segments else (None, None)
    dq_ref = refs[-1]
    bq, bk = t.block_q, t.block_kv
    i = pl.program_id(2)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
    q_seg = qs_ref[...][:, None] if t.segments else None
    lo, hi = t.kv_range(i)

    def body(j, acc):
        start = pl.multiple_of(j * bk, bk)
        keys = pl.ds(start, bk)
        keep = t.mask(
            fb.positions(i * bq, (bq, bk), 0),
            fb.positions(start, (bq, bk), 1),
            q_seg,
            ks_ref[keys][None, :] if t.segments else None,
        )
        k, v = k_ref[keys, :], v_ref[keys, :]
        return acc + fb.dq_step(q, k, v, do, lse, delta, keep, scale, precision)

    acc = lax.fori_loop(lo, hi + 1, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (acc * scale).astype(dq_ref.dtype)


def _dkv(q, k, v, seg, lse, delta, do, t: Tiling, scale, interpret, poison):
    b, length, h, d = q.shape
    g = k.shape[2]
    rep = h // g
    bk = t.block_kv
    # One program per (batch, kv head, key block) reads the whole length of its R query heads.
    q_spec = pl.BlockSpec((None, t.len_q, rep, d), lambda b_, g_, j: (b_, 0, g_, 0))
    kv_spec = pl.BlockSpec((None, bk, None, d), lambda b_, g_, j: (b_, j, g_, 0))
    rows_spec = pl.BlockSpec((None, rep, t.len_q), lambda b_, g_, j: (b_, g_, 0))
    in_specs = [q_spec, kv_spec, kv_spec, q_spec, rows_spec, rows_spec]
    args = [q, k, v, do, lse, delta]
    if t.segments:
        in_specs += [
            pl.BlockSpec((None, t.len_q), lambda b_, g_, j: (b_, 0)),
            pl.BlockSpec((None, bk), lambda b_, g_, j: (b_, j)),
        ]
        args += [seg, seg]
    out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
    out_specs = [kv_spec, kv_spec]
    aliases: dict[int, int] = {}
    if poison:
        fb.alias_poisoned_outputs(out_shape, out_specs, args, in_specs, aliases)
    kernel = functools.partial(
        _dkv_kernel, t=t, scale=scale, rep=rep, precision=fb.precision_for(q.dtype)
    )
    dk, dv = pl.pallas_call(
        kernel,
        grid=(b, g, t.num_kv),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=_params(bk, d),
        interpret=interpret,
        name="flash_dkv_gpu",
    )(*args)
    return dk, dv


def _dkv_kernel(*refs, t: Tiling, scale, rep, precision):
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs[:6]
    qs_ref, ks_ref = refs[6:8] if t.segments else (None, None)
    dk_ref, dv_ref = refs[-2:]
    bq, bk = t.block_q, t.block_kv
    j = pl.program_id(2)
    k, v = k_ref[...], v_ref[...]
    k_seg = ks_ref[...][:, None] if t.segments else None
    lo, hi = t.q_range(j)

    def head(r, carry):
        def body(i, carry):
            start = pl.multiple_of(i * bq, bq)
            rows = pl.ds(start, bq)
            keep_t = t.mask(
                fb.positions(start, (bk, bq), 1),
                fb.positions(j * bk, (bk, bq), 0),
                qs_ref[rows][None, :] if t.segments else None,
                k_seg,
            )
            dk, dv = fb.dkv_step(
                q_ref[rows, r, :],
                k,
                v,
                do_ref[rows, r, :],
                lse_ref[r, rows][None, :],
                delta_ref[r, rows][None, :],
                keep_t,
                scale,
                precision,
            )
            return carry[0] + dk, carry[1] + dv

        return lax.fori_loop(lo, hi + 1, body, carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, rep, head, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
