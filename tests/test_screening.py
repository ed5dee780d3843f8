"""Screening of contributions (free riders, outliers, replays, copies), scoring and rewards."""

import math
import statistics

import jax
import numpy as np
import pytest

from near_jax.contrib.screening import (
    GramAccumulator,
    center_weights,
    centered_gram,
    cosine,
    gram_norms,
    median_scales,
    norms,
    overlap_ratios,
    reward_shares,
    score_contributions,
    screen,
    screen_details,
    screen_gram,
)
from near_jax.diloco import protocol
from near_jax.diloco.codec.compress import decode, encode

SHAPES = {"w": (16, 24), "b": (24,), "blocks": {"k": (3, 5, 7)}}


def gaussian(rng):
    return jax.tree.map(
        lambda s: rng.standard_normal(s).astype(np.float32),
        SHAPES,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def combo(a, x, b=0.0, y=None):
    """a·x + b·y in float32."""
    if y is None:
        return jax.tree.map(lambda u: (a * u).astype(np.float32), x)
    return jax.tree.map(lambda u, v: (a * u + b * v).astype(np.float32), x, y)


def flat(t):
    return np.concatenate([np.ravel(x).astype(np.float64) for x in jax.tree.leaves(t)])


@pytest.fixture(scope="module")
def honest():
    """Six honest deltas: a shared direction plus as much noise (pairwise cosine ≈ 0.5)."""
    rng = np.random.default_rng(0)
    shared = gaussian(rng)
    return [combo(1.0, shared, 1.0, gaussian(rng)) for _ in range(6)]


def test_norms_and_cosine_match_float64_numpy(honest):
    a, b = honest[0], honest[1]
    assert norms([a, b]) == pytest.approx(
        [np.linalg.norm(flat(a)), np.linalg.norm(flat(b))], rel=1e-12
    )
    want = flat(a) @ flat(b) / (np.linalg.norm(flat(a)) * np.linalg.norm(flat(b)))
    assert cosine(a, b) == pytest.approx(want, rel=1e-12)
    assert 0.3 < cosine(a, b) < 0.7
    assert cosine(a, a) == pytest.approx(1.0) and cosine(a, combo(-2.0, a)) == pytest.approx(-1)
    zero = combo(0.0, a)
    assert cosine(a, zero) == 0.0 and norms([zero]) == [0.0]
    bad = jax.tree.map(lambda x: x.copy(), a)
    bad["b"][3] = np.inf
    assert norms([bad]) == [math.inf] and cosine(a, bad) == 0.0
    bad["b"][3] = np.nan
    assert math.isnan(norms([bad])[0]) and cosine(bad, a) == 0.0
    with pytest.raises(ValueError):
        cosine(a, {"w": a["w"]})


def test_screen_flags_exactly_the_adversaries(honest):
    rng = np.random.default_rng(1)
    h = honest
    past = combo(1.0, gaussian(rng), 0.5, h[4])  # an earlier round's applied delta
    history = [("carol@2", gaussian(rng)), ("alice@3", past)]
    tiny = combo(1e-4 * float(np.std(flat(h[2]))), gaussian(rng))
    contributions = [
        ("h0", h[0]),
        ("zero", combo(0.0, h[0])),
        ("h1", h[1]),
        ("h2", h[2]),
        ("copy", combo(1.0, h[2], 1.0, tiny)),
        ("h3", h[3]),
        ("flip", combo(-10.0, h[3])),
        ("h4", h[4]),
        ("replay", past),
        ("h5", h[5]),
    ]
    names = [n for n, _ in contributions]
    deltas = [d for _, d in contributions]
    reasons = dict(zip(names, screen(deltas, names, history=history), strict=True))

    assert [n for n, r in reasons.items() if not r] == ["h0", "h1", "h2", "h3", "h4", "h5"]
    assert reasons["zero"] == "free-rider: zero update (norm 0)"
    assert reasons["copy"].startswith("copy: near-duplicate of h2 (cosine 1.0000)")
    assert reasons["flip"].startswith("norm outlier: norm ")
    assert "(limit 3×)" in reasons["flip"]
    assert reasons["replay"].startswith("stale: near-duplicate of alice@3 (cosine 1.0000)")
    assert all("\n" not in r for r in reasons.values())

    details = screen_details(deltas, names, history=history)
    median = statistics.median(norms(deltas))
    flip = details[names.index("flip")]
    assert flip.check == "outlier" and flip.ratio == pytest.approx(10 * norms([h[3]])[0] / median)
    assert f"is {flip.ratio:.3g}× the round's median {median:.3g}" in flip.reason
    assert details[names.index("copy")].duplicate_of == "h2"
    assert details[names.index("replay")].duplicate_of == "alice@3"

    # Disabling the norm check lets the outlier through (nothing else catches it).
    reasons = screen(deltas, names, history=history, max_norm_ratio=0)
    assert reasons[names.index("flip")] == ""
    assert reasons[names.index("zero")] and reasons[names.index("copy")]


def test_small_updates_are_free_riders_relative_to_the_median(honest):
    names = [f"h{i}" for i in range(6)] + ["lazy"]
    deltas = list(honest) + [combo(1e-6, gaussian(np.random.default_rng(8)))]
    reasons = screen(deltas, names)
    assert reasons[:6] == [""] * 6
    assert reasons[6].startswith("free-rider: norm ")
    assert "× the round's median" in reasons[6] and "(limit 0.001×)" in reasons[6]
    assert screen(deltas, names, zero_norm_ratio=0)[6] == ""


def test_non_finite_norm_is_an_outlier_even_with_the_norm_check_off(honest):
    bad = jax.tree.map(lambda x: x.copy(), honest[0])
    bad["w"][0, 0] = np.nan
    for ratio in (3.0, 0.0):
        reasons = screen([honest[1], bad, honest[2]], ["a", "bad", "c"], max_norm_ratio=ratio)
        assert reasons[0] == reasons[2] == ""
        assert reasons[1] == "norm outlier: norm nan is not finite"


def test_thresholds_hold_at_their_boundaries(honest):
    h = honest
    rng = np.random.default_rng(2)
    close = combo(1.0, h[1], 0.05, gaussian(rng))  # cosine ≈ 0.999 with h[1]
    names = ["h0", "h1", "close", "h2", "h3", "big"]
    big = combo(2.5, h[4])  # h[4] itself is not in the round
    deltas = [h[0], h[1], close, h[2], h[3], big]
    # The boundaries are the exact values screen compares (its Gram matrix may round the
    # last bit differently from `cosine`), which it reports in screen_details.
    c = screen_details(deltas, names)[2].cosine
    assert 0.99 < c < 1.0 and abs(c - cosine(h[1], close)) < 1e-12
    assert screen(deltas, names, duplicate_cosine=c)[2].startswith("copy: near-duplicate of h1")
    assert screen(deltas, names, duplicate_cosine=float(np.nextafter(c, 2.0)))[2] == ""
    # The same boundary for a replay of history.
    hist = [("bob@7", h[1])]
    c = screen_details([h[0], close, h[2]], ["h0", "close", "h2"], history=hist)[1].cosine
    reasons = screen([h[0], close, h[2]], ["h0", "close", "h2"], history=hist, duplicate_cosine=c)
    assert reasons == ["", f"stale: near-duplicate of bob@7 (cosine {c:.4f})", ""]
    above = float(np.nextafter(c, 2.0))
    assert screen(
        [h[0], close, h[2]], ["h0", "close", "h2"], history=hist, duplicate_cosine=above
    ) == [
        "",
        "",
        "",
    ]
    # norm / median > max_norm_ratio is flagged; equality passes.
    ratio = screen_details(deltas, names)[5].ratio
    assert 2.0 < ratio < 3.0
    assert abs(ratio - norms([big])[0] / statistics.median(norms(deltas))) < 1e-12
    assert screen(deltas, names, max_norm_ratio=ratio, duplicate_cosine=1.01)[5] == ""
    below = float(np.nextafter(ratio, 0.0))
    flagged = screen(deltas, names, max_norm_ratio=below, duplicate_cosine=1.01)
    assert flagged[5].startswith("norm outlier") and flagged[:5] == [""] * 5
    assert screen(deltas, names)[5] == ""  # the default limit 3× lets 2.5× through


def test_rejected_contributions_are_not_originals(honest):
    # The first of two near-identical deltas is an outlier; the second is not a "copy" of it.
    rng = np.random.default_rng(3)
    v = combo(1.0, honest[0], 1.0, gaussian(rng))
    v = combo(1.0, v, -1.0, honest[0])  # a fresh honest-looking direction, not in the round
    v = combo(1.0, v, 1.0, gaussian(rng))
    first, second = combo(3.3, v), combo(2.7, v, 1e-4, gaussian(rng))
    names = [f"h{i}" for i in range(6)] + ["first", "second"]
    reasons = screen(list(honest) + [first, second], names)
    assert reasons[6].startswith("norm outlier") and reasons[7] == ""
    assert reasons[:6] == [""] * 6
    # A copy may be the original of a later copy: c is within the limit of b but not of a.
    far = combo(1.0, honest[2], 0.03, gaussian(rng))
    farther = combo(1.0, far, 0.03, gaussian(rng))
    limit = (cosine(honest[2], farther) + cosine(far, farther)) / 2
    assert cosine(honest[2], farther) < limit <= min(cosine(far, farther), cosine(honest[2], far))
    reasons = screen([honest[2], far, farther], ["a", "b", "c"], duplicate_cosine=limit)
    assert reasons[0] == "" and reasons[1].startswith("copy: near-duplicate of a")
    assert reasons[2].startswith("copy: near-duplicate of b")


def test_screen_edge_cases(honest):
    assert screen([], []) == []
    assert screen([honest[0]], ["solo"]) == [""]
    zeros = [combo(0.0, honest[0])] * 3
    assert screen(zeros + [honest[1]], list("abcd")) == ["free-rider: zero update (norm 0)"] * 3 + [
        ""
    ]
    with pytest.raises(ValueError, match="names"):
        screen(honest[:2], ["a"])
    with pytest.raises(ValueError, match="not shaped like"):
        screen([honest[0], {"w": honest[0]["w"]}], ["a", "b"])
    with pytest.raises(ValueError):
        screen(honest[:2], ["a", "b"], max_norm_ratio=-1.0)


def test_the_gram_matrix_adds_up_over_shards(honest):
    rng = np.random.default_rng(6)
    trees = [*honest[:4], combo(1.0, honest[0], 1e-3, gaussian(rng)), combo(-10.0, honest[1])]
    trees.append(jax.tree.map(lambda x: (1e3 * x).astype(np.float32), gaussian(rng)))
    whole = np.array([[flat(a) @ flat(b) for b in trees] for a in trees])
    for shard_bytes in (64, 200, 1 << 20):  # many small shards, leaves cut in slices, one
        cut = protocol.plan_shards(trees[0], shard_bytes)
        splits = [cut.split(t) for t in trees]
        acc = GramAccumulator(len(trees))
        for s in reversed(range(cut.num_shards)):  # any order: only the summation changes
            acc.add([split[s] for split in splits])
        assert cut.num_shards > 1 or shard_bytes == 1 << 20
        np.testing.assert_allclose(acc.gram, whole, rtol=1e-12, atol=1e-9)
        np.testing.assert_allclose(gram_norms(acc.gram), norms(trees), rtol=1e-12)
    # A tree left out (None) stops growing; the others' entries are unaffected.
    acc = GramAccumulator(3)
    acc.add([[np.ones(4, np.float32)], None, [np.full(4, 2, np.float32)]])
    acc.add([[np.ones(2, np.float32)]] * 3)
    assert acc.gram.tolist() == [[6, 2, 10], [2, 2, 2], [10, 2, 18]]
    with pytest.raises(ValueError, match="3 trees"):
        acc.add([None, None])


def test_screening_from_a_gram_matrix_equals_screening_whole_trees(honest):
    rng = np.random.default_rng(7)
    earlier = gaussian(rng)  # an earlier round's applied Δ, and a stale copy of it
    past = combo(1.0, earlier, 1e-3, gaussian(rng))
    deltas = [*honest, combo(1.0, honest[2], 1e-4, gaussian(rng)), combo(8.0, honest[3]), past]
    deltas.append(combo(0.0, honest[0]))
    names = [f"c{i}" for i in range(len(deltas))]
    history = [("alice@3", earlier), ("the published update", gaussian(rng))]
    options = {"history": history, "arrival": [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]}
    want = screen_details(deltas, names, **options)
    cut = protocol.plan_shards(deltas[0], 256)
    trees = deltas + [t for _, t in history]
    splits = [cut.split(t) for t in trees]
    acc = GramAccumulator(len(trees))
    for s in range(cut.num_shards):
        acc.add([split[s] for split in splits])
    got = screen_gram(acc.gram, names, [label for label, _ in history], arrival=options["arrival"])
    assert [g.reason for g in got] == [w.reason for w in want]
    assert sorted(w.check for w in want if w.reason) == ["copy", "free-rider", "outlier", "stale"]
    for g, w in zip(got, want, strict=True):
        assert (g.check, g.duplicate_of) == (w.check, w.duplicate_of)
        assert g.norm == pytest.approx(w.norm, rel=1e-12)
        assert g.cosine == pytest.approx(w.cosine, rel=1e-12)
    with pytest.raises(ValueError, match="Gram matrix"):
        screen_gram(acc.gram, names)


def shared_round(seed, n=6, shared_scale=3.0):
    """n honest Δs = shared_scale·s + e_i: a large common direction (raw cosine ≈ 0.9 at
    3.0), each with its own part e_i."""
    rng = np.random.default_rng(seed)
    shared = gaussian(rng)
    return rng, [combo(shared_scale, shared, 1.0, gaussian(rng)) for _ in range(n)]


def pair_cosines(trees):
    return [cosine(a, b) for i, a in enumerate(trees) for b in trees[i + 1 :]]


@pytest.mark.parametrize("seed", [10, 11, 12])
def test_centered_cosine_catches_a_noisy_copy_and_spares_a_shared_direction(seed):
    rng, h = shared_round(seed)
    assert 0.8 < min(pair_cosines(h)) and max(pair_cosines(h)) < 0.99
    names = [f"h{i}" for i in range(6)]
    # Honest Δs with a big shared component pass, raw and centered alike.
    for c in (0.99, 1.01):
        assert screen(h, names, duplicate_cosine=c, centered_cosine=0.5) == [""] * 6
    details = screen_details(h, names, centered_cosine=0.5)
    g = centered_gram(np.array([[flat(a) @ flat(b) for b in h] for a in h]), range(6))
    cc = g / np.sqrt(np.outer(np.diag(g), np.diag(g)))
    off = cc[np.triu_indices(6, 1)]
    assert abs(float(np.mean(off)) + 1 / 5) < 0.02 and max(off) < 0.3  # ≈ -1/(n-1)
    assert all(d.check == "" for d in details)
    # An honest Δ plus as much noise again: raw cosine below 0.99 with its original.
    noise = float(np.linalg.norm(flat(h[2]) - flat(h[3]))) / math.sqrt(2)
    scale = noise / float(np.linalg.norm(flat(gaussian(np.random.default_rng(0)))))
    copy = combo(1.0, h[2], scale * float(rng.uniform(0.6, 1.0)), gaussian(rng))
    raw = cosine(h[2], copy)
    assert 0.9 < raw < 0.99
    deltas, names = [*h, copy], [*names, "copy"]
    assert screen(deltas, names) == [""] * 7  # the raw cosine alone misses it
    got = screen_details(deltas, names, centered_cosine=0.5)
    assert [d.reason for d in got[:6]] == [""] * 6
    c = got[6]
    assert (c.check, c.duplicate_of, c.measure) == ("copy", "h2", "centered cosine")
    assert 0.5 <= c.similarity < 1 and c.cosine == pytest.approx(raw, rel=1e-9)
    assert c.reason == (
        "copy: near-duplicate of h2 after removing the round's common update "
        f"(centered cosine {c.similarity:.3f})"
    )
    # The original is decided by arrival, not position: the copy came first here.
    got = screen_details(deltas, names, centered_cosine=0.5, arrival=[1, 1, 9, 1, 1, 1, 4])
    assert got[2].check == "copy" and got[2].duplicate_of == "copy" and got[6].reason == ""
    got = screen_details(deltas, names, centered_cosine=0.5, arrival=[0] * 7)
    assert [d.check for d in got] == [""] * 2 + ["duplicate"] + [""] * 3 + ["duplicate"]
    assert got[2].reason.startswith("duplicate: near-duplicate of copy after removing")
    # Off: None, or above 1; at its own value the limit still flags, just above it not.
    assert screen(deltas, names, centered_cosine=None)[6] == ""
    assert screen(deltas, names, centered_cosine=1.01)[6] == ""
    at = screen_details(deltas, names, centered_cosine=0.5)[6].similarity
    assert screen(deltas, names, centered_cosine=at)[6].startswith("copy:")
    assert screen(deltas, names, centered_cosine=float(np.nextafter(at, 2.0)))[6] == ""


def test_centered_cosine_needs_four_contributions_that_pass_checks_1_to_3(honest):
    rng = np.random.default_rng(13)
    copy = combo(1.0, honest[0], 0.3, gaussian(rng))
    assert 0.95 < cosine(copy, honest[0]) < 0.99
    # Two or three alone: centered, a copy pair looks opposite, so nothing is flagged.
    assert screen([honest[0], copy], ["a", "b"], centered_cosine=0.01) == ["", ""]
    assert screen([honest[0], copy, honest[3]], list("abc"), centered_cosine=0.01) == [""] * 3
    # A free-rider and an outlier are not part of the round's center.
    zero, big = combo(0.0, honest[1]), combo(50.0, honest[2])
    round_ = [honest[0], copy, honest[3], zero, big]
    reasons = screen(round_, list("abczo"), centered_cosine=0.5)
    assert reasons[:3] == [""] * 3 and reasons[3].startswith("free-rider")
    assert reasons[4].startswith("norm outlier")
    reasons = screen([*round_, honest[4]], list("abczod"), centered_cosine=0.5)
    assert reasons[1].startswith("copy: near-duplicate of a after removing")
    assert reasons[0] == reasons[2] == reasons[5] == ""


def test_centered_gram_and_overlap_ratios_match_their_definitions():
    rng = np.random.default_rng(14)
    x = rng.standard_normal((5, 40)) * (rng.random((5, 40)) < 0.3)
    g = x @ x.T
    rows = [4, 0, 2, 3]
    for w in (None, rng.dirichlet(np.ones(4))):
        m = x[rows].mean(axis=0) if w is None else w @ x[rows]
        want = (x[rows] - m) @ (x[rows] - m).T
        np.testing.assert_allclose(centered_gram(g, rows, w), want, rtol=1e-10, atol=1e-10)
    ind = (x != 0).astype(np.float64) @ (x != 0).T.astype(np.float64)
    got = overlap_ratios(ind, rows)
    for a, ra in enumerate(rows):
        for b, rb in enumerate(rows):
            both = np.sum((x[ra] != 0) & (x[rb] != 0))
            high = max(np.sum(x[ra] != 0), np.sum(x[rb] != 0))
            assert got[a, b] == pytest.approx(both / high)
    ind[1, 1] = 0  # an empty support: no ratio
    assert np.isnan(overlap_ratios(ind, [0, 1, 2])[0, 1])


def test_the_center_is_the_mean_of_an_honest_round_and_resists_a_far_delta():
    rng = np.random.default_rng(18)
    x = 3.0 * rng.standard_normal(600) + rng.standard_normal((6, 600))
    w = center_weights(x @ x.T, range(6))
    np.testing.assert_allclose(w, np.full(6, 1 / 6), atol=1e-9)  # nothing is clipped
    far = np.vstack([x, 40.0 * rng.standard_normal(600)])
    w = center_weights(far @ far.T, range(7))
    assert w.sum() == pytest.approx(1.0) and w[6] < 0.05 < min(w[:6])
    # The far one's pull is clipped at 1.5× the median distance: against the six honest
    # ones' it moves the center by at most that / 6 (the mean moves by its norm / 7).
    m = w @ far
    d = np.linalg.norm(far - m, axis=1)
    shift = np.linalg.norm(m - x.mean(axis=0))
    assert shift <= 1.5 * np.median(d) / 6 * (1 + 1e-9)
    assert 20 * shift < np.linalg.norm(far.mean(axis=0) - x.mean(axis=0))
    assert center_weights(np.zeros((0, 0)), []).shape == (0,)


@pytest.mark.parametrize("seed", [19, 20])
def test_a_far_delta_cannot_make_two_honest_ones_look_like_copies(seed):
    # The attacker pushes the round's center along -(a + b) with a Δ inside the norm
    # limit: with the mean as the center, a and b would look like copies of each other.
    rng, h = shared_round(seed, n=5)
    mean = jax.tree.map(lambda *xs: np.mean(xs, axis=0), *h)
    push = jax.tree.map(lambda a, b, m: 2 * m - a - b, h[0], h[1], mean)
    x = combo(2.9 * statistics.median(norms(h)) / norms([push])[0], push)
    deltas, names = [*h, x], [f"h{i}" for i in range(5)] + ["x"]
    gram = np.array([[flat(a) @ flat(b) for b in deltas] for a in deltas])
    g = centered_gram(gram, range(6))
    assert g[0, 1] / math.sqrt(g[0, 0] * g[1, 1]) > 0.5  # the mean would flag h1
    assert screen(deltas, names, centered_cosine=0.5) == [""] * 6


def sparse(rng, support, like):
    """Gaussian values on `support` (a boolean tree shaped like `like`), zeros elsewhere."""
    return jax.tree.map(
        lambda m, x: np.where(m, rng.standard_normal(x.shape), 0).astype(np.float32),
        support,
        like,
    )


def test_top_k_overlap_catches_a_copy_of_the_positions(honest):
    rng = np.random.default_rng(15)
    supports = [jax.tree.map(lambda x: rng.random(x.shape) < 0.1, honest[0]) for _ in range(6)]
    h = [sparse(rng, m, honest[0]) for m in supports]
    copy = sparse(rng, supports[2], honest[0])  # h2's positions, fresh values
    assert abs(cosine(copy, h[2])) < 0.3
    deltas, names = [*h, copy], [f"h{i}" for i in range(6)] + ["copy"]
    assert screen(deltas, names, centered_cosine=0.5) == [""] * 7  # blind to positions
    got = screen_details(deltas, names, copy_overlap=0.4)
    assert [d.reason for d in got[:6]] == [""] * 6
    c = got[6]
    assert (c.check, c.duplicate_of, c.measure, c.similarity) == (
        "copy",
        "h2",
        "top-k index overlap",
        1.0,
    )
    assert c.reason.startswith("copy: near-duplicate of h2 by its top-k positions ")
    assert "(top-k index overlap 1.00, the round's median 0.1" in c.reason
    # The same from shards: both Gram matrices add up over any cut.
    trees = deltas
    whole = np.array([[np.sum((flat(a) != 0) & (flat(b) != 0)) for b in trees] for a in trees])
    cut = protocol.plan_shards(trees[0], 128)
    splits = [cut.split(t) for t in trees]
    acc, ind = GramAccumulator(7), GramAccumulator(7, indicators=True)
    for s in range(cut.num_shards):
        acc.add([split[s] for split in splits])
        ind.add([split[s] for split in splits])
    assert ind.gram.tolist() == whole.tolist()
    streamed = screen_gram(acc.gram, names, overlap=ind.gram, copy_overlap=0.4)
    assert [d.reason for d in streamed] == [d.reason for d in got]
    # Off with copy_overlap 0, without an overlap matrix, or with only two contributions.
    assert screen_gram(acc.gram, names, overlap=ind.gram, copy_overlap=0)[6].reason == ""
    assert screen_gram(acc.gram, names)[6].reason == ""
    two = np.ix_([2, 6], [2, 6])
    assert screen_gram(acc.gram[two], ["a", "b"], overlap=ind.gram[two])[1].reason == ""
    with pytest.raises(ValueError, match="overlap matrix"):
        screen_gram(acc.gram, names, overlap=ind.gram[:6, :6])
    with pytest.raises(ValueError, match="copy_overlap"):
        screen_gram(acc.gram, names, overlap=ind.gram, copy_overlap=math.nan)
    with pytest.raises(ValueError, match="centered_cosine"):
        screen_gram(acc.gram, names, centered_cosine=0.0)


def test_a_dense_delta_sent_first_does_not_make_sparse_ones_its_copies(honest):
    rng = np.random.default_rng(21)
    supports = [jax.tree.map(lambda x: rng.random(x.shape) < 0.1, honest[0]) for _ in range(5)]
    h = [sparse(rng, m, honest[0]) for m in supports]
    dense = combo(0.3, gaussian(rng))  # its support covers every other one
    deltas, names = [dense, *h], ["dense"] + [f"h{i}" for i in range(5)]
    ind = screening_indicators(deltas)
    assert all(ind[0, k] == ind[k, k] for k in range(1, 6))  # over the smaller: 1 for all
    assert screen(deltas, names, copy_overlap=0.4) == [""] * 6


def codec(tree, spec="int8+topk=0.1"):
    """What the aggregator screens: the decoded payload of `tree`."""
    payload, _ = encode(tree, spec)
    return decode(payload, like=tree)


@pytest.mark.parametrize("seed", [16, 17])
def test_top_k_overlap_of_real_codec_payloads(seed):
    rng, dense = shared_round(seed, shared_scale=1.0)  # raw cosine ≈ 0.5
    h = [codec(d) for d in dense]
    support = [flat(t) != 0 for t in h]
    assert all(0.05 < np.mean(m) < 0.15 for m in support)
    # A copy of h2's positions with its values scrambled, and a lightly noised copy,
    # each sent through the codec again: cosine and centered cosine miss the first.
    fresh = gaussian(rng)
    scrambled = codec(jax.tree.map(lambda x, y: np.where(y != 0, x, 0), fresh, h[2]))
    noisy = codec(combo(1.0, h[2], 0.5 * float(np.std(flat(dense[2]))), gaussian(rng)))
    names = [f"h{i}" for i in range(6)] + ["scrambled", "noisy"]
    deltas = [*h, scrambled, noisy]
    assert abs(cosine(scrambled, h[2])) < 0.3 and cosine(noisy, h[2]) < 0.99
    got = screen_details(deltas, names, copy_overlap=0.4, duplicate_cosine=1.01)
    assert [d.reason for d in got[:6]] == [""] * 6
    for d in got[6:]:
        assert (d.check, d.duplicate_of, d.measure) == ("copy", "h2", "top-k index overlap")
    # Honest supports share the big coordinates of the common direction: a raw overlap
    # above the limit that the round's median discounts.
    _, strong = shared_round(seed, shared_scale=3.0)
    strong = [codec(d) for d in strong]
    ratios = overlap_ratios(screening_indicators(strong), range(6))
    assert np.median(ratios[np.triu_indices(6, 1)]) > 0.4
    assert screen(strong, names[:6], copy_overlap=0.4) == [""] * 6


def screening_indicators(trees):
    acc = GramAccumulator(len(trees), indicators=True)
    acc.add([[np.asarray(x) for x in jax.tree.leaves(t)] for t in trees])
    return acc.gram


def test_median_scales_bring_larger_norms_down_to_the_median():
    assert median_scales([1.0, 2.0, 4.0, 0.0]) == [None, None, 0.5, None]
    assert median_scales([3.0, math.inf, math.nan, 1.0]) == [2.0 / 3.0, None, None, None]
    assert median_scales([0.0, math.nan]) == [None, None] and median_scales([]) == []


def least_squares():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((64, 8)).astype(np.float32)
    y = (x @ rng.standard_normal(8) + 0.1 * rng.standard_normal(64)).astype(np.float32)
    w = rng.standard_normal(8).astype(np.float32)

    def loss(params):
        with np.errstate(invalid="ignore", over="ignore"):  # the inf delta is on purpose
            r = x.astype(np.float64) @ np.asarray(params["w"], np.float64) - y
            return float(np.mean(r * r))

    grad = (2.0 / len(y)) * x.astype(np.float64).T @ (x.astype(np.float64) @ w - y)
    return loss, {"w": w}, grad


def test_score_contributions_on_least_squares():
    loss, params, grad = least_squares()
    step = {"w": (0.05 * grad).astype(np.float32)}  # Δ = θ − θ' = lr·gradient
    zero = {"w": np.zeros(8, np.float32)}
    noise = {"w": np.random.default_rng(5).standard_normal(8).astype(np.float32)}
    deltas = [step, {"w": -step["w"]}, zero, {"w": np.full(8, np.inf, np.float32)}, noise]
    before = params["w"].tobytes()
    base, scores = score_contributions(loss, params, deltas)
    assert base == loss(params) and params["w"].tobytes() == before
    assert scores[0] > 0 and scores[1] < 0
    assert scores[2] == 0.0
    assert scores[3] == -math.inf
    assert scores[0] == pytest.approx(base - loss({"w": params["w"] - step["w"]}))
    # step scales Δ: a half step of a small gradient step improves about half as much.
    _, half = score_contributions(loss, params, [step], step=0.5)
    assert 0 < half[0] < scores[0]
    assert score_contributions(loss, params, [])[1] == []


def test_reward_shares():
    shares = reward_shares(
        [0.3, -0.1, None, 0.5, 0.2, math.nan], [True, True, True, True, False, True]
    )
    assert shares == pytest.approx([0.375, 0.0, 0.0, 0.625, 0.0, 0.0])
    assert math.fsum(shares) == pytest.approx(1.0, abs=1e-12)
    rng = np.random.default_rng(6)
    scores = list(rng.standard_normal(20))
    eligible = list(rng.random(20) < 0.7)
    shares = reward_shares(scores, eligible)
    assert math.fsum(shares) == pytest.approx(1.0, abs=1e-12)
    for s, e, share in zip(scores, eligible, shares, strict=True):
        assert (share > 0) == (bool(e) and s > 0)
    assert reward_shares([-1.0, 0.0, 2.0], [True, True, False]) == [0.0, 0.0, 0.0]
    assert reward_shares([], []) == []
    with pytest.raises(ValueError):
        reward_shares([1.0], [True, False])
