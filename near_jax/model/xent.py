"""Fused, chunked cross-entropy: the output head and the loss without [B, L, V] logits.

`fused_xent(hidden, head, targets, weights, chunk)` returns the weighted sums of the
next-token cross-entropy and of log(Z)^2 (the z-loss) exactly as the unfused path computes
them from `apply`'s logits, but it runs the head matmul, log-sum-exp and target logit one
chunk of sequence positions at a time (a scan), and its custom VJP recomputes each chunk's
logits to produce d_hidden and d_head (accumulated in float32). A chunk is `chunk` tokens
on each device: `chunk // rows` positions of each of the device's rows (at least one), so
peak memory holds [rows, chunk / rows, V] logits whatever the batch, never [B, L, V]; a
length the positions don't divide is padded with zero-weight positions.

Under FSDP each chunk's head gradient is reduce-scattered into the sharded accumulator, so
fewer, larger chunks trade memory for fewer collectives.

`chunked_scores` is the forward-only twin for scoring: per position log(Z), the target's
logit and whether the target is the argmax.

The vocab may be sharded over the mesh (the `vocab` logical axis, like `apply`'s head): the
chunk logits carry the same logical-axis constraint, so XLA reduces log-sum-exp across it.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from near_jax import sharding
from near_jax.sharding import constrain

Params = Any


def head_weights(params: Params, tie_embeddings: bool) -> jax.Array:
    """The output head [D, V] in the parameters' dtype (the embedding, transposed, if tied)."""
    return params["embed"].T if tie_embeddings else params["head"]


def positions_per_chunk(rows: int, length: int, chunk: int) -> int:
    """Sequence positions per chunk: `chunk` tokens over this device's share of `rows`.

    The device's rows are the batch split by the mesh's `batch` axes (none off a mesh).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        axes = sharding.logical_to_spec(PartitionSpec("batch"), (rows,), mesh)[0] or ()
        rows //= math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
    return min(length, max(1, chunk // rows))


def _zeros(shape: tuple[int, ...], *like: jax.Array) -> jax.Array:
    """float32 zeros that vary over the manual mesh axes any of `like` varies over: inside
    shard_map (in-mesh DiLoCo) a scan's initial carry must have its updates' type."""
    zeros = jnp.zeros(shape, jnp.float32)
    for x in like:
        zeros = zeros + jnp.zeros_like(x, jnp.float32, shape=())
    return zeros


def _chunks(x_BxL: jax.Array, chunk: int, fill: Any = 0) -> jax.Array:
    """[B, L, ...] -> [n, B, chunk, ...], padding L up to a multiple of `chunk` with `fill`."""
    b, length = x_BxL.shape[:2]
    n = -(-length // chunk)
    pad = [(0, 0), (0, n * chunk - length)] + [(0, 0)] * (x_BxL.ndim - 2)
    x_BxL = jnp.pad(x_BxL, pad, constant_values=fill)
    return jnp.moveaxis(x_BxL.reshape(b, n, chunk, *x_BxL.shape[2:]), 1, 0)


def _unchunk(x_NxBxC: jax.Array, length: int) -> jax.Array:
    """[n, B, chunk] -> [B, L]: the inverse of `_chunks` for per-position values."""
    n, b, c = x_NxBxC.shape
    return jnp.moveaxis(x_NxBxC, 0, 1).reshape(b, n * c)[:, :length]


def _logits(h_BxCxD: jax.Array, head_DxV: jax.Array, dtype: Any) -> jax.Array:
    """One chunk's float32 logits, computed exactly as `Transformer.__call__` computes them."""
    logits_BxCxV = jnp.einsum(
        "bcd,dv->bcv", h_BxCxD, head_DxV.astype(dtype), preferred_element_type=jnp.float32
    )
    return constrain(logits_BxCxV, ("batch", "length", "vocab"))


def _target_logit(h_BxCxD: jax.Array, head_DxV: jax.Array, t_BxC: jax.Array, dtype) -> jax.Array:
    """The targets' logits from their head columns (a [B, C, D] gather, like the embedding
    lookup): picked out of the [B, C, V] logits instead, XLA's CPU back end wrote a second
    [B, C, V] buffer (the select) before reducing it."""
    w_BxCxD = jnp.take(head_DxV.T, t_BxC, axis=0).astype(dtype)
    return jnp.einsum("bcd,bcd->bc", h_BxCxD, w_BxCxD, preferred_element_type=jnp.float32)


def _forward(hidden_BxLxD, head_DxV, targets_BxL, weights_BxL, chunk, dtype):
    """(xent sum, log(Z)^2 sum) and the per-position log(Z) [B, L] the backward needs."""
    chunk = positions_per_chunk(*hidden_BxLxD.shape[:2], chunk)
    w_NxBxC = _chunks(weights_BxL.astype(jnp.float32), chunk)

    def body(carry, xs):
        h_BxCxD, t_BxC, w_BxC = xs
        logits_BxCxV = _logits(h_BxCxD, head_DxV, dtype)
        log_z_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
        nll_BxC = log_z_BxC - _target_logit(h_BxCxD, head_DxV, t_BxC, dtype)
        xent, z = carry
        xent = xent + (nll_BxC * w_BxC).sum()
        z = z + (jnp.square(log_z_BxC) * w_BxC).sum()
        return (xent, z), log_z_BxC

    zero = _zeros((), hidden_BxLxD, head_DxV, targets_BxL, weights_BxL)
    xs = (_chunks(hidden_BxLxD, chunk), _chunks(targets_BxL, chunk), w_NxBxC)
    (xent, z), log_z_NxBxC = jax.lax.scan(body, (zero, zero), xs)
    return (xent, z), _unchunk(log_z_NxBxC, hidden_BxLxD.shape[1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def fused_xent(
    hidden_BxLxD: jax.Array,
    head_DxV: jax.Array,
    targets_BxL: jax.Array,
    weights_BxL: jax.Array,
    chunk: int,
    dtype: Any = jnp.bfloat16,
) -> tuple[jax.Array, jax.Array]:
    """(sum of weighted cross-entropy, sum of weighted log(Z)^2), both float32 scalars.

    `chunk`: tokens per device per chunk (see the module docstring).

    `hidden_BxLxD` is the final-normed residual stream, `head_DxV` the output head (any
    dtype; cast to the compute `dtype` for the matmul, as the unfused head does). Gradients
    flow to hidden and head; targets and weights get none.
    """
    return _forward(hidden_BxLxD, head_DxV, targets_BxL, weights_BxL, chunk, dtype)[0]


def _fused_fwd(hidden_BxLxD, head_DxV, targets_BxL, weights_BxL, chunk, dtype):
    out, log_z_BxL = _forward(hidden_BxLxD, head_DxV, targets_BxL, weights_BxL, chunk, dtype)
    return out, (hidden_BxLxD, head_DxV, targets_BxL, weights_BxL, log_z_BxL)


def _fused_bwd(chunk, dtype, res, g):
    hidden_BxLxD, head_DxV, targets_BxL, weights_BxL, log_z_BxL = res
    g_xent, g_z = g
    length = hidden_BxLxD.shape[1]
    chunk = positions_per_chunk(*hidden_BxLxD.shape[:2], chunk)
    head_dt_DxV = head_DxV.astype(dtype)

    def body(d_head_DxV, xs):
        h_BxCxD, t_BxC, w_BxC, log_z_BxC = xs
        logits_BxCxV = _logits(h_BxCxD, head_DxV, dtype)
        p_BxCxV = jnp.exp(logits_BxCxV - log_z_BxC[..., None])
        # d/dlogits of w * (g_xent * (log Z - logit[t]) + g_z * log Z^2): the softmax scaled
        # per position, minus the one-hot target; one fused elementwise pass over the chunk.
        scale_BxC = w_BxC * (g_xent + 2.0 * g_z * log_z_BxC)
        vocab_V = jnp.arange(logits_BxCxV.shape[-1], dtype=t_BxC.dtype)
        onehot_BxCxV = vocab_V == t_BxC[..., None]
        d_logits_BxCxV = p_BxCxV * scale_BxC[..., None] - jnp.where(
            onehot_BxCxV, (w_BxC * g_xent)[..., None], 0.0
        )
        d_logits_BxCxV = constrain(d_logits_BxCxV.astype(dtype), ("batch", "length", "vocab"))
        d_h_BxCxD = jnp.einsum(
            "bcv,dv->bcd", d_logits_BxCxV, head_dt_DxV, preferred_element_type=jnp.float32
        )
        d_head_DxV = d_head_DxV + jnp.einsum(
            "bcd,bcv->dv", h_BxCxD.astype(dtype), d_logits_BxCxV, preferred_element_type=jnp.float32
        )
        d_head_DxV = constrain(d_head_DxV, ("embed", "vocab"))
        return d_head_DxV, d_h_BxCxD.astype(hidden_BxLxD.dtype)

    xs = (
        _chunks(hidden_BxLxD, chunk),
        _chunks(targets_BxL, chunk),
        _chunks(weights_BxL.astype(jnp.float32), chunk),
        _chunks(log_z_BxL, chunk),
    )
    like = (hidden_BxLxD, head_DxV, targets_BxL, weights_BxL, g_xent, g_z)
    d_head_DxV = constrain(_zeros(head_DxV.shape, *like), ("embed", "vocab"))
    d_head_DxV, d_h_NxBxCxD = jax.lax.scan(body, d_head_DxV, xs)
    b, n = hidden_BxLxD.shape[0], d_h_NxBxCxD.shape[0]
    d_h_BxLxD = jnp.moveaxis(d_h_NxBxCxD, 0, 1).reshape(b, n * chunk, -1)[:, :length]
    return (
        d_h_BxLxD,
        d_head_DxV.astype(head_DxV.dtype),
        None,
        None,
    )


fused_xent.defvjp(_fused_fwd, _fused_bwd)


def chunked_scores(
    hidden_BxLxD: jax.Array,
    head_DxV: jax.Array,
    targets_BxL: jax.Array,
    chunk: int,
    dtype: Any = jnp.bfloat16,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per position: log(Z), the target's logit and whether it is the argmax; each [B, L].

    The forward-only counterpart of `fused_xent` for scoring (no gradients).
    """
    length = hidden_BxLxD.shape[1]
    chunk = positions_per_chunk(*hidden_BxLxD.shape[:2], chunk)

    def body(_, xs):
        h_BxCxD, t_BxC = xs
        logits_BxCxV = _logits(h_BxCxD, head_DxV, dtype)
        log_z_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
        hit_BxC = jnp.argmax(logits_BxCxV, axis=-1) == t_BxC
        return None, (log_z_BxC, _target_logit(h_BxCxD, head_DxV, t_BxC, dtype), hit_BxC)

    xs = (_chunks(hidden_BxLxD, chunk), _chunks(targets_BxL, chunk))
    _, outs = jax.lax.scan(body, None, xs)
    log_z_BxL, target_BxL, hit_BxL = (_unchunk(o, length) for o in outs)
    return log_z_BxL, target_BxL, hit_BxL
