"""The attention dispatcher: the model calls `attention(q, k, v, ...)`; config picks the impl.

Layout is the model's: q [batch, length, heads, head_dim], k/v [batch, length, kv_heads,
head_dim]; grouped-query attention is native (K/V are never repeated per query head).

Implementations (`impl`):
  xla     plain XLA, float32 softmax; the reference. Materializes [length x length] scores.
  pallas  our flash attention (`flash_attention.py`): TPU (Mosaic) or GPU (Triton) kernels,
          Pallas interpret mode on CPU.
  cudnn   cuDNN flash attention via `jax.nn.dot_product_attention` (GPU; bf16/fp16). Packed
          segments become a dense [batch, 1, length, length] boolean mask.
  splash  JAX's shipped TPU splash attention (`splash.py`).
  auto    the preferred impl of the platform that can serve the call: TPU splash, then
          pallas; GPU cudnn, then pallas; anything else (CPU) xla. Skipping a preferred impl
          logs one line per reason.
An explicit impl that cannot serve a call raises ValueError naming the impl and the reason.

Under a mesh (`jax.set_mesh`), the Pallas kernels run per shard through `shard_map` with the
logical-axis specs from `sharding.py` (batch and heads split, length whole), since XLA
cannot partition a custom kernel call itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import logging
from jax.sharding import PartitionSpec

from near_jax import sharding
from near_jax.model.kernels import flash_attention as flash
from near_jax.model.kernels import splash

IMPLEMENTATIONS = ("auto", "xla", "pallas", "cudnn", "splash")
AUTO_ORDER = {"tpu": ("splash", "pallas"), "gpu": ("cudnn", "pallas")}
_logged: set[tuple[str, str]] = set()


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
    """Scaled dot-product attention with causal, sliding-window and packed-segment masking.

    Args:
      q_BxLxHxK: queries. H must be a multiple of the kv head count G.
      k_BxMxGxK, v_BxMxGxK: keys and values (M == L: self-attention, except for xla).
      segment_ids_BxL: document ids of a packed row; a query attends only to keys of its own
        document. None: one document per row.
      causal: mask keys after the query position.
      sm_scale: softmax scale; default 1/sqrt(head_dim).
      impl: auto | xla | pallas | cudnn | splash (see the module docstring).
      block_q, block_kv: kernel block sizes (0 = the kernel's default); used by pallas and
        splash.
      window: sliding-window span: a query sees keys less than `window` positions away
        (0 = unlimited).

    Returns:
      [batch, length, heads, head_dim] in q's dtype.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention impl={impl!r} is not allowed: one of {IMPLEMENTATIONS}")
    q, k, v, seg = q_BxLxHxK, k_BxMxGxK, v_BxMxGxK, segment_ids_BxL
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} must be a multiple of kv heads {k.shape[2]}")
    if window < 0:
        raise ValueError(f"attention window={window} must be >= 0")
    scale = q.shape[-1] ** -0.5 if sm_scale is None else float(sm_scale)
    if impl == "auto":
        impl = _pick_auto(q, k, causal, window, seg)
    else:
        reason = unsupported_reason(impl, q, k, causal=causal, window=window, segment_ids=seg)
        if reason:
            raise ValueError(f"attention impl={impl!r} cannot serve this call: {reason}")

    if impl == "xla":
        return xla_attention(q, k, v, seg, causal, scale, window=window)
    if impl == "cudnn":
        return _cudnn(q, k, v, seg, causal, scale, window)
    if impl == "pallas":

        def kernel(q, k, v, seg):
            return flash.flash_attention(
                q,
                k,
                v,
                seg,
                causal=causal,
                sm_scale=scale,
                window=window,
                block_q=block_q,
                block_kv=block_kv,
            )
    else:

        def kernel(q, k, v, seg):
            return splash.splash_attention(
                q,
                k,
                v,
                seg,
                causal=causal,
                scale=scale,
                window=window,
                block_q=block_q,
                block_kv=block_kv,
            )

    return _per_shard(kernel, q, k, v, seg)


def unsupported_reason(
    impl: str,
    q_BxLxHxK: jax.Array,
    k_BxMxGxK: jax.Array,
    *,
    causal: bool = True,
    window: int = 0,
    segment_ids: jax.Array | None = None,
) -> str:
    """Why `impl` cannot serve this call on the running platform ("" if it can)."""
    platform = jax.default_backend()
    if impl == "xla":
        return ""
    if impl == "pallas":
        return flash.unsupported(q_BxLxHxK, k_BxMxGxK)
    if impl == "splash":
        if platform != "tpu":
            return f"backend is {platform}; splash needs a TPU"
        return splash.unsupported(q_BxLxHxK, k_BxMxGxK)
    if impl == "cudnn":
        return _cudnn_unsupported(q_BxLxHxK, causal, window, segment_ids)
    raise ValueError(f"attention impl={impl!r} is not allowed: one of {IMPLEMENTATIONS}")


def _pick_auto(q, k, causal, window, seg) -> str:
    for impl in AUTO_ORDER.get(jax.default_backend(), ()):
        reason = unsupported_reason(impl, q, k, causal=causal, window=window, segment_ids=seg)
        if not reason:
            return impl
        if (impl, reason) not in _logged:
            _logged.add((impl, reason))
            logging.info("attention: %s cannot serve (%s); trying the next impl", impl, reason)
    return "xla"


def _cudnn_unsupported(q, causal, window, segment_ids) -> str:
    platform = jax.default_backend()
    if platform != "gpu":
        return f"backend is {platform}; cudnn needs a GPU"
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"dtype {q.dtype} (cudnn needs bfloat16 or float16)"
    head_dim = q.shape[-1]
    capability = getattr(jax.devices()[0], "compute_capability", "0")
    max_dim = 256 if float(capability) >= 9.0 else 128
    if head_dim > max_dim or head_dim % 8:
        return f"head_dim {head_dim} (cudnn needs a multiple of 8, at most {max_dim})"
    if window and not causal:
        return "sliding window without causal masking"
    if segment_ids is not None and q.shape[1] % 2:
        return f"odd length {q.shape[1]} with a segment mask"
    return ""


def _cudnn(q, k, v, segment_ids, causal, scale, window):
    mask = None
    if segment_ids is not None:
        mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    return jax.nn.dot_product_attention(
        q,
        k,
        v,
        mask=mask,
        scale=scale,
        is_causal=causal,
        implementation="cudnn",
        local_window_size=(window - 1, 0) if window else None,
    )


def _per_shard(kernel, q, k, v, seg):
    """Runs `kernel` per shard under an active mesh: batch/heads split, length whole."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return kernel(q, k, v, seg)
    q_spec = sharding.logical_to_spec(
        PartitionSpec("batch", "length", "heads", "head_dim"), q.shape, mesh
    )
    kv_spec = sharding.logical_to_spec(
        PartitionSpec("batch", "length", "kv_heads", "head_dim"), k.shape, mesh
    )
    manual = set(mesh.manual_axes)  # already split by an enclosing shard_map

    def auto_axes(q_axes, kv_axes):
        # Split q and k/v alike or not at all: a query head must find its kv head in its
        # shard, and a batch row its keys.
        if q_axes != kv_axes or q_axes is None:
            return None
        kept = tuple(
            a for a in ((q_axes,) if isinstance(q_axes, str) else q_axes) if a not in manual
        )
        return None if not kept else kept[0] if len(kept) == 1 else kept

    batch, heads = auto_axes(q_spec[0], kv_spec[0]), auto_axes(q_spec[2], kv_spec[2])
    if batch is None and heads is None:
        return kernel(q, k, v, seg)
    spec = PartitionSpec(batch, None, heads, None)
    if seg is None:
        return jax.shard_map(
            lambda q, k, v: kernel(q, k, v, None),
            in_specs=(spec, spec, spec),
            out_specs=spec,
            check_vma=False,
        )(q, k, v)
    return jax.shard_map(
        kernel,
        in_specs=(spec, spec, spec, PartitionSpec(batch, None)),
        out_specs=spec,
        check_vma=False,
    )(q, k, v, seg)


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
    q_BxLxGxQxK = q_BxLxHxK.reshape(b, length, g, h // g, d)
    logits_BxGxQxLxM = jnp.einsum(
        "blgqk,bmgk->bgqlm", q_BxLxGxQxK, k_BxMxGxK, preferred_element_type=jnp.float32
    )
    logits_BxGxQxLxM *= scale
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
    logits_BxGxQxLxM = jnp.where(
        mask_BxLxM[:, None, None], logits_BxGxQxLxM, jnp.finfo(jnp.float32).min
    )
    probs_BxGxQxLxM = jax.nn.softmax(logits_BxGxQxLxM, axis=-1).astype(v_BxMxGxK.dtype)
    out_BxLxGxQxK = jnp.einsum("bgqlm,bmgk->blgqk", probs_BxGxQxLxM, v_BxMxGxK)
    return out_BxLxGxQxK.reshape(b, length, h, d)


def cached_attention(
    q_BxLxHxK: jax.Array,
    k_cache_BxSxGxK: jax.Array,
    v_cache_BxSxGxK: jax.Array,
    q_positions_BxL: jax.Array,
    *,
    sm_scale: float | None = None,
    window: int = 0,
) -> jax.Array:
    """Attention of new queries over a KV cache (generation: prefill and decode steps).

    Cache slot j holds the key/value of position j of the row. A query at position p sees
    slots j <= p (and p - j < window when `window` > 0); slots beyond p may hold stale or
    padding entries and are masked. Plain XLA with a float32 softmax: a decode step reads
    the cache once, which is memory-bound, so a fused kernel buys little here.
    """
    b, length, h, d = q_BxLxHxK.shape
    s, g = k_cache_BxSxGxK.shape[1], k_cache_BxSxGxK.shape[2]
    scale = d**-0.5 if sm_scale is None else sm_scale
    q_BxLxGxQxK = q_BxLxHxK.reshape(b, length, g, h // g, d)
    slots_S = jnp.arange(s)
    mask_BxLxS = slots_S[None, None, :] <= q_positions_BxL[:, :, None]
    if window:
        mask_BxLxS &= slots_S[None, None, :] > q_positions_BxL[:, :, None] - window
    if length == 1:
        return _decode_attention(q_BxLxGxQxK, k_cache_BxSxGxK, v_cache_BxSxGxK, mask_BxLxS, scale)
    logits_BxGxQxLxS = jnp.einsum(
        "blgqk,bsgk->bgqls", q_BxLxGxQxK, k_cache_BxSxGxK, preferred_element_type=jnp.float32
    )
    logits_BxGxQxLxS *= scale
    logits_BxGxQxLxS = jnp.where(
        mask_BxLxS[:, None, None], logits_BxGxQxLxS, jnp.finfo(jnp.float32).min
    )
    probs_BxGxQxLxS = jax.nn.softmax(logits_BxGxQxLxS, axis=-1).astype(v_cache_BxSxGxK.dtype)
    out_BxLxGxQxK = jnp.einsum("bgqls,bsgk->blgqk", probs_BxGxQxLxS, v_cache_BxSxGxK)
    return out_BxLxGxQxK.reshape(b, length, h, d)


def _decode_attention(q_Bx1xGxQxK, k_BxSxGxK, v_BxSxGxK, mask_Bx1xS, scale):
    """One query per row as multiply-reduces in the cache's [B,S,G,K] layout.

    With one query a dot is a matrix-vector product: as einsums XLA transposes the cache
    for them, while elementwise products and reductions read it where it lies and fuse
    whatever produced it (the layer's slice, the new entries). Products in float32, as the
    dots' preferred_element_type; probabilities rounded to v's dtype as in the einsum path.
    """
    b, _, g, q, d = q_Bx1xGxQxK.shape
    f32 = jnp.float32
    q_Bx1xGxQxK = q_Bx1xGxQxK.astype(f32)
    k_BxSxGx1xK = k_BxSxGxK[:, :, :, None, :].astype(f32)
    logits_BxSxGxQ = jnp.sum(q_Bx1xGxQxK * k_BxSxGx1xK, axis=-1) * scale
    logits_BxSxGxQ = jnp.where(mask_Bx1xS[:, 0, :, None, None], logits_BxSxGxQ, jnp.finfo(f32).min)
    probs_BxSxGxQ = jax.nn.softmax(logits_BxSxGxQ, axis=1).astype(v_BxSxGxK.dtype)
    v_BxSxGx1xK = v_BxSxGxK[:, :, :, None, :].astype(f32)
    out_BxGxQxK = jnp.sum(probs_BxSxGxQ[..., None].astype(f32) * v_BxSxGx1xK, axis=1)
    return out_BxGxQxK.astype(v_BxSxGxK.dtype).reshape(b, 1, g * q, d)
