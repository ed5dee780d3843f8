"""Top-k selection and index coding in numpy: which entries a leaf sends, and their indices.

Two kinds of top-k (`spec.topk = F > 0`), both sending the largest |v| with ties going to
the lower index, so the choice is fully determined:

- per leaf (`chunk = 0`): the k = topk_count(n, F) largest of the whole leaf; the sorted
  indices are delta-coded (gap − 1, the first index itself) in the narrowest unsigned dtype
  that holds them (`index_dtype`), so the index buffer's dtype depends on the data.
- per chunk (`chunk = C`): the leaf, flattened in C order, is cut into chunks of C values
  (the last may be shorter) and each sends its k_c = topk_count(len_c, F) largest; in-chunk
  positions (< C ≤ 4096) are packed in 12 bits, two per 3 bytes (`pack_index12`), so the
  index buffer is ⌈3·k/2⌉ bytes of uint8 whatever the data (sizes follow from the shape).

Either way the sent values are those at the returned global indices, in ascending order.
This module imports only `spec`; `payload` validates with it and `compress` encodes with it.
"""

from __future__ import annotations

import numpy as np

from near_jax.diloco.codec.spec import CompressionSpec, chunk_topk_counts, topk_count

__all__ = [
    "INDEX_DTYPES",
    "chunk_positions",
    "chunk_starts",
    "delta_decode",
    "delta_encode",
    "index12_bytes",
    "index_dtype",
    "pack_index12",
    "select",
    "unpack_index12",
]

INDEX_DTYPES = ("uint8", "uint16", "uint32", "uint64")  # per-leaf top-k's delta-coded indices


def select(flat: np.ndarray, spec: CompressionSpec) -> np.ndarray:
    """Ascending global indices of the entries a flat float32 leaf sends under spec's top-k."""
    if not spec.chunk:
        return _leaf_topk(flat, topk_count(flat.size, spec.topk))
    full, k_full, tail, k_tail = chunk_topk_counts(flat.size, spec.chunk, spec.topk)
    head = full * spec.chunk
    parts = [_rows_topk(flat[:head].reshape(full, spec.chunk), k_full)]
    if tail:
        parts.append(head + _rows_topk(flat[head:].reshape(1, tail), k_tail))
    return np.concatenate(parts)


def _leaf_topk(x: np.ndarray, k: int) -> np.ndarray:
    """Sorted indices of the k largest |x|; ties at the threshold go to the lowest indices,
    so the choice is fully determined (argpartition alone would pick arbitrarily)."""
    if k >= x.size:
        return np.arange(x.size)
    mag = np.abs(x)
    threshold = np.partition(mag, x.size - k)[x.size - k]
    above = np.flatnonzero(mag > threshold)
    ties = np.flatnonzero(mag == threshold)[: k - above.size]
    return np.sort(np.concatenate([above, ties]))


def _rows_topk(rows: np.ndarray, k: int) -> np.ndarray:
    """Flat row-major indices of the k largest |x| of each row of [r, c], ties to the lowest
    indices: _leaf_topk per row, vectorized (a partition per row, O(r·c), no sort)."""
    r, c = rows.shape
    if k >= c:
        return np.arange(r * c)
    mag = np.abs(rows)
    threshold = np.partition(mag, c - k, axis=1)[:, c - k : c - k + 1]
    above = mag > threshold
    ties = mag == threshold
    # Each row keeps its (k − #above) first ties: fewer than all of them when they straddle k.
    need = k - above.sum(axis=1, keepdims=True)
    keep = above | (ties & (np.cumsum(ties, axis=1) <= need))
    return np.flatnonzero(keep)  # row-major: ascending, exactly k per row


# ------------------------------------------------------------------- per-leaf index coding


def index_dtype(max_gap: int) -> str:
    """The index buffer's dtype: the narrowest of INDEX_DTYPES that holds every delta-coded
    index (gap − 1; the first index itself), i.e. `max_gap`."""
    return next(n for n in INDEX_DTYPES if max_gap <= np.iinfo(n).max)


def delta_encode(index: np.ndarray) -> np.ndarray:
    """Sorted indices → gaps − 1 (first: the index itself) in the narrowest dtype that fits."""
    gaps = np.diff(index, prepend=-1) - 1
    return gaps.astype(index_dtype(int(gaps.max()) if gaps.size else 0))


def delta_decode(gaps: np.ndarray) -> np.ndarray:
    """The inverse of delta_encode: int64 indices (uint64 arithmetic wraps; callers validate)."""
    return (np.cumsum(gaps.astype(np.uint64) + np.uint64(1)) - np.uint64(1)).astype(np.int64)


# ------------------------------------------------------------------ chunked index coding


def index12_bytes(k: int) -> int:
    """Bytes of k 12-bit positions packed two per 3 bytes (an odd count pads a zero slot)."""
    return -(-3 * k // 2)


def chunk_starts(n: int, spec: CompressionSpec) -> np.ndarray:
    """Per sent value of a chunked top-k leaf of n values, its chunk's first global index."""
    full, k_full, tail, k_tail = chunk_topk_counts(n, spec.chunk, spec.topk)
    starts = np.repeat(np.arange(full, dtype=np.int64) * spec.chunk, k_full)
    return np.concatenate([starts, np.full(k_tail if tail else 0, full * spec.chunk, np.int64)])


def chunk_positions(index: np.ndarray, spec: CompressionSpec) -> np.ndarray:
    """Global indices of a chunked selection → in-chunk positions (uint16, < chunk)."""
    return (index % spec.chunk).astype(np.uint16)


def pack_index12(positions: np.ndarray) -> np.ndarray:
    """12-bit values (< 4096) → index12_bytes(count) uint8: each pair a little-endian 24-bit
    word p0 | p1 << 12. An odd count pads with a zero slot and drops that word's last byte
    (all padding), so a lone last position takes 2 bytes: p | 0 << 12, 16 bits."""
    p = positions.astype(np.uint32)
    if p.size % 2:
        p = np.append(p, np.uint32(0))
    word = p[0::2] | (p[1::2] << 12)
    packed = np.stack([word & 0xFF, (word >> 8) & 0xFF, word >> 16], axis=-1)
    return packed.astype(np.uint8).reshape(-1)[: index12_bytes(positions.size)]


def unpack_index12(packed: np.ndarray) -> np.ndarray:
    """The inverse of pack_index12: every 12-bit slot (uint16), a padding slot included
    (its 4 bits that were sent, and 8 zero bits that were not); callers check it is 0."""
    b = np.pad(packed.astype(np.uint32), (0, -packed.size % 3)).reshape(-1, 3)
    word = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
    return np.stack([word & 0xFFF, word >> 12], axis=-1).reshape(-1).astype(np.uint16)
