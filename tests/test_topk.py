"""Tests of near_jax.diloco.codec.topk: per-leaf and per-chunk selection (ties included), the
delta-coded and 12-bit index codings, and the counts the payload layout is built from."""

import numpy as np
import pytest
from helpers import delta

from near_jax.diloco.codec import topk
from near_jax.diloco.codec.spec import CompressionSpec, chunk_topk_counts, sent_count, topk_count


def brute_force(flat, spec):
    """Per chunk (or the whole leaf), a stable sort by −|x|: the k largest, lower index first."""
    size = spec.chunk or max(flat.size, 1)
    chosen = []
    for start in range(0, flat.size, size):
        part = flat[start : start + size]
        k = topk_count(part.size, spec.topk)
        chosen.append(start + np.sort(np.argsort(-np.abs(part), kind="stable")[:k]))
    return np.concatenate(chosen) if chosen else np.zeros(0, np.int64)


def tied(n, seed):
    """Four magnitudes, random signs: every threshold is tied many times over."""
    rng = np.random.default_rng(seed)
    return (rng.integers(1, 5, n) * rng.choice([-1, 1], n)).astype(np.float32)


@pytest.mark.parametrize("n", [0, 1, 5, 63, 64, 65, 300, 4096 + 17])
@pytest.mark.parametrize("spec", ["fp32+topk=0.1", "int2:chunk=64+topk=0.1"])
@pytest.mark.parametrize("data", ["random", "tied"])
def test_selection_is_the_k_largest_per_chunk_lower_index_first(n, spec, data):
    spec = CompressionSpec.parse(spec)
    flat = delta((n,), seed=n) if data == "random" else tied(n, seed=n)
    index = topk.select(flat, spec)
    np.testing.assert_array_equal(index, brute_force(flat, spec))
    assert index.size == sent_count(n, spec)
    assert (np.diff(index) > 0).all()  # ascending: chunk by chunk, in order within each


def test_chunked_selection_with_ties_picks_a_prefix_of_each_chunks_ties():
    spec = CompressionSpec.parse("fp32:chunk=50+topk=0.3")
    flat = tied(1000, seed=4)
    index = topk.select(flat, spec)
    for c in range(20):
        part = np.abs(flat[50 * c : 50 * (c + 1)])
        kept = index[(index >= 50 * c) & (index < 50 * (c + 1))] - 50 * c
        assert kept.size == 15
        threshold = np.sort(part)[-15]
        assert (part[kept] >= threshold).all()
        ties = np.flatnonzero(part == threshold)
        is_kept = np.isin(ties, kept)
        assert is_kept.argmin() == is_kept.sum() or is_kept.all()  # the lowest ties only


@pytest.mark.parametrize(
    "n,chunk,fraction,expected",
    [
        (0, 64, 0.1, (0, 6, 0, 0)),
        (5, 64, 0.1, (0, 6, 5, 1)),  # smaller than a chunk: all of it is the "last" chunk
        (128, 64, 0.1, (2, 6, 0, 0)),  # whole chunks only
        (129, 64, 0.1, (2, 6, 1, 1)),  # a last chunk of one value still sends it
        (1 << 20, 4096, 0.01, (256, 41, 0, 0)),
    ],
)
def test_chunk_counts(n, chunk, fraction, expected):
    assert chunk_topk_counts(n, chunk, fraction) == expected
    full, k_full, tail, k_tail = expected
    spec = CompressionSpec("int2", topk=fraction, chunk=chunk)
    assert sent_count(n, spec) == full * k_full + k_tail
    starts = topk.chunk_starts(n, spec)
    assert starts.size == sent_count(n, spec)
    assert (starts % chunk == 0).all() and (np.diff(starts) >= 0).all()


def test_index12_packing_is_little_endian_low_slot_first():
    # 0xABC | 0x123 << 12 = 0x123ABC → bytes BC 3A 12; a lone last 0xABC → BC 0A (2 bytes).
    np.testing.assert_array_equal(topk.pack_index12(np.array([0xABC, 0x123])), [0xBC, 0x3A, 0x12])
    np.testing.assert_array_equal(topk.pack_index12(np.array([0xABC])), [0xBC, 0x0A])
    np.testing.assert_array_equal(topk.unpack_index12(np.array([0xBC, 0x0A], np.uint8)), [0xABC, 0])


@pytest.mark.parametrize("k", [0, 1, 2, 3, 4, 101])
def test_index12_round_trips_and_has_the_documented_size(k):
    positions = np.random.default_rng(k).integers(0, 4096, k).astype(np.uint16)
    packed = topk.pack_index12(positions)
    assert packed.dtype == np.uint8 and packed.size == topk.index12_bytes(k) == -(-3 * k // 2)
    slots = topk.unpack_index12(packed)
    np.testing.assert_array_equal(slots[:k], positions)
    assert slots.size == k + k % 2 and (slots[k:] == 0).all()


@pytest.mark.parametrize("n", [1, 300, 70_000])
def test_delta_coding_round_trips_in_the_narrowest_dtype(n):
    index = np.sort(np.random.default_rng(n).choice(n, size=max(1, n // 100), replace=False))
    gaps = topk.delta_encode(index)
    np.testing.assert_array_equal(topk.delta_decode(gaps), index)
    assert gaps.dtype == np.dtype(topk.index_dtype(int(gaps.max())))
    assert topk.index_dtype(255) == "uint8" and topk.index_dtype(256) == "uint16"
