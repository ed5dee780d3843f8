"""Tests of near_jax.diloco.codec.compress: error bounds per block, top-k + error feedback,
decoding, sizes, and the encoded bytes pinned by goldens (the wire format: test_payload.py)."""

import hashlib
import math

import numpy as np
import pytest
from helpers import delta, hashed_tree, leaves_sha256, params_like_tree

from near_jax.diloco.codec import compress
from near_jax.diloco.codec.compress import CompressionSpec, Payload, PayloadError, decode, encode

SHAPES = [(), (1,), (7,), (128,), (129,), (3, 100), (2, 3, 67), (64, 64)]
BLOCK_FORMATS = ["int8", "int4", "fp4", "int2"]
SLACK = 1 + 1e-5  # float32 rounding of the scale and of x/scale


def block_absmax(flat, block):
    """Per element: the absmax m of its block (blocks of `block` consecutive values)."""
    pad = -flat.size % block
    m = np.abs(np.pad(flat, (0, pad))).reshape(-1, block).max(axis=1)
    return np.repeat(m, block)[: flat.size]


def roundtrip(x, spec):
    """Decoded leaf, flattened, after encode → bytes → from_bytes → decode."""
    payload, _ = encode({"x": x}, spec)
    out = decode(Payload.from_bytes(payload.to_bytes()))["x"]
    assert out.dtype == np.float32 and out.shape == np.shape(x)
    return out.reshape(-1)


# --------------------------------------------------------------------------- error bounds


@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_is_exact_and_bf16_is_relative_2_to_minus_8(shape):
    x = delta(shape)
    flat = x.reshape(-1)
    np.testing.assert_array_equal(roundtrip(x, "fp32"), flat)
    err = np.abs(roundtrip(x, "bf16") - flat)
    assert (err <= 2.0**-8 * np.abs(flat)).all()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fmt,levels", [("int8", 127), ("int4", 7)])
@pytest.mark.parametrize("block", [128, 32])
def test_int_formats_within_half_a_step_per_block(shape, fmt, levels, block):
    x = delta(shape, seed=len(shape))
    flat = x.reshape(-1)
    err = np.abs(roundtrip(x, f"{fmt}:block={block}") - flat)
    bound = block_absmax(flat, block) / levels / 2
    assert (err <= bound * SLACK).all()


@pytest.mark.parametrize("fmt,levels", [("int8", 127), ("int4", 7)])
def test_int_bounds_are_tight(fmt, levels):
    # Without outliers the errors spread over [0, step/2], so some come close to the bound.
    x = delta((4096,), seed=11, outliers=0)
    err = np.abs(roundtrip(x, fmt) - x)
    assert (err / (block_absmax(x, 128) / levels / 2)).max() > 0.95


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("block", [128, 32, 1])
def test_int2_levels_and_bound(shape, block):
    x = delta(shape, seed=len(shape) + 20, outliers=5)
    flat = x.reshape(-1)
    out = roundtrip(x, f"int2:block={block}")
    m = block_absmax(flat, block)
    # Every decoded value is ±m/3 or ±m (up to the scale's rounding), same sign as x ...
    ratio = np.abs(out) / (m / 3)
    assert np.isin(np.round(ratio), [1, 3]).all() and np.allclose(ratio, np.round(ratio))
    assert (np.sign(out) == np.sign(flat)).all()  # delta() has no zeros
    # ... and within m/3 of it.
    assert (np.abs(out - flat) <= m / 3 * SLACK).all()


def test_int2_bound_is_tight():
    # Values near 0 and near ±2m/3 are m/3 from the nearest level.
    x = delta((4096,), seed=11, outliers=0)
    err = np.abs(roundtrip(x, "int2") - x)
    assert (err / (block_absmax(x, 128) / 3)).max() > 0.95


def test_int2_rounding_ties_and_packing():
    # m = 3, so s = 1 and the level boundaries are ±2 (ties to ±3) and 0 (±0 → +1).
    below_2 = np.nextafter(np.float32(2), np.float32(0))
    x = np.array([3, 2, -2, below_2, -0.0, 0.0, -1, -3, 0.5], np.float32)
    payload, _ = encode(x, "int2")
    np.testing.assert_array_equal(decode(payload), [3, 3, -3, 1, 1, 1, -1, -3, 1])
    # Codes c = (q + 3)/2, four per byte, first value in the lowest bits, padding 0:
    # [3, 3, 0, 2], [2, 2, 1, 0], [2, pad, pad, pad].
    (leaf,) = payload.leaves
    want = [3 | 3 << 2 | 0 << 4 | 2 << 6, 2 | 2 << 2 | 1 << 4 | 0 << 6, 2]
    np.testing.assert_array_equal(leaf.values, want)
    np.testing.assert_array_equal(leaf.scales, [1.0])


def test_int2_zero_block_decodes_to_zeros():
    x = np.zeros(300, np.float32)
    x[:128] = delta((128,), seed=2)
    x[200] = -0.0
    out = roundtrip(x, "int2")
    assert (out[128:] == 0).all() and not np.signbit(out[128:]).any()
    payload, _ = encode(x, "int2")
    np.testing.assert_array_equal(payload.leaves[0].scales[1:], [0, 0])


@pytest.mark.parametrize("shape", SHAPES)
def test_fp4_e3m0_levels_rounding_and_bound(shape):
    x = delta(shape, seed=3)
    flat = x.reshape(-1)
    out = roundtrip(x, "fp4")
    m = block_absmax(flat, 128)
    # Every decoded magnitude is 0 or m·2^e for e in -6..0.
    ratio = np.abs(out) / m
    assert np.isin(ratio, compress.FP4_LEVELS).all()
    # Nearest level: relative error <= 1/3 within range; below it, absolute error <= m/128.
    err = np.abs(out - flat)
    assert (err <= np.maximum(np.abs(flat) / 3, m / 128) * SLACK).all()
    in_range = np.abs(flat) >= m / 64
    assert (err[in_range] <= np.abs(flat[in_range]) / 3 * SLACK).all()
    # Below the smallest level: < m/128 → 0, [m/128, m/64) → ±m/64; signs kept.
    tiny, small = np.abs(flat) < m / 128, (np.abs(flat) >= m / 128) & ~in_range
    assert (out[tiny] == 0).all()
    np.testing.assert_allclose(out[small], np.sign(flat[small]) * m[small] / 64, rtol=1e-6)
    assert (np.sign(out[~tiny]) == np.sign(flat[~tiny])).all()


def test_fp4_rounds_to_nearest_in_linear_space():
    # Block max 1: 0.74 is nearer 0.5 than 1 (log-space rounding would pick 1, above √2/2).
    # Ties go up: exactly 0.75 → 1, 0.375 → 0.5. 1/128 → 1/64; just under → 0.
    x = np.array([1.0, 0.74, 0.75, 0.375, -0.3, 1 / 128, 0.0078], np.float32)
    out = roundtrip(x, "fp4")
    np.testing.assert_array_equal(out, [1.0, 0.5, 1.0, 0.5, -0.25, 1 / 64, 0.0])


@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
def test_an_outlier_only_hurts_its_own_block(fmt):
    clean = delta((4 * 128,), seed=5, outliers=0)
    spiked = clean.copy()
    spiked[10] = 1.0  # block 0: ~1000× the typical |x|
    out_clean, out_spiked = roundtrip(clean, fmt), roundtrip(spiked, fmt)
    # Blocks 1..3 decode bit-identically with or without the outlier in block 0 ...
    np.testing.assert_array_equal(out_spiked[128:], out_clean[128:])
    # ... within a bound set by their own absmax, ~1000× below the outlier block's, ...
    err = np.abs(out_spiked - spiked)
    m = block_absmax(spiked, 128)
    assert m[0] > 300 * m[128:].max()
    bound = {"int8": m / 254, "int4": m / 14, "fp4": np.maximum(np.abs(spiked) / 3, m / 128)}
    bound["int2"] = m / 3
    assert (err[128:] <= bound[fmt][128:] * SLACK).all()
    # ... while the outlier block's ordinary values lose far more.
    assert err[:128].mean() > 5 * err[128:].mean()


# -------------------------------------------------------------------- top-k, error feedback


@pytest.mark.parametrize("shape", [(1,), (7,), (129,), (3, 100), (64, 64)])
@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.5])
def test_topk_sends_exactly_k_largest(shape, fraction):
    x = delta(shape, seed=7)
    flat = x.reshape(-1)
    payload, residual = encode({"x": x}, CompressionSpec("fp32", topk=fraction))
    k = compress.topk_count(flat.size, fraction)
    assert k == min(flat.size, max(1, math.floor(fraction * flat.size + 0.5)))  # half up
    (leaf,) = payload.leaves
    assert leaf.index.size == leaf.values.size == k
    out = decode(Payload.from_bytes(payload.to_bytes()))["x"].reshape(-1)
    sent = np.flatnonzero(out)
    assert sent.size == k
    np.testing.assert_array_equal(np.sort(np.argsort(-np.abs(flat), kind="stable")[:k]), sent)
    np.testing.assert_array_equal(out[sent], flat[sent])
    # The residual is exactly what was not sent.
    np.testing.assert_array_equal(residual["x"].reshape(-1) + out, flat)


def chunked_topk(flat, spec):
    """Indices chunked top-k must send: per chunk a stable sort by −|x|, its k_c first."""
    chosen = [np.zeros(0, np.int64)]
    for start in range(0, flat.size, spec.chunk):
        part = flat[start : start + spec.chunk]
        k = compress.topk_count(part.size, spec.topk)
        chosen.append(start + np.sort(np.argsort(-np.abs(part), kind="stable")[:k]))
    return np.concatenate(chosen)


@pytest.mark.parametrize("shape", [(), (5,), (64,), (3, 100), (4096 + 100,)])
@pytest.mark.parametrize("spec", ["fp32:chunk=64+topk=0.1", "fp32:chunk=4096+topk=0.01"])
def test_chunked_topk_sends_the_k_largest_of_each_chunk(shape, spec):
    x = delta(shape, seed=8, outliers=20)  # outliers crowd some chunks, not others
    flat = x.reshape(-1)
    parsed = CompressionSpec.parse(spec)
    payload, residual = encode({"x": x}, spec)
    out = decode(Payload.from_bytes(payload.to_bytes()))["x"].reshape(-1)
    (leaf,) = payload.leaves
    assert leaf.index.dtype == np.uint8 and leaf.index.size == -(-3 * leaf.values.size // 2)
    want = chunked_topk(flat, parsed)
    np.testing.assert_array_equal(np.flatnonzero(out), want)
    np.testing.assert_array_equal(out[want], flat[want])  # fp32: sent exactly
    np.testing.assert_array_equal(residual["x"].reshape(-1) + out, flat)


@pytest.mark.parametrize("spec", ["int2:chunk=64+topk=0.1", "int4:block=32:chunk=50+topk=0.2"])
def test_chunked_topk_values_within_the_formats_bound(spec):
    # The kept values, chunk by chunk, form blocks of B kept values (which straddle chunks).
    parsed = CompressionSpec.parse(spec)
    x = delta((1000,), seed=12, outliers=10)
    out = roundtrip(x, spec)
    sent = chunked_topk(x, parsed)
    assert sent.size == compress.sent_count(x.size, parsed)
    np.testing.assert_array_equal(out[np.setdiff1d(np.arange(x.size), sent)], 0)
    m = block_absmax(x[sent], parsed.block_size)
    levels = {"int2": 1.5, "int4": 7}[parsed.format]  # bound m/3 = (m/1.5)/2, m/14
    assert (np.abs(out[sent] - x[sent]) <= m / levels / 2 * SLACK).all()


def test_topk_ties_go_to_the_lowest_indices():
    x = np.array([1.0, -2.0, 2.0, 0.5, -2.0], np.float32)
    payload, _ = encode(x, "fp32+topk=0.4")  # k = 2 of three |2|s
    np.testing.assert_array_equal(decode(payload), [0, -2, 2, 0, 0])


def accumulate(spec, d, rounds, feedback):
    """Σ of decoded payloads over `rounds` rounds of the constant Δ = d, and the last residual."""
    total, ef = np.zeros_like(d), None
    for _ in range(rounds):
        payload, residual = encode(d, spec, error_feedback=ef)
        total += decode(Payload.from_bytes(payload.to_bytes()))
        ef = residual if feedback else None
    return total, residual


@pytest.mark.parametrize(
    "spec",
    ["fp32+topk=0.1", "int8+topk=0.1", "int4+topk=0.05", "fp4+topk=0.1"]
    + ["int2+topk=0.1", "int2:chunk=64+topk=0.1", "int4:chunk=100+topk=0.05"],
)
def test_error_feedback_makes_topk_converge(spec):
    d = delta((1000,), seed=9, outliers=5, spike=10)  # ×1000 outliers would dominate the norm
    rel = {}
    for rounds in (50, 200):
        total, residual = accumulate(spec, d, rounds, feedback=True)
        # Telescoping: Σ decoded = R·Δ − residual_R exactly up to float32 sums.
        np.testing.assert_allclose(total + residual, rounds * d, rtol=1e-4, atol=1e-6)
        rel[rounds] = np.linalg.norm(total - rounds * d) / np.linalg.norm(rounds * d)
        # The residual stays bounded: no entry waits more than ~1/topk rounds' worth.
        assert np.abs(residual).max() <= 4 * np.abs(d).max()  # measured 0.5–1.0
    assert rel[200] < 0.1 and rel[200] < rel[50] / 2  # the error shrinks like 1/R
    total, _ = accumulate(spec, d, 200, feedback=False)
    no_feedback = np.linalg.norm(total - 200 * d) / np.linalg.norm(200 * d)
    assert no_feedback > 0.3 and no_feedback > 5 * rel[200]  # without it, a fixed bias


@pytest.mark.parametrize(
    "spec", ["int2", "int2+topk=0.05", "int2:chunk=128+topk=0.03", "int4:chunk=64+topk=0.1"]
)
def test_error_feedback_loses_nothing(spec):
    # A different Δ each round (outliers included): Σ decoded + the last residual = Σ Δ.
    shapes = {"w": (3, 100), "b": (129,), "s": ()}
    total = {k: np.zeros(s) for k, s in shapes.items()}  # float64 sums
    target = {k: np.zeros(s) for k, s in shapes.items()}
    ef = None
    for r in range(30):
        d = {k: delta(s, seed=1000 * r + i, outliers=2) for i, (k, s) in enumerate(shapes.items())}
        payload, ef = encode(d, spec, error_feedback=ef)
        decoded = decode(Payload.from_bytes(payload.to_bytes()))
        for k in shapes:
            total[k] += decoded[k]
            target[k] += d[k]
    for k in shapes:
        # Only float32 rounding of v = Δ + r (2⁻²⁴ relative; |v| ≲ 1.5 with the outliers) adds
        # up: measured ≤ 1.9e-7 over 30 rounds. A value dropped once (~1e-3) is far outside.
        np.testing.assert_allclose(total[k] + ef[k], target[k], rtol=0, atol=1e-6)


def test_error_feedback_also_carries_quantization_error():
    # Dense fp4 zeroes everything under m/128; with feedback those values still get through.
    d = np.full(128, 1e-3, np.float32)
    d[0] = 1.0
    total, _ = accumulate("fp4", d, 300, feedback=True)
    np.testing.assert_allclose(total / 300, d, rtol=0.05)
    total, _ = accumulate("fp4", d, 300, feedback=False)
    assert (total[1:] == 0).all()


def test_error_feedback_must_match_the_tree():
    tree = {"a": np.ones(3, np.float32), "b": np.ones(2, np.float32)}
    with pytest.raises(ValueError, match="structure"):
        encode(tree, "int8", error_feedback={"a": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="shape"):
        encode(tree, "int8", error_feedback={"a": np.zeros(3), "b": np.zeros(3)})
    with pytest.raises(ValueError, match="non-finite"):
        encode({"a": np.array([1.0, np.nan])}, "int8")


# ----------------------------------------------------------------------------- decoding


def test_a_single_array_round_trips_as_an_array():
    x = delta((5, 5))
    out = decode(Payload.from_bytes(encode(x, "int8")[0].to_bytes()))
    assert isinstance(out, np.ndarray) and out.shape == (5, 5)


def test_decode_like_rejects_a_different_tree():
    payload, _ = encode(params_like_tree(), "int8")
    other = params_like_tree()
    other["embed"] = np.zeros((64, 65), np.float32)
    with pytest.raises(PayloadError, match="does not match"):
        decode(payload, like=other)
    with pytest.raises(PayloadError, match="leaves"):
        decode(payload, like={"x": np.zeros(3)})


@pytest.mark.parametrize(
    "spec,ratio",
    [("fp32", 1.0), ("bf16", 2.0), ("int8", 4 / (1 + 4 / 128)), ("int4", 4 / (0.5 + 4 / 128))]
    + [("fp4", 4 / (0.5 + 4 / 128)), ("int8:block=32", 4 / (1 + 4 / 32))]
    + [("int2", 4 / (0.25 + 4 / 128))],
)
def test_compression_ratio_is_as_documented(spec, ratio):
    x = delta((512, 512))
    payload, _ = encode({"w": x}, spec)
    assert 4 * x.size / payload.nbytes == pytest.approx(ratio, rel=2e-3)
    assert compress.bytes_per_value(spec) == pytest.approx(4 / ratio)
    header = payload.nbytes - sum(a.nbytes for _, a in payload.leaves[0].buffers())
    assert header < 150


def test_topk_payload_size():
    x = delta((256, 512))
    payload, _ = encode({"w": x}, "int8+topk=0.1")
    k = compress.topk_count(x.size, 0.1)
    (leaf,) = payload.leaves
    assert leaf.index.dtype in (np.uint8, np.uint16)  # gaps of a random 10% fit in 16 bits
    values_and_scales = k * compress.bytes_per_value("int8")
    assert payload.nbytes == pytest.approx(values_and_scales + leaf.index.nbytes, abs=250)
    assert 4 * x.size / payload.nbytes > 12


def million_params():
    """A 2²⁰-parameter tree of a few leaves; (768, 1024) is 192 chunks of 4096 exactly."""
    return {
        "w1": delta((768, 1024), 1),
        "w2": delta((1000, 250), 2),
        "b": delta((12000,), 3),
        "norm": delta((144,), 4),
    }


@pytest.mark.parametrize(
    "fraction,per_param,ratio", [(0.01, 0.01784, 218.3), (0.03, 0.05350, 74.1)]
)
def test_chunked_int2_bytes_per_parameter(fraction, per_param, ratio):
    # C = 4096, B = 128: 41 resp. 123 of each 4096 sent, at 1/4 + 4/128 bytes for the int2
    # value and scale plus 3/2 for its 12-bit position: 1.78125 bytes per sent value.
    tree = million_params()
    n = sum(x.size for x in tree.values())
    assert n == 1 << 20
    spec = f"int2:chunk=4096+topk={fraction}"
    payload, _ = encode(tree, spec)
    k = sum(leaf.values.size for leaf in payload.leaves)  # 4 codes per byte: ≈ k/4
    sent = sum(compress.sent_count(x.size, CompressionSpec.parse(spec)) for x in tree.values())
    assert k == sum(-(-compress.sent_count(x.size, payload.spec) // 4) for x in tree.values())
    assert sent / n == pytest.approx(fraction, rel=0.01)
    data = sum(a.nbytes for leaf in payload.leaves for _, a in leaf.buffers())
    assert data / sent == pytest.approx(1.78125, abs=0.01)  # per-leaf rounding of bytes only
    assert data / n == pytest.approx(per_param, rel=0.002)
    assert payload.nbytes - data < 600  # the JSON header of four leaves
    assert 4 * n / payload.nbytes == pytest.approx(ratio, rel=0.002)  # vs fp32's 4 bytes/param


# -------------------------------------------------------------------------------- goldens

# sha256 of the payload bytes of two rounds (error feedback carried) and of the last residual,
# for hashed_tree(0) then hashed_tree(10): fixed inputs that use no RNG. Produced with numpy
# 2.4.6 on x86-64 (AMD EPYC, AVX-512) by this test's own code; a numpy upgrade, another CPU
# or a codec change that alters one byte fails here. Update them only for an intended change
# to the wire format or the numerics (then islands on old and new code would disagree).
GOLDEN_INPUT = "abfd8ca962392112ff6f8fc512cc69ff36f2027721ee169689b4d943b1f2f29b"
GOLDEN_ENCODE = {
    "fp32": (
        "e789006a84f900086265ef083a35981f5f8752268710d06c4981cf59b1736a75",
        "7f940f388dff02a4f956e483bb83d796c6b7e80d40704e13c67505a1cdf779b0",
    ),
    "bf16": (
        "fa9788563e835c43237d4b0c84a9cbe5d640d621acda64823bd9928767189344",
        "8fcf0fbb59d9f1feccbdee7dc488ef4536dce40d56b6dfbfda6c23465d6ca828",
    ),
    "int8": (
        "909d4f4cdfa1756ebdefb558bdc8394267110c0978cdd70978045ec0e1dd1e0d",
        "41aafd31787f08e7e0cf06c2b6edc4f4187453d31514a49006a8d8ad8d2797f4",
    ),
    "int4": (
        "c925c2c5f679d1d3b50861cc408ee233cdce9154dc6fd54ab0398350fdbf8dcc",
        "d7f1a27d1d9b6f7803c34bd8b75bebf58f25d8509b3cd6e352744d459dcbe772",
    ),
    "fp4": (
        "4ae207e6b9d55d5f85f0565f387a6fa9be554afc950853e9c1781e0bfce51fdd",
        "b15bbada7c2f347b3d1b30c8a042a14e43448c714c541aa45289db68dd205dbf",
    ),
    "int8:block=32+topk=0.1": (
        "275223a7028312447fa6559bee90dde3383c6fb9cc793c305e942561efc6d253",
        "be9d4455c4d767ec5bab94b86a807649f6ce76e7e887844044709c59060e18fd",
    ),
    "fp4:block=7+topk=0.3": (
        "3401e12fd1d5cd3dcdf3d5870cb23704dc8823382657546d56e0f3aa6391017e",
        "5e39039eb8db4dfe0ed4c35bf6c2887e7b005cc310772bf626d3f2a54ca3b0d8",
    ),
    # int2 and chunked top-k: added with the formats (same machine and numpy).
    "int2": (
        "dacc5cbc2b12fe53a58128d9ca28abe63d0f261b1e9ab09246d467aea693955c",
        "1c7cb47ae04ef9c77eb6b1566124828573ae8b472b0adee5e378468f629a2377",
    ),
    "int2:block=32:chunk=64+topk=0.1": (
        "39d86010f5082a40cf5deaebf88a59b90f5b49aa1481659c1a5e30fabe75a244",
        "9124879a36bebd3fc59be25dee2fa646311a3be2a7e2808fc902cc677715b877",
    ),
    "int4:chunk=7+topk=0.3": (
        "a59e32741eeaa8653a140d828f7d5dea9b500b35843f945660905c9e385cf656",
        "d7a7cd5c0dc9b2275e21626120b808c033e76955e70bf63f34f067cfff9ce573",
    ),
}


@pytest.mark.parametrize("spec", sorted(GOLDEN_ENCODE))
def test_encode_bytes_are_pinned(spec):
    assert leaves_sha256(hashed_tree(0)) == GOLDEN_INPUT  # else the input moved, not encode
    ef, blobs = None, []
    for seed in (0, 10):
        payload, ef = encode(hashed_tree(seed), spec, error_feedback=ef)
        blobs.append(payload.to_bytes())
    got = (hashlib.sha256(b"".join(blobs)).hexdigest(), leaves_sha256(ef))
    assert got == GOLDEN_ENCODE[spec]
