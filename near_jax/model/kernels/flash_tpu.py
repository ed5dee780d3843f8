"""Flash attention for TPU (Mosaic): forward, dQ and dK/dV `pallas_call`s over a block grid.

Kernel layout is head-major, q [B, H, L, K] and k/v [B, G, L, K]: a Mosaic block's last two
dims must be (8, 128)-aligned or whole, which a [B, L, H, K] array only allows for one head
at a time when H == 1; `flash_attention.py` transposes (XLA fuses that into the producers).
Segment ids come twice, as a column [B, L, 1] (one id per query row of a block) and as a row
[B, 1, L] (one per key column), so the kernels compare them without relayouts; log-sum-exp
and delta are rows [B, H, 1, L] for the same reason (HBM-compact, lane-dense).

Grids put the reduction axis last and mark it "arbitrary"; running state lives in VMEM
scratch. Blocks outside the causal/window band are not computed (`pl.when`) and not fetched:
the index maps clamp the visited block to the last needed one, so the pipeline sees an
unchanged block index and issues no DMA. GQA: query head h reads K/V head h // (H / G); the
dK/dV grid walks the R = H / G query heads of a group as an extra reduction axis, so K/V and
their gradients are never materialized per query head.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from near_jax.model.kernels import flash_blocks as fb
from near_jax.model.kernels.flash_blocks import Tiling

_LANES = 128


def _row_to_col(x_1xL: jax.Array) -> jax.Array:
    """[1, L] -> [L, 1] through a lane-aligned 2-D transpose (L is a multiple of 128)."""
    n = x_1xL.shape[1]
    return jnp.broadcast_to(x_1xL, (_LANES, n)).T[:, :1]


def _col_to_row(x_Lx1: jax.Array) -> jax.Array:
    """[L, 1] -> [1, L], the inverse of `_row_to_col`."""
    n = x_Lx1.shape[0]
    return jnp.broadcast_to(x_Lx1, (n, _LANES)).T[:1, :]


def _vmem(block_shape, index_map) -> pl.BlockSpec:
    """A block pipelined HBM -> VMEM (Mosaic double-buffers the copies)."""
    return pl.BlockSpec(block_shape, index_map, memory_space=pltpu.VMEM)


def _clamped(lo, step, hi, n):
    # Block visited at `step` of a [lo, hi] range; repeats `hi` once the range is exhausted
    # (same block index -> no new DMA) and stays in bounds when the range is empty.
    return jnp.clip(jnp.minimum(lo + step, hi), 0, n - 1)


def _params(*semantics) -> pltpu.CompilerParams:
    return pltpu.CompilerParams(dimension_semantics=semantics)


def forward(q, k, v, seg_col, seg_row, *, t: Tiling, scale, interpret, poison):
    """Returns out [B, H, L, K] (q's dtype) and log-sum-exp [B, H, 1, L] float32."""
    b, h, length, d = q.shape
    rep = h // k.shape[1]
    bq, bk, steps = t.block_q, t.block_kv, t.kv_steps

    def kv_block(i, s):
        lo, hi = t.kv_range(i)
        return _clamped(lo, s, hi, t.num_kv)

    q_spec = _vmem((None, None, bq, d), lambda b_, h_, i, s: (b_, h_, i, 0))
    kv_spec = _vmem(
        (None, None, bk, d), lambda b_, h_, i, s: (b_, lax.div(h_, rep), kv_block(i, s), 0)
    )
    in_specs, args = [q_spec, kv_spec, kv_spec], [q, k, v]
    if t.segments:
        in_specs += [
            _vmem((None, bq, 1), lambda b_, h_, i, s: (b_, i, 0)),
            _vmem((None, 1, bk), lambda b_, h_, i, s: (b_, 0, kv_block(i, s))),
        ]
        args += [seg_col, seg_row]
    out_shape = [
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        jax.ShapeDtypeStruct((b, h, 1, length), jnp.float32),
    ]
    out_specs = [q_spec, _vmem((None, None, 1, bq), lambda b_, h_, i, s: (b_, h_, 0, i))]
    aliases: dict[int, int] = {}
    if poison:
        fb.alias_poisoned_outputs(out_shape, out_specs, args, in_specs, aliases)
    kernel = functools.partial(
        _forward_kernel, t=t, scale=scale, precision=fb.precision_for(q.dtype)
    )
    flops = 4 * b * h * length * t.len_kv * d * t.visited_fraction()
    return pl.pallas_call(
        kernel,
        grid=(b, h, t.num_q, steps),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[
            pltpu.VMEM((bq, 1), jnp.float32),
            pltpu.VMEM((bq, 1), jnp.float32),
            pltpu.VMEM((bq, d), jnp.float32),
        ],
        input_output_aliases=aliases,
        compiler_params=_params(pltpu.PARALLEL, pltpu.PARALLEL, pltpu.PARALLEL, pltpu.ARBITRARY),
        cost_estimate=pl.CostEstimate(
            flops=int(flops),
            transcendentals=int(flops / (2 * d)),
            bytes_accessed=int(4 * q.size * q.dtype.itemsize),
        ),
        interpret=interpret,
        name="flash_fwd_tpu",
    )(*args)


def _forward_kernel(*refs, t: Tiling, scale, precision):
    q_ref, k_ref, v_ref = refs[:3]
    qs_ref, ks_ref = refs[3:5] if t.segments else (None, None)
    o_ref, lse_ref, m_sc, l_sc, acc_sc = refs[-5:]
    bq, bk = t.block_q, t.block_kv
    i, s = pl.program_id(2), pl.program_id(3)
    lo, hi = t.kv_range(i)
    j = lo + s

    @pl.when(s == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, fb.NEG_INF, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(j <= hi)
    def _step():
        keep = t.mask(
            fb.positions(i * bq, (bq, bk), 0),
            fb.positions(j * bk, (bq, bk), 1),
            qs_ref[...] if t.segments else None,
            ks_ref[...] if t.segments else None,
        )
        m, denom, acc = fb.forward_step(
            q_ref[...],
            k_ref[...],
            v_ref[...],
            m_sc[...],
            l_sc[...],
            acc_sc[...],
            keep,
            scale,
            precision,
        )
        m_sc[...], l_sc[...], acc_sc[...] = m, denom, acc

    @pl.when(s == pl.num_programs(3) - 1)
    def _finish():
        out, lse = fb.forward_finish(m_sc[...], l_sc[...], acc_sc[...])
        o_ref[...] = out.astype(o_ref.dtype)
        lse_ref[...] = _col_to_row(lse)


def backward(q, k, v, seg_col, seg_row, lse, delta, do, *, t: Tiling, scale, interpret, poison):
    """Returns dq [B, H, L, K], dk and dv [B, G, L, K] in the inputs' dtypes."""
    dq = _dq(q, k, v, seg_col, seg_row, lse, delta, do, t, scale, interpret, poison)
    dk, dv = _dkv(q, k, v, seg_col, seg_row, lse, delta, do, t, scale, interpret, poison)
    return dq, dk, dv


def _dq(q, k, v, seg_col, seg_row, lse, delta, do, t: Tiling, scale, interpret, poison):
    b, h, length, d = q.shape
    rep = h // k.shape[1]
    bq, bk = t.block_q, t.block_kv

    def kv_block(i, s):
        lo, hi = t.kv_range(i)
        return _clamped(lo, s, hi, t.num_kv)

    q_spec = _vmem((None, None, bq, d), lambda b_, h_, i, s: (b_, h_, i, 0))
    kv_spec = _vmem(
        (None, None, bk, d), lambda b_, h_, i, s: (b_, lax.div(h_, rep), kv_block(i, s), 0)
    )
    row_spec = _vmem((None, None, 1, bq), lambda b_, h_, i, s: (b_, h_, 0, i))
    in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
    args = [q, k, v, do, lse, delta]
    if t.segments:
        in_specs += [
            _vmem((None, bq, 1), lambda b_, h_, i, s: (b_, i, 0)),
            _vmem((None, 1, bk), lambda b_, h_, i, s: (b_, 0, kv_block(i, s))),
        ]
        args += [seg_col, seg_row]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    out_specs = [q_spec]
    aliases: dict[int, int] = {}
    if poison:
        fb.alias_poisoned_outputs(out_shape, out_specs, args, in_specs, aliases)
    kernel = functools.partial(_dq_kernel, t=t, scale=scale, precision=fb.precision_for(q.dtype))
    [dq] = pl.pallas_call(
        kernel,
        grid=(b, h, t.num_q, t.kv_steps),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[
            pltpu.VMEM((bq, d), jnp.float32),
            pltpu.VMEM((bq, 1), jnp.float32),
            pltpu.VMEM((bq, 1), jnp.float32),
        ],
        input_output_aliases=aliases,
        compiler_params=_params(pltpu.PARALLEL, pltpu.PARALLEL, pltpu.PARALLEL, pltpu.ARBITRARY),
        interpret=interpret,
        name="flash_dq_tpu",
    )(*args)
    return dq


def _dq_kernel(*refs, t: Tiling, scale, precision):
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs[:6]
    qs_ref, ks_ref = refs[6:8] if t.segments else (None, None)
    dq_ref, acc_sc, lse_sc, delta_sc = refs[-4:]
    bq, bk = t.block_q, t.block_kv
    i, s = pl.program_id(2), pl.program_id(3)
    lo, hi = t.kv_range(i)
    j = lo + s

    @pl.when(s == 0)
    def _init():
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)
        lse_sc[...] = _row_to_col(lse_ref[...])
        delta_sc[...] = _row_to_col(delta_ref[...])

    @pl.when(j <= hi)
    def _step():
        keep = t.mask(
            fb.positions(i * bq, (bq, bk), 0),
            fb.positions(j * bk, (bq, bk), 1),
            qs_ref[...] if t.segments else None,
            ks_ref[...] if t.segments else None,
        )
        acc_sc[...] += fb.dq_step(
            q_ref[...],
            k_ref[...],
            v_ref[...],
            do_ref[...],
            lse_sc[...],
            delta_sc[...],
            keep,
            scale,
            precision,
        )

    @pl.when(s == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (acc_sc[...] * scale).astype(dq_ref.dtype)


def _dkv(q, k, v, seg_col, seg_row, lse, delta, do, t: Tiling, scale, interpret, poison):
    b, h, length, d = q.shape
    g = k.shape[1]
    rep = h // g
    bq, bk = t.block_q, t.block_kv

    def q_block(j, s):
        lo, hi = t.q_range(j)
        return _clamped(lo, s, hi, t.num_q)

    q_spec = _vmem(
        (None, None, bq, d), lambda b_, g_, j, r, s: (b_, g_ * rep + r, q_block(j, s), 0)
    )
    kv_spec = _vmem((None, None, bk, d), lambda b_, g_, j, r, s: (b_, g_, j, 0))
    row_spec = _vmem(
        (None, None, 1, bq), lambda b_, g_, j, r, s: (b_, g_ * rep + r, 0, q_block(j, s))
    )
    in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
    args = [q, k, v, do, lse, delta]
    if t.segments:
        in_specs += [
            _vmem((None, 1, bq), lambda b_, g_, j, r, s: (b_, 0, q_block(j, s))),
            _vmem((None, bk, 1), lambda b_, g_, j, r, s: (b_, j, 0)),
        ]
        args += [seg_row, seg_col]
    out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
    out_specs = [kv_spec, kv_spec]
    aliases: dict[int, int] = {}
    if poison:
        fb.alias_poisoned_outputs(out_shape, out_specs, args, in_specs, aliases)
    kernel = functools.partial(_dkv_kernel, t=t, scale=scale, precision=fb.precision_for(q.dtype))
    dk, dv = pl.pallas_call(
        kernel,
        grid=(b, g, t.num_kv, rep, t.q_steps),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
        input_output_aliases=aliases,
        compiler_params=_params(
            pltpu.PARALLEL, pltpu.PARALLEL, pltpu.PARALLEL, pltpu.ARBITRARY, pltpu.ARBITRARY
        ),
        interpret=interpret,
        name="flash_dkv_tpu",
    )(*args)
    return dk, dv


def _dkv_kernel(*refs, t: Tiling, scale, precision):
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs[:6]
    qs_ref, ks_ref = refs[6:8] if t.segments else (None, None)
    dk_ref, dv_ref, dk_sc, dv_sc = refs[-4:]
    bq, bk = t.block_q, t.block_kv
    j, r, s = pl.program_id(2), pl.program_id(3), pl.program_id(4)
    lo, hi = t.q_range(j)
    i = lo + s

    @pl.when((r == 0) & (s == 0))
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    @pl.when(i <= hi)
    def _step():
        keep_t = t.mask(
            fb.positions(i * bq, (bk, bq), 1),
            fb.positions(j * bk, (bk, bq), 0),
            qs_ref[...] if t.segments else None,
            ks_ref[...] if t.segments else None,
        )
        dk, dv = fb.dkv_step(
            q_ref[...],
            k_ref[...],
            v_ref[...],
            do_ref[...],
            lse_ref[...],
            delta_ref[...],
            keep_t,
            scale,
            precision,
        )
        dk_sc[...] += dk
        dv_sc[...] += dv

    @pl.when((r == pl.num_programs(3) - 1) & (s == pl.num_programs(4) - 1))
    def _finish():
        dk_ref[...] = (dk_sc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)
