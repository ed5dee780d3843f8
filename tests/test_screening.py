"""Screening of contributions (free riders, outliers, replays, copies), scoring and rewards."""

import math
import statistics

import jax
import numpy as np
import pytest

from near_jax.contrib.screening import (
    GramAccumulator,
    cosine,
    gram_norms,
    median_scales,
    norms,
    reward_shares,
    score_contributions,
    screen,
    screen_details,
    screen_gram,
)
from near_jax.diloco import protocol

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
