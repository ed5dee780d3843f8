"""Pseudo-gradient compression for DiLoCo across islands: formats, top-k, error feedback, payloads.

Every H inner steps an island sends its pseudo-gradient Δ = θ_global − θ_island (a pytree with
the params' structure) through an object store; an aggregator decodes the payloads, averages
them in fp32 and applies the outer optimizer. This module is the codec in between:

    payload, ef = encode(delta, "int8", error_feedback=ef)    # ef: carry it to the next round
    blob = payload.to_bytes()                                 # len(blob) == payload.nbytes
    delta_hat = decode(Payload.from_bytes(blob), like=params) # tree of float32 numpy arrays

Everything runs in numpy on the host and is deterministic (no stochastic rounding): the same
input gives the same bytes.

Formats
-------
A leaf is cast to float32, flattened in C order and cut into blocks of B values (`block=B`,
default 128; the last block may be shorter). The block formats keep one float32 scale per
block derived from the block's absmax m, so an outlier only coarsens its own block.

    format  stored per value                        bytes/value       vs fp32  error |x̂ − x|
    fp32    float32                                 4                 1×       0
    bf16    bfloat16, round to nearest even         2                 2×       ≤ 2⁻⁸·|x|
    int8    q ∈ [−127, 127], x̂ = q·(m/127)          1 + 4/B = 1.031   3.88×    ≤ m/254
    int4    q ∈ [−7, 7], x̂ = q·(m/7), 2 per byte    1/2 + 4/B = 0.531 7.53×    ≤ m/14
    fp4     E3M0 x̂ = ±m·2^(c−7), c=1..7; c=0 → 0    1/2 + 4/B = 0.531 7.53×    ≤ max(|x|/3, m/128)
    int2    q ∈ {±1, ±3}, x̂ = q·(m/3), 4 per byte   1/4 + 4/B = 0.281 14.2×    ≤ m/3

(bytes/value and ratios at B = 128; bf16's bound holds for normal numbers, |x| ≥ 2⁻¹²⁶. The
bounds are exact up to float32 rounding of the scale, a relative 2⁻²³ of m.) Each payload
also carries a JSON header: ~40 bytes plus ~80–130 per leaf (more for long key paths).

fp4 is E3M0: a sign bit and a 3-bit exponent field c, no mantissa; c = 0 encodes zero (the
"subnormal" of a mantissa-less format), so the magnitudes are m·{0, 2⁻⁶, 2⁻⁵, …, 2⁻¹, 1}.
Rounding is to the nearest level in linear space (ties go to the larger level): that is the
least-error choice for fixed levels, with relative error ≤ 1/3 (reached at the midpoint
1.5·2ᵏ), whereas rounding in log space (threshold √2·2ᵏ) allows √2 − 1 ≈ 0.41. Below the
smallest level: |x| < m/128 becomes 0 and m/128 ≤ |x| < m/64 becomes ±m/64, both within
m/128. Error feedback (below) keeps what fp4 zeroes.

int2 has four levels ±m/3, ±m and no zero. With s = m/3 (float32): |q| = 3 where |x| ≥ 2s
(a tie, |x| = 2s exactly, goes to the larger magnitude, as in fp4), else 1; q < 0 iff x < 0,
so +0 and −0 both give +1 (decoded +s: error s, within the bound; error feedback carries
it). 2s is exact, so the comparison involves no rounding and no division. Each byte holds
four codes c = (q + 3)/2 ∈ 0..3, the first value in the lowest two bits; all four codes are
levels, so only the padding of the last byte (0) can be malformed. An all-zero block has
s = 0 and decodes to +0s (its codes are 3: |x| ≥ 2·0). Top-k's unsent entries are not coded
at all and decode to 0.

Scales are float32 (4/B bytes per value), not float16: a per-value step m/127 of a pseudo-
gradient (m ~ 1e-4…1e-2) lies in fp16's subnormal range (< 6.1e-5), where fp16 keeps few
significant bits, and flushes to zero below 6e-8 — small-update blocks (norm scales, late
training) would lose their scale outright. float32 keeps the bounds above for every block and
costs 2/B bytes per value more: int8 3.88× instead of 3.94×, int4/fp4 7.53× instead of 7.76×,
int2 14.2× instead of 15.1×.

Top-k and error feedback
------------------------
With `topk=p`, each leaf of n values sends only its k = clamp(round(p·n), 1, n) entries of
largest |v| (ties: lower index first), v = Δ + error feedback. The k values are coded by the
value format (blocks of B *kept* values, in index order); the indices are sorted and delta-
coded (gap − 1) in the narrowest of uint8/16/32/64 that fits, 1–2 bytes each for p ≳ 1%.
Unsent entries decode to 0. E.g. int8+topk=0.1 at B=128 costs ≈ 0.1·(1 + 4/128 + 1 or 2).

Chunked top-k (`chunk=C`, 2 ≤ C ≤ 4096, e.g. `int2:chunk=4096+topk=0.01`) cuts the flat leaf
into chunks of C values (the last may be shorter) and sends the k_c = clamp(round(p·len_c), 1,
len_c) largest |v| of each (same tie rule), chunk by chunk in index order; the value format
codes that sequence exactly as above (blocks of B kept values, which may straddle chunks).
Each index is its 12-bit in-chunk position, two per 3 bytes: 1.5 bytes per sent value, and
sizes follow from shapes alone (no data-dependent dtype). int2 at C = 4096, B = 128 sends
1/4 + 4/128 + 3/2 = 1.781 bytes per kept value: topk=0.01 (41 per chunk) 0.0178 bytes/param,
224× below fp32 (218× with the ~500-byte header of a 4-leaf 2²⁰-param tree); topk=0.03 (123
per chunk) 0.0535 bytes/param, 75× (74×). Per-leaf int2+topk needs 2-byte gaps there: 172×,
58×. The selection and index coding live in `near_jax.diloco.codec.topk`.

`encode` always returns the residual r = v − decode(payload): the entries top-k did not send
plus the quantization error of those it did. Passing it back as `error_feedback` next round
means nothing is dropped, only delayed: after R rounds Σ decoded = Σ Δ − r_R with r bounded.

The spec
--------
`CompressionSpec`, the format names and `topk_count` live in the dependency-free
`near_jax.diloco.codec.spec` (config validates against it) and are re-exported here.

Payloads
--------
`encode` returns a `Payload` (one `LeafPayload` of numpy buffers per leaf); its wire format,
`to_bytes`, and the validating `Payload.from_bytes` for untrusted peers (raising `PayloadError`)
live in `near_jax.diloco.codec.payload`, re-exported here. `near_jax.diloco.codec.fake_quant`
simulates this codec in jax.numpy, bit-exactly, for replicas inside one XLA program.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import ml_dtypes
import numpy as np

from near_jax.diloco.codec.payload import (
    DEFAULT_MAX_ELEMENTS,
    MAGIC,
    MAX_HEADER_BYTES,
    MAX_KEY_CHARS,
    MAX_LEAVES,
    MAX_NDIM,
    MAX_PATH_DEPTH,
    PREFIX,
    VERSION,
    LeafPayload,
    Payload,
    PayloadError,
    buffer_layout,
    tree_from_paths,
)
from near_jax.diloco.codec.spec import (
    BLOCK_FORMATS,
    DEFAULT_BLOCK,
    FORMATS,
    MAX_BLOCK,
    NIBBLE_FORMATS,
    SPEC_GRAMMAR,
    CompressionSpec,
    as_spec,
    bytes_per_value,
    sent_count,
    topk_count,
)
from near_jax.diloco.codec.topk import (
    chunk_positions,
    chunk_starts,
    delta_decode,
    delta_encode,
    pack_index12,
    select,
    unpack_index12,
)

__all__ = [
    "BLOCK_FORMATS",
    "DEFAULT_BLOCK",
    "DEFAULT_MAX_ELEMENTS",
    "FORMATS",
    "FP4_LEVELS",
    "MAGIC",
    "MAX_BLOCK",
    "MAX_HEADER_BYTES",
    "MAX_KEY_CHARS",
    "MAX_LEAVES",
    "MAX_NDIM",
    "MAX_PATH_DEPTH",
    "NIBBLE_FORMATS",
    "PREFIX",
    "SPEC_GRAMMAR",
    "VERSION",
    "CompressionSpec",
    "LeafPayload",
    "Payload",
    "PayloadError",
    "buffer_layout",
    "bytes_per_value",
    "decode",
    "encode",
    "topk_count",
]

_INT_LEVELS = {"int8": 127, "int4": 7, "int2": 3}  # scale = absmax / levels
# fp4 magnitudes for exponent field c = 0..7, in units of the block absmax.
FP4_LEVELS = np.array([0.0] + [2.0**e for e in range(-6, 1)], np.float32)
_FP4_MIDPOINTS = (FP4_LEVELS[1:] + FP4_LEVELS[:-1]) / 2  # exact binary fractions
_BF16_MAX = np.float32(ml_dtypes.finfo(ml_dtypes.bfloat16).max)


# ---------------------------------------------------------------------------- encode/decode


def encode(
    tree: Any, spec: CompressionSpec | str, error_feedback: Any = None
) -> tuple[Payload, Any]:
    """Compresses a pytree of float arrays (Δ); returns (payload, new error feedback).

    The new error feedback is a float32 numpy tree shaped like `tree`: (Δ + error_feedback) −
    decode(payload). Pass it as `error_feedback` next round; None means zeros.
    """
    spec = as_spec(spec)
    path_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    if error_feedback is None:
        feedback = [None] * len(path_leaves)
    else:
        feedback, ef_treedef = jax.tree_util.tree_flatten(error_feedback)
        if ef_treedef != treedef:
            raise ValueError(f"error_feedback has structure {ef_treedef}, the tree has {treedef}")
    leaves, residuals = [], []
    for (key_path, x), e in zip(path_leaves, feedback, strict=True):
        where = jax.tree_util.keystr(key_path)
        v = _as_float32(x, where)
        if e is not None:
            e = _as_float32(e, where + " (error feedback)")
            if e.shape != v.shape:
                raise ValueError(f"error feedback for {where} has shape {e.shape}, not {v.shape}")
            v = v + e
        path = tuple(_key_component(k) for k in key_path)
        leaf, decoded = _encode_leaf(path, v, spec)
        leaves.append(leaf)
        residuals.append((v.reshape(-1) - decoded).reshape(v.shape))
    payload = Payload(spec, tuple(leaves), treedef)
    return payload, jax.tree_util.tree_unflatten(treedef, residuals)


def decode(payload: Payload, like: Any = None) -> Any:
    """The float32 numpy tree a payload encodes (unsent top-k entries are 0).

    The structure is `like`'s when given (a pytree of arrays or ShapeDtypeStructs; its paths
    and shapes must match, else PayloadError), else the one `encode` saw, else nested dicts
    (lists where keys are 0..n-1) rebuilt from the leaf paths.
    """
    if like is not None:  # check before decoding: a mismatch should not cost the allocation
        treedef = _check_like(like, payload)
        return jax.tree_util.tree_unflatten(treedef, _decode_all(payload))
    arrays = _decode_all(payload)
    if payload.treedef is not None:
        return jax.tree_util.tree_unflatten(payload.treedef, arrays)
    return tree_from_paths([leaf.path for leaf in payload.leaves], arrays)


def _decode_all(payload: Payload) -> list[np.ndarray]:
    return [_decode_leaf(leaf, payload.spec) for leaf in payload.leaves]


def _check_like(like: Any, payload: Payload) -> Any:
    """The treedef of `like`, after checking its leaf paths and shapes match the payload's."""
    path_leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
    if len(path_leaves) != len(payload.leaves):
        raise PayloadError(f"payload has {len(payload.leaves)} leaves, `like` {len(path_leaves)}")
    for (key_path, ref), leaf in zip(path_leaves, payload.leaves, strict=True):
        path = tuple(_key_component(k) for k in key_path)
        if path != leaf.path or tuple(np.shape(ref)) != leaf.shape:
            raise PayloadError(
                f"payload leaf {list(leaf.path)} {leaf.shape} does not match `like` leaf "
                f"{list(path)} {tuple(np.shape(ref))}"
            )
    return treedef


def _as_float32(x: Any, where: str) -> np.ndarray:
    """A float32 numpy copy of a leaf; non-finite values are a bug upstream, so refuse them."""
    v = np.array(x, dtype=np.float32)
    if not np.isfinite(v).all():
        raise ValueError(f"pseudo-gradient leaf {where} has non-finite values")
    return v


def _key_component(key: Any) -> str | int:
    """A JSON-able stand-in for one jax key-path entry."""
    raw = getattr(key, "key", getattr(key, "idx", getattr(key, "name", None)))
    if isinstance(raw, str) or (type(raw) is int and abs(raw) < 2**31):
        return raw
    return str(key)  # e.g. a tuple dict key: still a unique, readable name


def _encode_leaf(
    path: tuple, v: np.ndarray, spec: CompressionSpec
) -> tuple[LeafPayload, np.ndarray]:
    """(LeafPayload, flat decoded values) for a float32 array."""
    flat = v.reshape(-1)
    index = select(flat, spec) if spec.topk else None
    sent = flat if index is None else flat[index]
    values, scales = _quantize(sent, spec)
    decoded_sent = _dequantize(values, scales, spec, sent.size)
    if index is None:
        return LeafPayload(path, v.shape, values, scales), decoded_sent
    decoded = np.zeros(flat.size, np.float32)
    decoded[index] = decoded_sent
    coded = pack_index12(chunk_positions(index, spec)) if spec.chunk else delta_encode(index)
    return LeafPayload(path, v.shape, values, scales, coded), decoded


def _decode_leaf(leaf: LeafPayload, spec: CompressionSpec) -> np.ndarray:
    n = math.prod(leaf.shape)
    if leaf.index is None:
        return _dequantize(leaf.values, leaf.scales, spec, n).reshape(leaf.shape)
    k = sent_count(n, spec)
    if spec.chunk:
        index = chunk_starts(n, spec) + unpack_index12(leaf.index)[:k]
    else:
        index = delta_decode(leaf.index)
    out = np.zeros(n, np.float32)
    out[index] = _dequantize(leaf.values, leaf.scales, spec, k)
    return out.reshape(leaf.shape)


# ---------------------------------------------------------------------------------- formats


def _blocks(x: np.ndarray, block: int) -> np.ndarray:
    """x zero-padded to whole blocks, as [num_blocks, block]; padding never raises absmax."""
    num_blocks = -(-x.size // block)
    return np.pad(x, (0, num_blocks * block - x.size)).reshape(num_blocks, block)


def _quantize(x: np.ndarray, spec: CompressionSpec) -> tuple[np.ndarray, np.ndarray | None]:
    """(values, per-block scales or None) for a flat float32 vector."""
    if spec.format == "fp32":
        return x.astype(np.float32), None
    if spec.format == "bf16":
        # Clip first: float32 values just above bf16's max would otherwise round to inf.
        return np.clip(x, -_BF16_MAX, _BF16_MAX).astype(ml_dtypes.bfloat16).view(np.uint16), None
    blocks = _blocks(x, spec.block_size)
    absmax = np.abs(blocks).max(axis=1)
    if spec.format == "fp4":
        return _pack_nibbles(_fp4_codes(blocks, absmax).reshape(-1)[: x.size]), absmax
    levels = _INT_LEVELS[spec.format]
    scales = (absmax / np.float32(levels)).astype(np.float32)
    if spec.format == "int2":
        return _pack_crumbs(_int2_codes(blocks, scales).reshape(-1)[: x.size]), scales
    safe = np.where(scales > 0, scales, np.float32(1))  # an all-zero block codes to zeros
    q = np.clip(np.rint(blocks / safe[:, None]), -levels, levels).astype(np.int8)
    q = q.reshape(-1)[: x.size]
    return (q if spec.format == "int8" else _pack_nibbles(q.view(np.uint8) & 0xF)), scales


def _fp4_codes(blocks: np.ndarray, absmax: np.ndarray) -> np.ndarray:
    """E3M0 nibbles sign<<3 | c: nearest of the levels m·FP4_LEVELS, ties to the larger."""
    safe = np.where(absmax > 0, absmax, np.float32(1))
    c = np.searchsorted(_FP4_MIDPOINTS, np.abs(blocks) / safe[:, None], side="right")
    sign = (blocks < 0) & (c > 0)  # no -0: one code per value
    return (sign.astype(np.uint8) << 3) | c.astype(np.uint8)


def _int2_codes(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """int2 codes c = (q + 3)/2: |q| = 3 where |x| ≥ 2s (ties up; 2s is exact), else 1;
    negative where x < 0 (so ±0 → +1)."""
    big = np.abs(blocks) >= (scales + scales)[:, None]
    negative = blocks < 0
    # q = −3, −1, +1, +3 → c = 0, 1, 2, 3
    return np.where(negative, np.where(big, 0, 1), np.where(big, 3, 2)).astype(np.uint8)


def _dequantize(
    values: np.ndarray, scales: np.ndarray | None, spec: CompressionSpec, k: int
) -> np.ndarray:
    """Float32 vector of the k values coded in `values` (+ `scales`)."""
    if spec.format == "fp32":
        return values.astype(np.float32)
    if spec.format == "bf16":
        return values.view(ml_dtypes.bfloat16).astype(np.float32)
    per_value = np.repeat(scales, spec.block_size)[:k]
    if spec.format == "int8":
        return values.astype(np.float32) * per_value
    if spec.format == "int2":
        q = _unpack_crumbs(values, k).astype(np.int8) * np.int8(2) - np.int8(3)
        return q.astype(np.float32) * per_value
    nibbles = _unpack_nibbles(values, k)
    if spec.format == "int4":
        signed = nibbles.astype(np.int8) - np.int8(16) * (nibbles >= 8)
        return signed.astype(np.float32) * per_value
    magnitude = FP4_LEVELS[nibbles & 7] * per_value
    return np.where(nibbles & 8, -magnitude, magnitude)


def _pack_nibbles(nibbles: np.ndarray) -> np.ndarray:
    """4-bit codes (uint8 < 16) → bytes, low nibble first; an odd tail pads with 0."""
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8)


def _unpack_nibbles(packed: np.ndarray, k: int) -> np.ndarray:
    nibbles = np.empty(packed.size * 2, np.uint8)
    nibbles[0::2], nibbles[1::2] = packed & 0xF, packed >> 4
    return nibbles[:k]


def _pack_crumbs(codes: np.ndarray) -> np.ndarray:
    """2-bit codes (uint8 < 4) → bytes, four each, lowest bits first; the tail pads with 0."""
    codes = np.pad(codes, (0, -codes.size % 4)).reshape(-1, 4)
    return (codes[:, 0] | codes[:, 1] << 2 | codes[:, 2] << 4 | codes[:, 3] << 6).astype(np.uint8)


def _unpack_crumbs(packed: np.ndarray, k: int) -> np.ndarray:
    return ((packed[:, None] >> np.array([0, 2, 4, 6], np.uint8)) & 3).reshape(-1)[:k]
