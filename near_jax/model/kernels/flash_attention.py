"""Flash attention in Pallas: public entry point, custom VJP, block sizes, padding, interpret.

    out_BxLxHxK = flash_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL,
                                  causal=True, sm_scale=None, window=0)

The forward pass keeps a running max and sum per query row (online softmax, float32) and
saves only the output and the per-row log-sum-exp; the backward pass recomputes the
probabilities block by block in a dQ kernel and a dK/dV kernel. Inputs are float32, bfloat16
or float16; matmuls accumulate in float32 (float32 inputs use full-precision matmuls).

Backends: `tpu` (Mosaic; `flash_tpu.py`) and `gpu` (Triton; `flash_gpu.py`, which says why
not Mosaic GPU). The default is the running platform's; on CPU the TPU kernels run in
Pallas interpret mode automatically (`interpret=None`), so `model.attention=pallas` works in
CPU tests. `interpret` also takes `pltpu.InterpretParams()` for TPU interpret mode, which
simulates VMEM/DMA and raises on out-of-bounds block reads.

Lengths that are not a multiple of the block are padded: padded keys are masked out, padded
query rows are computed (they see no key or only real ones) and sliced off, and their zero
cotangents add nothing to dK/dV. Blocks are shrunk to short sequences; explicit block sizes
must be multiples of 128 on TPU (Mosaic tiling) and powers of two >= 16 on GPU (Triton), else
ValueError. On GPU head_dim is zero-padded to a power of two.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from near_jax.model.kernels import flash_gpu, flash_tpu
from near_jax.model.kernels.flash_blocks import Tiling

# (block_q, block_kv) defaults: (forward, backward) per backend. TPU: 512-row blocks keep
# the MXU busy and fit scoped VMEM with head_dim <= 256. GPU: FlashAttention-2's usual
# Triton tiles (128 x 64 forward, 64 x 64 backward). Not tuned on hardware yet.
DEFAULT_BLOCKS: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {
    "tpu": ((512, 512), (512, 512)),
    "gpu": ((128, 64), (64, 64)),
}
DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_TPU_UNIT = 128  # Mosaic: the lane dim of row blocks (log-sum-exp, key segment ids)
_GPU_MIN = 16  # Triton: smallest tile of a tensor-core dot


@dataclasses.dataclass(frozen=True)
class _Config:
    """Everything static about one call (a custom_vjp non-differentiable argument)."""

    forward: Tiling
    backward: Tiling
    scale: float
    backend: str
    interpret: Any
    poison: bool
    length: int
    head_dim: int
    head_dim_padded: int


def platform_backend() -> str:
    """The kernel family for the running platform: `gpu` on CUDA/ROCm, else `tpu`."""
    return "gpu" if jax.default_backend() in ("gpu", "cuda", "rocm") else "tpu"


def unsupported(q_BxLxHxK: jax.Array, k_BxMxGxK: jax.Array) -> str:
    """Why flash_attention cannot serve these inputs ("" if it can)."""
    if q_BxLxHxK.dtype not in DTYPES:
        return f"dtype {q_BxLxHxK.dtype} (needs float32, bfloat16 or float16)"
    if k_BxMxGxK.shape[1] != q_BxLxHxK.shape[1]:
        return (
            f"key length {k_BxMxGxK.shape[1]} != query length {q_BxLxHxK.shape[1]} "
            "(self-attention only)"
        )
    return ""


def flash_attention(
    q_BxLxHxK: jax.Array,
    k_BxLxGxK: jax.Array,
    v_BxLxGxK: jax.Array,
    segment_ids_BxL: jax.Array | None = None,
    *,
    causal: bool = True,
    sm_scale: float | None = None,
    window: int = 0,
    block_q: int = 0,
    block_kv: int = 0,
    backend: str | None = None,
    interpret: Any = None,
    poison_outputs: bool = False,
) -> jax.Array:
    """Flash attention over [batch, length, heads, head_dim] with GQA, masks and padding.

    Args:
      q_BxLxHxK: queries; H a multiple of the kv head count G.
      k_BxLxGxK, v_BxLxGxK: keys and values of the same length (self-attention).
      segment_ids_BxL: int document ids; queries see only keys of their document.
      causal: mask keys after the query position.
      sm_scale: softmax scale; default 1/sqrt(head_dim).
      window: if > 0, a query sees only keys with |query pos - key pos| < window.
      block_q, block_kv: block sizes for every pass (0: the backend's defaults).
      backend: `tpu` or `gpu` kernels; None: the running platform's.
      interpret: Pallas interpret mode: True, False, `pltpu.InterpretParams(...)`, or None
        (on when running on CPU).
      poison_outputs: test hook: every kernel output array starts as NaN, so in interpret
        mode an element no kernel writes shows up as NaN (TPU interpret mode stages outputs
        through VMEM as hardware does: only a never-written first block stays NaN there).

    Returns:
      Attention output, same shape and dtype as q.
    """
    q, k, v = q_BxLxHxK, k_BxLxGxK, v_BxLxGxK
    reason = unsupported(q, k)
    if not reason and (q.dtype != k.dtype or q.dtype != v.dtype):
        reason = f"dtypes differ: q {q.dtype}, k {k.dtype}, v {v.dtype}"
    if not reason and (q.shape[2] % k.shape[2] or k.shape != v.shape):
        reason = f"shapes q {q.shape}, k {k.shape}, v {v.shape} are not grouped-query heads"
    if reason:
        raise ValueError(f"flash_attention cannot serve this call: {reason}")
    backend = backend or platform_backend()
    if backend not in DEFAULT_BLOCKS:
        raise ValueError(f"flash_attention backend={backend!r}: one of {tuple(DEFAULT_BLOCKS)}")
    if window < 0:
        raise ValueError(f"flash_attention window={window} must be >= 0")
    head_dim = q.shape[3]
    cfg = _config(
        backend=backend,
        length=q.shape[1],
        head_dim=head_dim,
        causal=causal,
        window=window,
        segments=segment_ids_BxL is not None,
        block_q=block_q,
        block_kv=block_kv,
        scale=float(head_dim**-0.5 if sm_scale is None else sm_scale),
        interpret=jax.default_backend() == "cpu" if interpret is None else interpret,
        poison=poison_outputs,
    )
    seg = None if segment_ids_BxL is None else segment_ids_BxL.astype(jnp.int32)
    return _flash(q, k, v, seg, cfg)


def _fit_block(backend: str, block: int, length: int, explicit: bool) -> int:
    if backend == "tpu":
        if explicit and block % _TPU_UNIT:
            raise ValueError(
                f"flash_attention on TPU: block size {block} must be a multiple of 128"
            )
        return min(block, _round_up(length, _TPU_UNIT))
    if explicit and (block < _GPU_MIN or block & (block - 1)):
        raise ValueError(f"flash_attention on GPU: block size {block} must be a power of two >= 16")
    return min(block, max(_GPU_MIN, _next_pow2(length)))


def _config(
    *,
    backend,
    length,
    head_dim,
    causal,
    window,
    segments,
    block_q,
    block_kv,
    scale=1.0,
    interpret=False,
    poison=False,
) -> _Config:
    (fq, fk), (bq, bk) = DEFAULT_BLOCKS[backend]
    fwd = (
        _fit_block(backend, block_q or fq, length, bool(block_q)),
        _fit_block(backend, block_kv or fk, length, bool(block_kv)),
    )
    bwd = (
        _fit_block(backend, block_q or bq, length, bool(block_q)),
        _fit_block(backend, block_kv or bk, length, bool(block_kv)),
    )
    padded = _round_up(length, math.lcm(*fwd, *bwd))

    def tiling(blocks):
        return Tiling(
            block_q=blocks[0],
            block_kv=blocks[1],
            len_q=padded,
            len_kv=padded,
            valid_q=length,
            valid_kv=length,
            causal=causal,
            window=window,
            segments=segments,
        )

    head_dim_padded = head_dim if backend == "tpu" else max(_GPU_MIN, _next_pow2(head_dim))
    return _Config(
        tiling(fwd),
        tiling(bwd),
        scale,
        backend,
        interpret,
        poison,
        length,
        head_dim,
        head_dim_padded,
    )


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _next_pow2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


# Model layout <-> kernel layout. TPU kernels are head-major; GPU kernels use the model's.


def _to_kernel(x_BxLxHxK: jax.Array, cfg: _Config) -> jax.Array:
    """q (or k, v: G heads in place of H) padded, and head-major for the TPU kernels."""
    pad_l = cfg.forward.len_q - x_BxLxHxK.shape[1]
    pad_k = cfg.head_dim_padded - x_BxLxHxK.shape[3]
    if pad_l or pad_k:
        x_BxLxHxK = jnp.pad(x_BxLxHxK, ((0, 0), (0, pad_l), (0, 0), (0, pad_k)))
    return x_BxLxHxK.transpose(0, 2, 1, 3) if cfg.backend == "tpu" else x_BxLxHxK


def _from_kernel(x: jax.Array, cfg: _Config) -> jax.Array:
    x_BxLxHxK = x.transpose(0, 2, 1, 3) if cfg.backend == "tpu" else x
    return x_BxLxHxK[:, : cfg.length, :, : cfg.head_dim]


def _segments(seg_BxL: jax.Array | None, cfg: _Config) -> tuple:
    if seg_BxL is None:
        return (None, None) if cfg.backend == "tpu" else (None,)
    pad = cfg.forward.len_q - seg_BxL.shape[1]
    if pad:
        seg_BxL = jnp.pad(seg_BxL, ((0, 0), (0, pad)))
    if cfg.backend == "tpu":
        return seg_BxL[:, :, None], seg_BxL[:, None, :]  # column and row views
    return (seg_BxL,)


def _run_forward(q, k, v, seg, cfg: _Config):
    q_, k_, v_ = (_to_kernel(x, cfg) for x in (q, k, v))
    segs = _segments(seg, cfg)
    kernels = flash_tpu if cfg.backend == "tpu" else flash_gpu
    o_, lse = kernels.forward(
        q_,
        k_,
        v_,
        *segs,
        t=cfg.forward,
        scale=cfg.scale,
        interpret=cfg.interpret,
        poison=cfg.poison,
    )
    return _from_kernel(o_, cfg), (q_, k_, v_, segs, o_, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, seg, cfg: _Config):
    return _run_forward(q, k, v, seg, cfg)[0]


def _flash_fwd(q, k, v, seg, cfg: _Config):
    return _run_forward(q, k, v, seg, cfg)


def _flash_bwd(cfg: _Config, residuals, dout_BxLxHxK):
    q_, k_, v_, segs, o_, lse = residuals
    do_ = _to_kernel(dout_BxLxHxK.astype(q_.dtype), cfg)
    delta = jnp.sum(o_.astype(jnp.float32) * do_.astype(jnp.float32), axis=-1)
    if cfg.backend == "tpu":
        kernels, delta = flash_tpu, delta[:, :, None, :]  # [B, H, 1, L]
    else:
        kernels, delta = flash_gpu, delta.transpose(0, 2, 1)  # [B, H, L]
    dq_, dk_, dv_ = kernels.backward(
        q_,
        k_,
        v_,
        *segs,
        lse,
        delta,
        do_,
        t=cfg.backward,
        scale=cfg.scale,
        interpret=cfg.interpret,
        poison=cfg.poison,
    )
    return _from_kernel(dq_, cfg), _from_kernel(dk_, cfg), _from_kernel(dv_, cfg), None


_flash.defvjp(_flash_fwd, _flash_bwd)
