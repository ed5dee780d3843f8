"""Simulated compression (jax.numpy) against the numpy codec: bit for bit, under jit and vmap."""

import functools
import os
import platform
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import delta, start_module, subprocess_env

from near_jax.diloco.codec import compress, fake_quant
from near_jax.diloco.codec.compress import CompressionSpec, decode, encode

# Rounding ties when the leaf is one block, signed zeros, and a zero block (when B ≤ 8).
TIES = {
    # int8: m = 127, so scale 1 and x.5 round to even.
    "int8": [127, 0.5, 1.5, 2.5, -0.5, -2.5, 126.5, -0.0, 0, 0, 0, 0, 0, 0, 0, 0],
    # int4: the same with m = 7.
    "int4": [7, 0.5, 1.5, 2.5, -0.5, -3.5, 6.5, -0.0, 0, 0, 0, 0, 0, 0, 0, 0],
    # fp4, m = 1: midpoints 3/4, 3/8, 3/16, 3/128 go up; 1/128 → 1/64; just under → 0.
    "fp4": [1, 0.75, 0.375, 0.1875, 3 / 128, 1 / 128, -0.75, 0.0078, -0.0, 0, 0, 0, 0, 0, 0, 0],
    # int2, m = 3: scale 1, ±2 ties to ±3, just under 2 → 1, ±0 → +1.
    "int2": [3, 2, -2, np.nextafter(np.float32(2), np.float32(0)), -0.0, 0, -1, -2.5]
    + [0, 0, 0, 0, 0, 0, 0, 0],
}


def tree(seed=0, fmt="int8"):
    """Leaves of awkward shapes (none, or only some, a multiple of the block) with outliers."""
    return {
        "scalar": delta((), seed),
        "mat": [delta((3, 100), seed + 3, outliers=5), delta((4, 256), seed + 4, outliers=8)],
        "cube": delta((2, 3, 67), seed + 5, outliers=6),
        "tiny": delta((50,), seed + 6, scale=1e-30),  # small but normal scales and values
        "ties": np.array(TIES.get(fmt, TIES["int8"]), np.float32),
        "empty": np.zeros((0, 4), np.float32),
    }


def bits(x):
    """float32 bit patterns: equality here is bit-for-bit, the sign of zero included."""
    return np.asarray(x, np.float32).view(np.uint32)


def assert_bit_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, g), w in zip(
        jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True
    ):
        where = jax.tree_util.keystr(path)
        assert g.dtype == jnp.float32 and g.shape == w.shape, where
        np.testing.assert_array_equal(bits(g), bits(w), err_msg=where)


def numpy_roundtrip(t, spec, ef=None):
    payload, residual = encode(t, spec, error_feedback=ef)
    return decode(payload), residual


@functools.cache
def jitted(spec, feedback=False, vmapped=False):
    """The jitted (and vmapped over a leading replica axis) roundtrip for a static spec."""
    if feedback:
        fn = lambda t, ef: fake_quant.roundtrip_with_feedback(t, spec, ef)  # noqa: E731
    else:
        fn = lambda t: fake_quant.roundtrip(t, spec)  # noqa: E731
    return jax.jit(jax.vmap(fn) if vmapped else fn)


max_index_gaps = jax.jit(fake_quant.max_index_gaps, static_argnums=1)

DENSE = ["fp32", "bf16", "int8", "int8:block=7", "int4", "int4:block=32", "fp4", "fp4:block=1"]
DENSE += ["int2", "int2:block=7", "int2:block=1"]


@pytest.mark.parametrize("spec", DENSE)
def test_dense_formats_match_numpy_bit_for_bit(spec):
    t = tree(fmt=CompressionSpec.parse(spec).format)
    assert_bit_equal(jitted(spec)(t), numpy_roundtrip(t, spec)[0])


def test_bf16_rounds_every_float32_like_ml_dtypes():
    # Random bit patterns: all exponents, subnormals (which XLA's float ops flush), ±bf16 max.
    x = np.random.default_rng(0).integers(0, 2**32, 1 << 16, dtype=np.uint64).astype(np.uint32)
    x = x.view(np.float32)
    x = x[np.isfinite(x)]
    assert (np.abs(x) < 2.0**-126).sum() > 10
    np.testing.assert_array_equal(bits(jitted("bf16")(x)), bits(numpy_roundtrip(x, "bf16")[0]))


def replica(tree, r):
    return jax.tree.map(lambda x: x[r], tree)


@pytest.mark.parametrize(
    "spec", ["fp4:block=7", "int8+topk=0.1", "int2:block=7", "int2:chunk=64+topk=0.1"]
)
def test_vmap_codes_each_replica_on_its_own(spec):
    fmt = CompressionSpec.parse(spec).format
    trees = [tree(seed=0, fmt=fmt), tree(seed=10, fmt=fmt)]
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *trees)
    got = jitted(spec, vmapped=True)(stacked)
    for r, t in enumerate(trees):
        assert_bit_equal(replica(got, r), numpy_roundtrip(t, spec)[0])


# ------------------------------------------------------------------- top-k, error feedback


def small_tree(seed):
    return {
        "w": delta((3, 100), seed, outliers=5),
        "b": delta((129,), seed + 1),
        "s": delta((), seed + 2),  # k = 1 = n: sent whole
        "e": np.zeros((0, 3), np.float32),
    }


TOPK = ["fp32+topk=0.5", "bf16+topk=0.01", "int8+topk=0.1", "int4:block=32+topk=0.05"]
TOPK += ["fp4:block=7+topk=0.3", "int8"]  # dense int8: feedback is the quantization error
# int2 dense and with top-k; chunked top-k where leaves are several chunks and a shorter last
# one (300 = 4·64 + 44, 129 = 2·64 + 1; B = 5, so blocks straddle chunks), whole chunks only
# (300 = 3·100), smaller than one chunk (C = 4096), and chunks of 2.
TOPK += ["int2", "int2+topk=0.1", "int2:block=5:chunk=64+topk=0.1", "int4:chunk=100+topk=0.05"]
TOPK += ["int2:block=32:chunk=4096+topk=0.01", "fp32:chunk=2+topk=0.5"]


@pytest.mark.parametrize("spec", TOPK)
def test_feedback_matches_numpy_over_rounds(spec):
    step = jitted(spec, feedback=True)
    ef_np = None
    ef_jnp = jax.tree.map(np.zeros_like, small_tree(0))
    for r in range(3):
        t = small_tree(100 * r)
        want, ef_np = numpy_roundtrip(t, spec, ef_np)
        got, ef_jnp = step(t, ef_jnp)
        assert_bit_equal(got, want)
        assert_bit_equal(ef_jnp, ef_np)


@pytest.mark.parametrize("spec", ["int4:block=32+topk=0.1", "int2:block=32:chunk=64+topk=0.1"])
def test_feedback_under_vmap(spec):
    trees = [small_tree(1), small_tree(2)]
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *trees)
    ef = jax.tree.map(np.zeros_like, stacked)
    efs_np = [None, None]
    step = jitted(spec, feedback=True, vmapped=True)
    for _ in range(2):
        got, ef = step(stacked, ef)
        for r, t in enumerate(trees):
            want, efs_np[r] = numpy_roundtrip(t, spec, efs_np[r])
            assert_bit_equal(replica(got, r), want)
            assert_bit_equal(replica(ef, r), efs_np[r])


def tied_roundtrip(spec, seed):
    """(x, jnp round trip of x): four magnitudes over 600 signed entries, so top-k's
    threshold is tied many times; the round trip is checked bit for bit against numpy."""
    rng = np.random.default_rng(seed)
    x = (rng.integers(1, 5, 600) * rng.choice([-1, 1], 600)).astype(np.float32)
    got = np.asarray(jitted(spec)(x))
    np.testing.assert_array_equal(bits(got), bits(numpy_roundtrip(x, spec)[0]))
    return x, got


@pytest.mark.parametrize("spec", ["fp32+topk=0.1", "int8:block=16+topk=0.37"])
def test_topk_ties_go_to_the_lowest_indices_as_in_numpy(spec):
    x, got = tied_roundtrip(spec, seed=3)  # the k-th largest is tied ~150 times
    k = compress.topk_count(x.size, CompressionSpec.parse(spec).topk)
    threshold = np.sort(np.abs(x))[-k]
    tied, kept = np.flatnonzero(np.abs(x) == threshold), np.flatnonzero(got)
    assert kept.size == k and 0 < np.isin(tied, kept).sum() < tied.size
    assert np.isin(tied, kept).argmin() == np.isin(tied, kept).sum()  # a prefix of the ties


@pytest.mark.parametrize("spec", ["fp32:chunk=64+topk=0.1", "int2:block=16:chunk=50+topk=0.37"])
def test_chunked_topk_ties_go_to_the_lowest_indices_as_in_numpy(spec):
    x, got = tied_roundtrip(spec, seed=5)  # within most chunks the k_c-th largest is tied
    parsed = CompressionSpec.parse(spec)
    straddled = 0
    for start in range(0, x.size, parsed.chunk):
        part, kept = np.abs(x[start : start + parsed.chunk]), got[start : start + parsed.chunk]
        k = compress.topk_count(part.size, parsed.topk)
        assert np.count_nonzero(kept) == k  # no value of x is 0, nor decodes to 0 here
        tied = np.flatnonzero(part == np.sort(part)[-k])
        is_kept = kept[tied] != 0
        assert is_kept.argmin() == is_kept.sum() or is_kept.all()  # a prefix of the ties
        straddled += 0 < is_kept.sum() < tied.size
    assert straddled >= 5


def test_feedback_must_match_the_tree():
    t = {"a": np.ones(3, np.float32), "b": np.ones(2, np.float32)}
    with pytest.raises(ValueError, match="structure"):
        fake_quant.roundtrip_with_feedback(t, "int8", {"a": np.zeros(3)})
    with pytest.raises(ValueError, match="shape"):
        fake_quant.roundtrip_with_feedback(t, "int8", {"a": np.zeros(3), "b": np.zeros(3)})


# ---------------------------------------------------------------------------- payload size


def params_like_tree(seed=0):
    return {
        "layers": {"attn": {"q": delta((2, 3, 67), seed)}, "norm": delta((129,), seed + 1)},
        "embed": delta((64, 64), seed + 2),
        "scalars": [delta((), seed + 3), delta((7,), seed + 4)],
        "empty": np.zeros((0, 4), np.float32),
        "tuple_keys": {("a", 1): delta((5,), seed + 5), ("b", 0): delta((2, 2), seed + 6)},
        "int_keys": {7: delta((3,), seed + 7), 3: delta((1, 1), seed + 8)},
    }


SIZE_TREES = {
    "params": params_like_tree(),
    "array": delta((300, 7)),
    "sparse_wide": {"w": delta((40_000,), 1)},  # top-k gaps can need uint16
}


@pytest.mark.parametrize("name", sorted(SIZE_TREES))
@pytest.mark.parametrize(
    "spec",
    ["fp32", "bf16", "int8", "int4:block=32", "fp4:block=7", "fp4:block=64+topk=0.3", "int2"]
    + ["int2:block=7", "int2+topk=0.1", "int2:chunk=64+topk=0.1", "int4:chunk=4096+topk=0.01"]
    + ["int2:chunk=3+topk=0.5"],
)
def test_payload_bytes_is_the_serialized_size(name, spec):
    t = SIZE_TREES[name]
    payload = encode(t, spec)[0]
    nbytes = payload.nbytes
    shapes = jax.eval_shape(lambda: jax.tree.map(jnp.asarray, t))
    assert len(payload.to_bytes()) == nbytes
    parsed = CompressionSpec.parse(spec)
    if not parsed.topk or parsed.chunk:  # sizes from shapes alone: exact without max_gaps
        assert fake_quant.payload_bytes(shapes, spec) == nbytes
        assert fake_quant.payload_bytes(t, spec) == nbytes  # arrays work as well
        gaps = jax.device_get(max_index_gaps(t, spec))
        assert all(int(g) == 0 for g in jax.tree.leaves(gaps))  # nothing for them to choose
        assert fake_quant.payload_bytes(shapes, spec, max_gaps=gaps) == nbytes
        return
    gaps = jax.device_get(max_index_gaps(t, spec))
    assert jax.tree.leaves(gaps) == [leaf.index.max(initial=0) for leaf in payload.leaves]
    assert fake_quant.payload_bytes(shapes, spec, max_gaps=gaps) == nbytes
    assert fake_quant.payload_bytes(shapes, spec) >= nbytes  # widest possible index dtypes


def test_max_index_gaps_set_the_index_dtype():
    t = SIZE_TREES["sparse_wide"]
    payload, _ = encode(t, "fp32+topk=0.001")
    (leaf,) = payload.leaves
    (gap,) = jax.tree.leaves(max_index_gaps(t, "fp32+topk=0.001"))
    assert int(gap) == int(leaf.index.max()) > 255 and leaf.index.dtype == np.uint16
    # Without max_gaps: the widest dtype the gaps could need (n − k = 39960: also uint16).
    assert fake_quant.payload_bytes(t, "fp32+topk=0.001") == payload.nbytes
    # Small leaves (n − k < 256) are exact even without max_gaps.
    small = {"a": delta((200,)), "b": [delta((3, 50), 1)]}
    assert (
        fake_quant.payload_bytes(small, "int4+topk=0.2") == encode(small, "int4+topk=0.2")[0].nbytes
    )


# ------------------------------------------------------------------------------ CPU ISAs

ISA_CHILD = "NEAR_JAX_TEST_ISA_CHILD"  # set in the reruns below, so they do not rerun again
NOT_NUMERIC = "not payload_bytes and not max_index_gaps and not must_match"


@pytest.mark.skipif(os.environ.get(ISA_CHILD) == "1", reason="already a rerun under an ISA cap")
@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86-64 only")
def test_bit_exact_under_avx2_and_avx512():
    """XLA's CPU code depends on the ISA it targets: under AVX-512 LLVM once folded the select
    that kept v − q·s apart into a masked FMA, and only AVX-512 CI machines saw it. So rerun
    this file's numeric tests with the code capped at AVX2 and at AVX-512 (where the machine
    lacks AVX-512, that cap is its own ISA), in parallel subprocesses."""
    runs = {}
    for isa in ("AVX2", "AVX512"):
        env = subprocess_env(XLA_FLAGS=f"--xla_cpu_max_isa={isa}", **{ISA_CHILD: "1"})
        args = ["-q", "-p", "no:cacheprovider", __file__, "-k", NOT_NUMERIC]
        runs[isa] = start_module(
            "pytest",
            *args,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
    failed = {}
    for isa, proc in runs.items():
        out, _ = proc.communicate(timeout=300)
        if proc.returncode != 0:
            failed[isa] = out[-3000:]
    assert not failed, "\n\n".join(f"--xla_cpu_max_isa={k}:\n{v}" for k, v in failed.items())
