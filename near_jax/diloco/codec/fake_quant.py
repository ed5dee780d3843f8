"""Simulated compression in jax.numpy: the numerics of `compress`, with no bytes.

In-mesh DiLoCo keeps its replicas inside one XLA program, so pseudo-gradients never become
payloads; to train with exactly the numbers islands would see, it passes them through this
module instead (jittable, vmappable, spec static):

    decoded = roundtrip(delta, spec)                       # == decode(encode(delta, spec)[0])
    decoded, ef = roundtrip_with_feedback(delta, spec, ef) # == decode + residual of encode(.., ef)
    nbytes = payload_bytes(shapes, spec)                   # == encode(delta, spec)[0].nbytes

Leaves may have any shape (scalars included) and dtype; the results are float32 with the
leaves' shapes. Under `jax.vmap` (a leading replica axis) each replica is coded on its own,
like one island's leaf: blocks and top-k never mix replicas.

Exactness
---------
The arithmetic is the codec's, step by step in float32: block absmax, scale = m / levels
(correctly rounded), codes by round-half-to-even of x / scale (int8/int4), by comparing |x|
with 2·scale (int2), or by comparing |x| / m with the fp4 midpoints (ties to the larger
level), decoded = code · scale, residual = v − decoded; bf16 rounds to nearest even in
integer arithmetic on the bits. Tests check
bit-for-bit equality (sign of zero included) with `compress` for every format, several block
sizes, and top-k with error feedback, on CPU, with XLA's CPU code capped at AVX2 and at
AVX-512 (`--xla_cpu_max_isa`; the code differs). Two XLA habits that would break it are avoided:

- XLA rewrites a / broadcast(b) as a · broadcast(1/b), which is up to an ulp off, so codes on
  rounding boundaries would flip; `_div` hides the broadcast behind a select.
- XLA (CPU and GPU) contracts a multiply feeding an add or subtract into a fused multiply-add,
  which rounds once instead of twice (XLA's CPU compiler always allows it, "it increases
  precision"), so the residual v − q·s would not be v − decoded. Decoded values are therefore
  q·s + (s − s): an add of a +0 that no compiler may fold without fast-math (s − s is NaN for
  infinite s), which also turns −0 into +0 as the codec has it. Contracting that add is
  harmless (q·s + 0 rounds once either way), and the subtraction then sees an add, never a
  multiply. A select, as used before, is not enough: with AVX-512, LLVM's X86 backend folds
  v − select(c, q·s, 0) into select(c, v − q·s, v) (its select-with-identity-constant fold,
  for masked ops) and contracts that into a masked vfnmadd231ps, so residuals were off by
  the rounding error of q·s (3 of 129 in a test leaf) on AVX-512 machines only.

Known differences: XLA flushes float32 subnormals (|x| < 2⁻¹²⁶ ≈ 1.2e-38) to zero on CPU and
GPU, numpy does not; so values that tiny, and blocks whose scale or decoded values would be
subnormal (int8/int4: absmax < 127·2⁻¹²⁶ resp. 7·2⁻¹²⁶; fp4: absmax < 2⁻¹²⁰ ≈ 7.5e-37), may
decode differently (bf16 is exact even there: it never does float arithmetic). On TPU, float32
division is not correctly rounded, so codes of values on a rounding boundary may differ by one
step there. Non-finite inputs are not checked (`encode` refuses them); their results are
unspecified. Not tested on GPU.

Top-k matches `encode` exactly, ties included: both take the k largest |v| with ties at the
threshold going to the lowest indices, which is the order `lax.top_k` documents ("if two
elements are equal, the lower-index element appears first"; tested with many ties). It costs
a top_k over each whole leaf (a sort, for large k) and a gather and scatter of k values.
Chunked top-k (`chunk=C`) is one top_k over the [chunks, C] rows of the leaf's full chunks
plus one over the shorter last chunk, then per-row sorts of the k_c chosen indices; the
gather and scatter are the same.

int2 is exact as int8/int4 are: the scale m/3 is a correctly rounded division, the level
comparison |x| ≥ s + s involves no rounding, and decoded = q·s + (s − s).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from near_jax.diloco.codec.compress import _BF16_MAX, _INT_LEVELS, _key_component
from near_jax.diloco.codec.payload import PREFIX, buffer_layout, header_bytes
from near_jax.diloco.codec.spec import CompressionSpec, as_spec, chunk_topk_counts, sent_count
from near_jax.diloco.codec.topk import index_dtype

_BF16_MAX_BITS = _BF16_MAX.view(np.uint32)


def roundtrip(tree: Any, spec: CompressionSpec | str) -> Any:
    """`compress.decode(compress.encode(tree, spec)[0])` in jax.numpy: float32, same shapes.

    With a top-k spec this is one round without error feedback; see roundtrip_with_feedback.
    """
    spec = as_spec(spec)
    return jax.tree.map(lambda x: _decode(jnp.asarray(x, jnp.float32), spec), tree)


def roundtrip_with_feedback(tree: Any, spec: CompressionSpec | str, ef: Any) -> tuple[Any, Any]:
    """(decoded, new error feedback) as `encode(tree, spec, error_feedback=ef)` gives them:
    v = tree + ef, decoded = decode(payload of v), new ef = v − decoded. `ef` is a tree like
    `tree` (float32; start from zeros) or None (zeros)."""
    spec = as_spec(spec)
    v = _plus_feedback(tree, ef)
    decoded = jax.tree.map(lambda x: _decode(x, spec), v)
    return decoded, jax.tree.map(jnp.subtract, v, decoded)


def max_index_gaps(tree: Any, spec: CompressionSpec | str, ef: Any = None) -> Any:
    """Per leaf, the largest delta-coded top-k index `encode(tree, spec, ef)` would write
    (an int32 scalar; 0 without top-k, and 0 for chunked top-k, whose index buffer has a
    fixed size): what sets the index dtype, for `payload_bytes`."""
    spec = as_spec(spec)

    def gap(v: jax.Array) -> jax.Array:
        k = sent_count(v.size, spec)
        if k == v.size or spec.chunk:  # no gaps, or 12-bit positions: no dtype to choose
            return jnp.zeros((), jnp.int32)
        index = _topk_index(v.reshape(-1), k)
        return jnp.max(jnp.diff(index, prepend=-1) - 1).astype(jnp.int32)

    return jax.tree.map(gap, _plus_feedback(tree, ef))


def payload_bytes(shapes: Any, spec: CompressionSpec | str, max_gaps: Any = None) -> int:
    """The exact `compress.encode(tree, spec)[0].nbytes`, from the tree's structure and shapes
    alone (`shapes`: the tree, or ShapeDtypeStructs like it, e.g. from jax.eval_shape).

    Without top-k, and with chunked top-k (12-bit positions, ⌈3k/2⌉ bytes; `max_gaps` is
    ignored), the size depends on nothing else. With top-k each leaf's index dtype is the
    narrowest that holds its largest delta-coded index, which depends on the data: pass
    `max_gaps` (a tree like `shapes` of ints, e.g. jax.device_get(max_index_gaps(...)); one
    replica's) for the exact size; without it each leaf gets the widest dtype its gaps could
    need (they are at most n − k), an upper bound that is exact when n − k < 256.
    """
    spec = as_spec(spec)
    path_leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    if max_gaps is None:
        gaps = [None] * len(path_leaves)
    else:
        gaps, gaps_treedef = jax.tree_util.tree_flatten(max_gaps)
        if gaps_treedef != treedef:
            raise ValueError(f"max_gaps has structure {gaps_treedef}, the tree has {treedef}")
    leaves, data = [], 0
    for (key_path, leaf), gap in zip(path_leaves, gaps, strict=True):
        shape = tuple(int(d) for d in np.shape(leaf))
        n = math.prod(shape)
        buffers = []
        for name, dtypes, count in buffer_layout(spec, n):
            if len(dtypes) == 1:
                dtype = dtypes[0]
            else:  # per-leaf top-k's index: the widest the gaps could need, or what they need
                dtype = index_dtype(n - count if gap is None else gap)
            buffers.append((name, dtype, count))
            data += count * np.dtype(dtype).itemsize
        leaves.append((tuple(_key_component(k) for k in key_path), shape, buffers))
    return PREFIX.size + len(header_bytes(spec, leaves)) + data


# ----------------------------------------------------------------------------------- leaves


def _plus_feedback(tree: Any, ef: Any) -> Any:
    """tree + ef in float32, leaf by leaf (no addition for None: x + 0 would turn −0 into +0)."""
    tree = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)
    if ef is None:
        return tree
    treedef, ef_treedef = jax.tree.structure(tree), jax.tree.structure(ef)
    if ef_treedef != treedef:
        raise ValueError(f"error feedback has structure {ef_treedef}, the tree has {treedef}")

    def add(x: jax.Array, e: Any) -> jax.Array:
        if jnp.shape(e) != x.shape:
            raise ValueError(f"error feedback of shape {jnp.shape(e)} for a leaf of {x.shape}")
        return x + jnp.asarray(e, jnp.float32)

    return jax.tree.map(add, tree, ef)


def _decode(v: jax.Array, spec: CompressionSpec) -> jax.Array:
    """What `encode` then `decode` make of one float32 leaf v."""
    n = v.size
    k = sent_count(n, spec)
    if k == n:  # no top-k, everything sent (top-k keeps index order), or an empty leaf
        return _dense(v, spec)
    flat = v.reshape(-1)
    index = _chunk_topk_index(flat, spec) if spec.chunk else _topk_index(flat, k)
    sent = _dense(flat[index], spec)  # the kept values, in index order, form the blocks
    out = (
        jnp.zeros(n, jnp.float32).at[index].set(sent, indices_are_sorted=True, unique_indices=True)
    )
    return out.reshape(v.shape)


def _topk_index(flat: jax.Array, k: int) -> jax.Array:
    """Sorted indices of the k largest |x|, ties to the lowest indices: lax.top_k's documented
    order ("if two elements are equal, the lower-index element appears first")."""
    return jnp.sort(jax.lax.top_k(jnp.abs(flat), k)[1])


def _chunk_topk_index(flat: jax.Array, spec: CompressionSpec) -> jax.Array:
    """Sorted global indices chunked top-k sends: per chunk of spec.chunk values, the k_c
    largest |x|, ties to the lowest indices. The full chunks are rows of one [chunks, C]
    top_k (per-row sorts of k_c indices, no sort over the leaf); the shorter last chunk is a
    top_k of its own."""
    full, k_full, tail, k_tail = chunk_topk_counts(flat.size, spec.chunk, spec.topk)
    head = full * spec.chunk
    rows_RC = jnp.abs(flat[:head]).reshape(full, spec.chunk)
    # int32 is enough: n ≤ 2³¹ (jnp indices are int32 without x64 anyway).
    starts_R1 = (jnp.arange(full, dtype=jnp.int32) * spec.chunk)[:, None]
    parts = [(jnp.sort(jax.lax.top_k(rows_RC, k_full)[1], axis=-1) + starts_R1).reshape(-1)]
    if tail:
        parts.append(head + _topk_index(flat[head:], k_tail))
    return jnp.concatenate(parts)


# ---------------------------------------------------------------------------------- formats


def _dense(x: jax.Array, spec: CompressionSpec) -> jax.Array:
    """Every value of x coded in spec.format and decoded (blocks in C order)."""
    if spec.format == "fp32" or x.size == 0:
        return x
    if spec.format == "bf16":
        return _bf16(x)
    blocks = _to_blocks(x, spec.block_size)
    absmax = jnp.max(jnp.abs(blocks), axis=-1, keepdims=True)
    if spec.format == "fp4":
        ratio = _div(jnp.abs(blocks), jnp.where(absmax > 0, absmax, 1))
        c = _fp4_exponent(ratio)
        level = jax.lax.bitcast_convert_type((c + 120) << 23, jnp.float32)  # 2^(c−7)
        magnitude = jnp.where(c > 0, level * absmax, 0)  # exact: a power of two times m
        decoded = jnp.where((blocks < 0) & (c > 0), -magnitude, magnitude)  # +0, never −0
    elif spec.format == "int2":
        scale = _div(absmax, jnp.float32(_INT_LEVELS["int2"]))
        # |q| = 3 where |x| ≥ 2s (exact: no rounding to disagree on), sign of x with ±0 → +.
        magnitude = jnp.where(jnp.abs(blocks) >= scale + scale, 3.0, 1.0)
        q = jnp.where(blocks < 0, -magnitude, magnitude)
        decoded = q * scale + (scale - scale)  # as below: see Exactness
    else:
        levels = _INT_LEVELS[spec.format]
        scale = _div(absmax, jnp.float32(levels))
        q = jnp.clip(jnp.rint(_div(blocks, jnp.where(scale > 0, scale, 1))), -levels, levels)
        # q·s + (+0): +0 for q = ±0 as in the codec, and consumers (the residual v − decoded)
        # see an add they cannot contract with into an FMA; see Exactness.
        decoded = q * scale + (scale - scale)
    return _from_blocks(decoded, x.shape)


def _fp4_exponent(ratio: jax.Array) -> jax.Array:
    """The fp4 field c ∈ 0..7 of r = |x| / m ∈ [0, 1] as `compress` finds it: the number of
    midpoints between levels (2⁻⁷, then 1.5·2^e for e = −6..−1) at or below r. With u the
    exponent of r and h its first mantissa bit: c = 0 below 2⁻⁷, 1 in [2⁻⁷, 2⁻⁶), u + 7 + h
    in [2⁻⁶, 1) (h: past the midpoint of the octave), and 7 at 1. Integer ops on the bits."""
    bits = jax.lax.bitcast_convert_type(ratio, jnp.int32)
    u, h = (bits >> 23) - 127, (bits >> 22) & 1
    return jnp.where(u == -7, 1, jnp.clip(u + 7 + h, 0, 7))


def _to_blocks(x: jax.Array, block: int) -> jax.Array:
    """x as [..., B] blocks of consecutive (C-order) values, zero-padded at the end.

    When the last axis is a multiple of B, the blocks lie within rows and x keeps its leading
    axes (and their sharding); otherwise x is flattened and padded (zeros: absmax unchanged).
    """
    if x.ndim and x.shape[-1] % block == 0:
        return x.reshape(*x.shape[:-1], x.shape[-1] // block, block)
    flat = x.reshape(-1)
    return jnp.pad(flat, (0, -flat.size % block)).reshape(-1, block)


def _from_blocks(blocks: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """The inverse of _to_blocks: padding dropped, x's shape restored."""
    if blocks.size == math.prod(shape):
        return blocks.reshape(shape)
    return blocks.reshape(-1)[: math.prod(shape)].reshape(shape)


def _div(a: jax.Array, b: jax.Array) -> jax.Array:
    """a / b correctly rounded, like numpy's. XLA's algebraic simplifier rewrites a / b with b
    a broadcast as a · (1/b), up to an ulp off; selecting b where a == a (always, a is finite)
    makes b an array XLA cannot see through."""
    return a / jnp.where(a == a, b, 1)


def _bf16(x: jax.Array) -> jax.Array:
    """x clipped to ±bf16 max and rounded to bfloat16 (nearest even), as float32; done on the
    bits, so subnormals round as in ml_dtypes and no XLA pass can fold the round trip away."""
    u32 = lambda c: jnp.uint32(c)  # noqa: E731 (Python ints above 2³¹ do not cast implicitly)
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    sign, magnitude = bits & u32(0x80000000), jnp.minimum(bits & u32(0x7FFFFFFF), _BF16_MAX_BITS)
    magnitude = (magnitude + u32(0x7FFF) + ((magnitude >> 16) & u32(1))) & u32(0xFFFF0000)
    return jax.lax.bitcast_convert_type(sign | magnitude, jnp.float32)
