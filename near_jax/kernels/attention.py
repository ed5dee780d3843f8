"""The attention dispatcher: the model calls `attention(q, k, v, ...)`; config picks the impl.

Layout is the model's: q [batch, length, heads, head_dim], k/v [batch, length, kv_heads,
head_dim]; grouped-query attention is native (K/V are never repeated per query head).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import logging

IMPLEMENTATIONS = ("auto", "xla", "cudnn")  # pallas and splash arrive with their kernels
_warned: set[str] = set()


def attention(
    q_BxLxHxK: jax.Array,
    k_BxMxGxK: jax.Array,
    v_BxMxGxK: jax.Array,
    *,
    segment_ids_BxL: jax.Array | None = None,
    causal: bool = True,
    sm_scale: float | None = None,
    impl: str = "auto",
    block_q: int = 0,
    block_kv: int = 0,
    window: int = 0,
) -> jax.Array:
    """Scaled dot-product attention with causal and packed-segment masking.

    Args:
      q_BxLxHxK: queries. H must be a multiple of the kv head count G.
      k_BxMxGxK, v_BxMxGxK: keys and values (M == L: self-attention).
      segment_ids_BxL: document ids of a packed row; a query attends only to keys of its own
        document. None: one document per row.
      causal: mask keys after the query position.
      sm_scale: softmax scale; default 1/sqrt(head_dim).
      impl: auto | xla | cudnn. `auto` picks the best available for the backend; an explicit
        impl that cannot serve the request raises ValueError.
      block_q, block_kv: kernel block sizes (0 = the backend's default); unused by xla.
      window: sliding-window span: a query sees keys less than `window` positions away
        (0 = unlimited).

    Returns:
      [batch, length, heads, head_dim] in q's dtype.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention impl={impl!r} is not allowed: one of {IMPLEMENTATIONS}")
    if q_BxLxHxK.shape[2] % k_BxMxGxK.shape[2]:
        raise ValueError(
            f"query heads {q_BxLxHxK.shape[2]} must be a multiple of kv heads {k_BxMxGxK.shape[2]}"
        )
    scale = q_BxLxHxK.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    if impl == "auto":
        impl = "xla" if window else _pick_auto(q_BxLxHxK)
    if impl == "cudnn":
        reason = _cudnn_unsupported(q_BxLxHxK) or ("sliding window" if window else "")
        if reason:
            raise ValueError(f"attention impl='cudnn' cannot serve this call: {reason}")
        return _cudnn(q_BxLxHxK, k_BxMxGxK, v_BxMxGxK, segment_ids_BxL, causal, scale)
    return xla_attention(
        q_BxLxHxK, k_BxMxGxK, v_BxMxGxK, segment_ids_BxL, causal, scale, window=window
    )


def _pick_auto(q: jax.Array) -> str:
    if jax.default_backend() != "gpu":
        return "xla"
    reason = _cudnn_unsupported(q)
    if reason:
        if "cudnn" not in _warned:
            _warned.add("cudnn")
            logging.info("attention: cudnn unavailable (%s); using xla", reason)
        return "xla"
    return "cudnn"


def _cudnn_unsupported(q: jax.Array) -> str:
    if jax.default_backend() != "gpu":
        return f"backend is {jax.default_backend()}, cudnn needs gpu"
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"dtype {q.dtype} (cudnn needs bfloat16 or float16)"
    if q.shape[-1] > 128 or q.shape[-1] % 8:
        return f"head_dim {q.shape[-1]} (cudnn needs a multiple of 8, at most 128)"
    return ""


def _cudnn(q, k, v, segment_ids, causal, scale):
    mask = None
    if segment_ids is not None:
        mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, scale=scale, is_causal=causal, implementation="cudnn"
    )


def xla_attention(
    q_BxLxHxK: jax.Array,
    k_BxMxGxK: jax.Array,
    v_BxMxGxK: jax.Array,
    segment_ids_BxL: jax.Array | None,
    causal: bool,
    scale: float,
    window: int = 0,
) -> jax.Array:
    """Reference attention in plain XLA: logits and softmax in float32."""
    b, length, h, d = q_BxLxHxK.shape
    g = k_BxMxGxK.shape[2]
    q_BxLxGxRxK = q_BxLxHxK.reshape(b, length, g, h // g, d)
    logits_BxGxRxLxM = jnp.einsum(
        "blgrk,bmgk->bgrlm", q_BxLxGxRxK, k_BxMxGxK, preferred_element_type=jnp.float32
    )
    logits_BxGxRxLxM *= scale
    m = k_BxMxGxK.shape[1]
    mask_BxLxM = jnp.ones((1, length, m), dtype=bool)
    if causal:
        mask_BxLxM = mask_BxLxM & (jnp.arange(length)[:, None] >= jnp.arange(m)[None, :])
    if window:
        mask_BxLxM = mask_BxLxM & (
            jnp.abs(jnp.arange(length)[:, None] - jnp.arange(m)[None, :]) < window
        )
    if segment_ids_BxL is not None:
        mask_BxLxM = mask_BxLxM & (segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :])
    logits_BxGxRxLxM = jnp.where(
        mask_BxLxM[:, None, None], logits_BxGxRxLxM, jnp.finfo(jnp.float32).min
    )
    probs_BxGxRxLxM = jax.nn.softmax(logits_BxGxRxLxM, axis=-1).astype(v_BxMxGxK.dtype)
    out_BxLxGxRxK = jnp.einsum("bgrlm,bmgk->blgrk", probs_BxGxRxLxM, v_BxMxGxK)
    return out_BxLxGxRxK.reshape(b, length, h, d)
