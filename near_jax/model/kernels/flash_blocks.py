"""Block-level pieces shared by the TPU and GPU flash-attention kernels.

Both lowerings walk the same tiling of the [queries x keys] score matrix: `Tiling` says which
key blocks a query block needs (and the reverse, for the dK/dV pass), so blocks that causal,
sliding-window or padding masks hide entirely are never visited. The `*_step` functions are
the arithmetic on one (query block, key block) pair; the kernels only differ in how they move
blocks and where they keep the running state (VMEM scratch on TPU, loop carries on GPU).

Conventions: scores `s = scale * q @ k^T` in float32. A masked score becomes NEG_INF (finite,
so `exp` of differences never makes NaN) and its probability is forced to exactly 0. A query
row that sees no key at all (only padding rows can) gets output 0 and log-sum-exp EMPTY_LSE,
which turns every recomputed probability of that row into 0 in the backward pass.
"""

from __future__ import annotations

import dataclasses
from types import ModuleType

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

NEG_INF = -1e30
EMPTY_LSE = 1e30

_NN = (((1,), (0,)), ((), ()))  # [m, k] @ [k, n]
_NT = (((1,), (1,)), ((), ()))  # [m, k] @ [n, k]^T


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Static block structure of one attention call (hashable: a jit/custom_vjp static).

    Attributes:
      block_q, block_kv: rows of a query block and a key/value block.
      len_q, len_kv: padded lengths (multiples of the blocks) the kernels see.
      valid_q, valid_kv: the caller's lengths; keys at or past `valid_kv` are masked.
      causal: query i sees key j only if j <= i.
      window: if > 0, query i sees key j only if |i - j| < window.
      segments: whether segment ids take part in the mask.
    """

    block_q: int
    block_kv: int
    len_q: int
    len_kv: int
    valid_q: int
    valid_kv: int
    causal: bool
    window: int
    segments: bool

    @property
    def num_q(self) -> int:
        return self.len_q // self.block_q

    @property
    def num_kv(self) -> int:
        return self.len_kv // self.block_kv

    def kv_range(self, i, xp: ModuleType = jnp):
        """First and last key block that query block `i` needs (last < first: none).

        Works on Python/numpy ints (`xp=np`, for static grid sizes) and on traced int32
        (`xp=jnp`, in index maps and kernels); only non-negative numbers are divided.
        """
        bq, bk = self.block_q, self.block_kv
        first_q, last_q = i * bq, (i + 1) * bq - 1
        hi = _cdiv(self.valid_kv, bk) - 1 + 0 * i
        if self.causal:
            hi = xp.minimum(hi, _div(last_q, bk, xp))
        elif self.window:
            hi = xp.minimum(hi, _div(last_q + self.window - 1, bk, xp))
        lo = 0 * i
        if self.window:
            lo = _div(xp.maximum(first_q - self.window + 1, 0), bk, xp)
        return lo, hi

    def q_range(self, j, xp: ModuleType = jnp):
        """First and last query block that key block `j` is seen by (last < first: none)."""
        bq, bk = self.block_q, self.block_kv
        first_k, last_k = j * bk, (j + 1) * bk - 1
        lo = _div(first_k, bq, xp) if self.causal else 0 * j
        if self.window and not self.causal:
            lo = _div(xp.maximum(first_k - self.window + 1, 0), bq, xp)
        hi = _cdiv(self.valid_q, bq) - 1 + 0 * j
        if self.window:
            hi = xp.minimum(hi, _div(last_k + self.window - 1, bq, xp))
        hi = xp.where(first_k < self.valid_kv, hi, -1)  # padding-only key blocks: no work
        return lo, hi

    @property
    def kv_steps(self) -> int:
        """Key blocks visited per query block: the longest range over all query blocks."""
        lo, hi = self.kv_range(np.arange(self.num_q), np)
        return max(1, int(np.max(hi - lo + 1)))

    @property
    def q_steps(self) -> int:
        """Query blocks visited per key block: the longest range over all key blocks."""
        lo, hi = self.q_range(np.arange(self.num_kv), np)
        return max(1, int(np.max(hi - lo + 1)))

    def visited_fraction(self) -> float:
        """Fraction of all (query block, key block) pairs the forward pass computes."""
        lo, hi = self.kv_range(np.arange(self.num_q), np)
        return float(np.maximum(hi - lo + 1, 0).sum()) / (self.num_q * self.num_kv)

    def needs_mask(self) -> bool:
        """Whether any element-level mask applies (else blocks are used whole)."""
        return self.causal or bool(self.window) or self.segments or self.valid_kv < self.len_kv

    def mask(self, q_pos, k_pos, q_seg=None, k_seg=None):
        """Boolean visibility of keys `k_pos` to queries `q_pos` (broadcastable int32 arrays).

        None when nothing is masked, so unmasked calls skip the selects entirely.
        """
        if not self.needs_mask():
            return None
        keep = None
        if self.causal:
            keep = _and(keep, q_pos >= k_pos)
        if self.window:
            keep = _and(keep, (q_pos - k_pos < self.window) & (k_pos - q_pos < self.window))
        if self.valid_kv < self.len_kv:
            keep = _and(keep, k_pos < self.valid_kv)
        if self.segments:
            keep = _and(keep, q_seg == k_seg)
        return keep


def _and(a, b):
    return b if a is None else a & b


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _div(a, b: int, xp: ModuleType):
    # Integer division of a non-negative value; lax.div lowers to one scalar op in kernels.
    return a // b if xp is np else lax.div(jnp.asarray(a, jnp.int32), jnp.int32(b))


def positions(start, shape: tuple[int, int], axis: int) -> jax.Array:
    """int32 positions `start + iota` laid along `axis` of a 2-D block of `shape`."""
    return start + lax.broadcasted_iota(jnp.int32, shape, axis)


def alias_poisoned_outputs(out_shapes, out_specs, args, in_specs, aliases) -> None:
    """Test hook: appends a NaN-filled input per output, aliased to it (in place).

    Every output then starts as NaN, so an element that a kernel never writes stays NaN.
    """
    for n, (shape, spec) in enumerate(zip(out_shapes, out_specs, strict=True)):
        aliases[len(args)] = n
        args.append(jnp.full(shape.shape, jnp.nan, shape.dtype))
        in_specs.append(spec)


def precision_for(dtype) -> lax.Precision | None:
    """Full-precision matmuls for float32 inputs; the native MXU/tensor-core path otherwise."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def dot_nn(a, b, precision):
    return lax.dot_general(a, b, _NN, precision=precision, preferred_element_type=jnp.float32)


def dot_nt(a, b, precision):
    return lax.dot_general(a, b, _NT, precision=precision, preferred_element_type=jnp.float32)


def forward_step(q, k, v, m, denom, acc, keep, scale, precision):
    """One online-softmax update of a query block's running max, sum and output.

    q [bq, K]; k, v [bk, K]; m (row max), denom (row sum of exp) [bq, 1] float32;
    acc [bq, K] float32; keep [bq, bk] or None.
    """
    s = dot_nt(q, k, precision) * scale
    if keep is not None:
        s = jnp.where(keep, s, NEG_INF)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    p = jnp.exp(s - m_new)
    if keep is not None:
        p = jnp.where(keep, p, 0.0)
    alpha = jnp.exp(m - m_new)
    denom_new = alpha * denom + jnp.sum(p, axis=1, keepdims=True)
    acc_new = alpha * acc + dot_nn(p.astype(v.dtype), v, precision)
    return m_new, denom_new, acc_new


def forward_finish(m, denom, acc):
    """Normalized output [bq, K] and log-sum-exp [bq, 1] of a finished query block."""
    empty = denom == 0.0
    denom = jnp.where(empty, 1.0, denom)
    lse = jnp.where(empty, EMPTY_LSE, m + jnp.log(denom))
    return acc / denom, lse


def dq_step(q, k, v, do, lse, delta, keep, scale, precision):
    """Contribution of one key block to dS @ K for a query block (dq = scale * sum of these).

    lse, delta: [bq, 1]; keep: [bq, bk] or None.
    """
    s = dot_nt(q, k, precision) * scale
    p = jnp.exp(s - lse)
    if keep is not None:
        p = jnp.where(keep, p, 0.0)
    dp = dot_nt(do, v, precision)
    ds = p * (dp - delta)
    return dot_nn(ds.astype(k.dtype), k, precision)


def dkv_step(q, k, v, do, lse_row, delta_row, keep_t, scale, precision):
    """Contributions of one query block to (dS^T @ Q, P^T @ dO) for a key block.

    Computed in key-major orientation ([bk, bq] scores) so every matmul is a plain or
    right-transposed one and the per-query statistics are rows: lse_row, delta_row [1, bq];
    keep_t [bk, bq] or None. dk = scale * sum of the first, dv = sum of the second.
    """
    s_t = dot_nt(k, q, precision) * scale
    p_t = jnp.exp(s_t - lse_row)
    if keep_t is not None:
        p_t = jnp.where(keep_t, p_t, 0.0)
    dv = dot_nn(p_t.astype(do.dtype), do, precision)
    dp_t = dot_nt(v, do, precision)
    ds_t = p_t * (dp_t - delta_row)
    dk = dot_nn(ds_t.astype(q.dtype), q, precision)
    return dk, dv
