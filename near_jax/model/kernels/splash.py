"""JAX's shipped TPU splash attention behind the model's [batch, length, heads, head_dim] API.

Splash takes one example at a time in head-major layout, q [H, L, K] and k/v [G, L, K] with
G dividing H (grouped-query attention is native), a static mask object and no softmax scale;
this wrapper transposes, pre-scales q in float32, builds the mask from causal/window and
vmaps over the batch. Blocks must divide the length, so lengths must be multiples of 128.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash

DEFAULT_BLOCK = 512
LENGTH_MULTIPLE = 128
DTYPES = (jnp.float32, jnp.bfloat16)


def unsupported(q_BxLxHxK: jax.Array, k_BxMxGxK: jax.Array) -> str:
    """Why splash cannot serve these inputs on a TPU ("" if it can)."""
    length = q_BxLxHxK.shape[1]
    if q_BxLxHxK.dtype not in DTYPES:
        return f"dtype {q_BxLxHxK.dtype} (splash needs float32 or bfloat16)"
    if k_BxMxGxK.shape[1] != length:
        return "key length differs from query length (self-attention only)"
    if length % LENGTH_MULTIPLE:
        return f"length {length} is not a multiple of {LENGTH_MULTIPLE}"
    return ""


def _block(requested: int, length: int) -> int:
    """The largest multiple of 128 that divides `length` and is at most `requested`."""
    block = max(LENGTH_MULTIPLE, min(requested or DEFAULT_BLOCK, length))
    block -= block % LENGTH_MULTIPLE
    while length % block:
        block -= LENGTH_MULTIPLE
    return block


@functools.lru_cache(maxsize=64)
def _kernel(length, heads, causal, window, block_q, block_kv, interpret):
    shape = (length, length)
    if window:
        mask = splash.LocalMask(shape, (window - 1, 0 if causal else window - 1), offset=0)
    elif causal:
        mask = splash.CausalMask(shape)
    else:
        mask = splash.FullMask(shape)
    bq, bk = _block(block_q, length), _block(block_kv, length)
    sizes = splash.BlockSizes(
        block_q=bq,
        block_kv=bk,
        block_kv_compute=bk,
        block_q_dkv=bq,
        block_kv_dkv=bk,
        block_kv_dkv_compute=bk,
        block_q_dq=bq,
        block_kv_dq=bk,
    )
    return splash.make_splash_mha_single_device(
        splash.MultiHeadMask([mask] * heads), block_sizes=sizes, interpret=interpret
    )


def splash_attention(
    q_BxLxHxK: jax.Array,
    k_BxLxGxK: jax.Array,
    v_BxLxGxK: jax.Array,
    segment_ids_BxL: jax.Array | None,
    *,
    causal: bool,
    scale: float,
    window: int = 0,
    block_q: int = 0,
    block_kv: int = 0,
    interpret: bool = False,
) -> jax.Array:
    """Splash attention; `interpret=True` runs it in Pallas interpret mode (CPU tests)."""
    reason = unsupported(q_BxLxHxK, k_BxLxGxK)
    if reason:
        raise ValueError(f"splash attention cannot serve this call: {reason}")
    _, length, heads, _ = q_BxLxHxK.shape
    kernel = _kernel(length, heads, causal, window, block_q, block_kv, interpret)
    q_BxHxLxK = (q_BxLxHxK.astype(jnp.float32) * scale).astype(q_BxLxHxK.dtype)
    q_BxHxLxK = q_BxHxLxK.transpose(0, 2, 1, 3)
    k_BxGxLxK = k_BxLxGxK.transpose(0, 2, 1, 3)
    v_BxGxLxK = v_BxLxGxK.transpose(0, 2, 1, 3)
    if segment_ids_BxL is None:
        out_BxHxLxK = jax.vmap(kernel)(q_BxHxLxK, k_BxGxLxK, v_BxGxLxK)
    else:

        def one(q, k, v, seg_L):
            return kernel(q, k, v, segment_ids=splash.SegmentIds(q=seg_L, kv=seg_L))

        seg = segment_ids_BxL.astype(jnp.int32)
        out_BxHxLxK = jax.vmap(one)(q_BxHxLxK, k_BxGxLxK, v_BxGxLxK, seg)
    return out_BxHxLxK.transpose(0, 2, 1, 3)
