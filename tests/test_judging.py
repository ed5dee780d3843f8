"""Tests of near_jax.contrib.judging with fake evaluators on a synthetic regression.

The losses are real: params {"w": float32 vector}, least squares on batches drawn from a
hash of their seed. Train batches each have a "topic" (their own optimum W_TRUE + shift, as
in tests/contrib_world.py), so a Δ trained on its assigned batches improves them more than
the round's common update does: what the assigned-data check measures.
"""

import functools
import hashlib
import json
import math

import numpy as np
import pytest

from near_jax.contrib import judging, ratings
from near_jax.contrib.policy import Policy
from near_jax.diloco import protocol

DIM, TOPIC, H = 16, 0.5, 5
W_TRUE = np.random.default_rng(3).standard_normal(DIM).astype(np.float32)
RATED = ratings.Rating(30.0, 2.0)  # ordinal 24: above the default low_rating of -5
LOW = ratings.Rating(8.0, 5.0)  # ordinal -7: below the default low_rating of -5


@functools.cache
def batch(kind, stream, index, n=64):
    digest = hashlib.blake2b(repr((kind, stream, index)).encode(), digest_size=8).digest()
    rng = np.random.default_rng(int.from_bytes(digest, "little"))
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    w = W_TRUE
    if kind == "train":  # a topic: this batch's own optimum
        w = W_TRUE + TOPIC * rng.standard_normal(DIM).astype(np.float32)
    y = x @ w + 0.1 * rng.standard_normal(n).astype(np.float32)
    return x, y


def mse(params, kind, stream, index):
    x, y = batch(kind, stream, index)
    return float(np.mean((x @ np.asarray(params["w"], np.float32) - y) ** 2))


def val_loss(params, seed):
    return mse(params, "val", seed, 0)


def train_loss(params, stream, index):
    return mse(params, "train", stream, index)


def inner(theta, stream, lr=0.02):
    """Δ = θ − (H gradient steps on train batches 0..H−1 of `stream`)."""
    w = theta["w"].astype(np.float32).copy()
    for j in range(H):
        x, y = batch("train", stream, j)
        w = w - lr * 2 * x.T @ (x @ w - y) / len(y)
    return {"w": (theta["w"] - w).astype(np.float32)}


class Counted:
    """A loss function that counts its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args):
        self.calls += 1
        return self.fn(*args)


class Round:
    """One round's inputs to `judging.judge`: a θ_r, the Δs, their norms, streams."""

    def __init__(self, names, deltas, theta, streams, *, val=val_loss, train=train_loss):
        self.names, self.deltas, self.theta, self.streams = list(names), deltas, theta, streams
        self.norms = [float(np.linalg.norm(d["w"])) for d in deltas]
        self.val, self.train = Counted(val), Counted(train)
        self.theta_calls, self.total_calls, self.moved_indices = 0, 0, []
        self.yielded = {}  # index -> the moved tree judge() was given
        self.current = None  # the index of the last one

    def _theta(self):
        self.theta_calls += 1
        return self.theta

    def _moved(self, indices, scales):
        self.moved_indices.append(list(indices))
        for i, s in zip(indices, scales, strict=True):
            k, self.current = np.float32(1.0 if s is None else s), i
            self.yielded[i] = {"w": (self.theta["w"] - k * self.deltas[i]["w"]).astype(np.float32)}
            yield self.yielded[i]

    def _total(self):
        self.total_calls += 1
        return {"w": np.sum([d["w"] for d in self.deltas], axis=0)}, len(self.deltas)

    def judge(self, policy, seed, prior, *, with_train=True, with_total=True):
        evaluators = judging.Evaluators(self.val, self.train if with_train else None, H)
        return judging.judge(
            policy,
            evaluators,
            self.names,
            self.norms,
            seed,
            self._theta,
            self._moved,
            prior,
            self.streams,
            total=self._total if with_total else None,
        )


def honest_round(rng, names, lazy=(), theta_noise=1.0):
    """Everyone trains on its assigned stream, except those in `lazy` (other batches)."""
    theta = {"w": (W_TRUE + theta_noise * rng.standard_normal(DIM)).astype(np.float32)}
    streams = {n: int(rng.integers(2**31)) for n in names}
    deltas = [inner(theta, int(rng.integers(2**31)) if n in lazy else streams[n]) for n in names]
    return Round(names, deltas, theta, streams)


# ---------------------------------------------------------------------- validation_set


def random_names(rng, n):
    return [f"c{int(x):x}" for x in rng.choice(1 << 30, size=n, replace=False)]


def pick(rng, names, size):
    """`size` of `names` (Python str: a name is hashed by its repr)."""
    return {str(n) for n in rng.choice(names, size=size, replace=False)}


def test_validation_set_takes_everyone_when_k_is_not_positive():
    rng = np.random.default_rng(1)
    for _ in range(20):
        names = random_names(rng, int(rng.integers(1, 12)))
        must = pick(rng, names, min(2, len(names))) | {"outsider"}
        for k in (0, -int(rng.integers(1, 5))):
            assert judging.validation_set(names, k, int(rng.integers(2**62)), must) == set(names)


def test_validation_set_is_k_drawn_plus_the_must_set():
    rng = np.random.default_rng(2)
    for _ in range(50):
        names = random_names(rng, int(rng.integers(2, 20)))
        k, seed = int(rng.integers(1, len(names) + 3)), int(rng.integers(2**62))
        must = pick(rng, names, min(len(names), int(rng.integers(0, 4)))) | {"not-in-the-round"}
        drawn = judging.validation_set(names, k, seed, set())
        assert len(drawn) == min(k, len(names)) and drawn <= set(names)
        got = judging.validation_set(names, k, seed, must)
        assert got == drawn | (must & set(names))
        assert "not-in-the-round" not in got
        # deterministic, and independent of the order the names come in
        shuffled = [str(n) for n in rng.permutation(names)]
        assert judging.validation_set(shuffled, k, seed, set(must)) == got


def test_validation_set_is_unpredictable_across_seeds():
    rng = np.random.default_rng(3)
    names, k, seeds = random_names(rng, 10), 3, [int(s) for s in rng.integers(2**62, size=400)]
    picks = [frozenset(judging.validation_set(names, k, s, set())) for s in seeds]
    counts = {n: sum(n in p for p in picks) for n in names}
    assert all(0.15 < c / len(seeds) < 0.45 for c in counts.values()), counts  # ~ k/N each
    assert len(set(picks)) > 60  # of the C(10, 3) = 120 subsets
    assert judging.validation_set(names, k, seeds[0], set()) == picks[0]


# ----------------------------------------------------------------------- check_indices


def test_check_indices_are_distinct_sorted_and_in_range():
    rng = np.random.default_rng(4)
    for _ in range(200):
        h, b = int(rng.integers(1, 40)), int(rng.integers(1, 12))
        seed, name = int(rng.integers(2**62)), f"n{int(rng.integers(1 << 20))}"
        got = judging.check_indices(seed, name, h, b)
        assert len(got) == min(b, h) == len(set(got))
        assert got == sorted(got) and all(isinstance(i, int) and 0 <= i < h for i in got)
        assert judging.check_indices(seed, name, h, b) == got


def test_check_indices_differ_across_names_and_seeds():
    rng = np.random.default_rng(5)
    seed = int(rng.integers(2**62))
    by_name = {tuple(judging.check_indices(seed, f"n{i}", 30, 4)) for i in range(40)}
    by_seed = {
        tuple(judging.check_indices(int(s), "same", 30, 4)) for s in rng.integers(2**62, size=40)
    }
    assert len(by_name) > 30 and len(by_seed) > 30
    # every batch is drawn by some seed: a contributor cannot skip the rest
    covered = set().union(*by_seed)
    assert covered == set(range(30))


def test_random_seed_is_31_bit_deterministic_and_seed_dependent():
    rng = np.random.default_rng(6)
    seeds = {int(s) for s in rng.integers(2**62, size=300)}
    got = [judging.random_seed(s) for s in seeds]
    assert all(isinstance(x, int) and 0 <= x < 2**31 for x in got)
    assert got == [judging.random_seed(s) for s in seeds]
    assert len(set(got)) == len(seeds)
    assert max(got) >= 2**30  # the 31st bit is used


# ------------------------------------------------------------------ judge: the sample


def count_round(rng, n, k, batches):
    names = [f"c{i:02d}" for i in range(n)]
    rnd = honest_round(rng, names)
    policy = Policy(validate_sample=k, assigned_batches=batches)
    seed = int(rng.integers(2**62))
    base, verdicts = rnd.judge(policy, seed, {name: RATED for name in names})
    assert base == val_loss(rnd.theta, seed)
    return rnd, base, verdicts


@pytest.mark.parametrize("batches", [1, 3])
def test_a_round_costs_evaluations_in_k_not_n(batches):
    rng = np.random.default_rng(7 + batches)
    costs = {}
    for n, k in ((20, 3), (40, 3), (20, 6)):
        rnd, base, verdicts = count_round(rng, n, k, batches)
        validated = [i for i, v in enumerate(verdicts) if v.validated]
        assert len(validated) == k  # everyone is rated: only the sample
        assert rnd.moved_indices == [validated] and rnd.theta_calls == rnd.total_calls == 1
        assert rnd.val.calls == 1 + k  # θ_r, then each moved one
        # B for the shared random base, then per validated: its base on A, Δ on A, Δ on R,
        # control on A, control on R
        assert rnd.train.calls == batches + k * 5 * batches
        costs[n, k] = (rnd.val.calls, rnd.train.calls)
    assert costs[20, 3] == costs[40, 3] and costs[20, 6] > costs[20, 3]


def test_new_and_low_rated_contributors_are_always_validated():
    rng = np.random.default_rng(9)
    for _ in range(6):
        names = [f"c{i:02d}" for i in range(12)]
        prior = {n: RATED for n in names}
        new = pick(rng, names, 2)
        low = pick(rng, sorted(set(names) - new), 2)
        for n in new:
            del prior[n]
        for n in low:
            prior[n] = LOW
        rnd = honest_round(rng, names)
        seed = int(rng.integers(2**62))
        _, verdicts = rnd.judge(Policy(validate_sample=2, assigned_batches=2), seed, prior)
        validated = {n for n, v in zip(names, verdicts, strict=True) if v.validated}
        assert new | low <= validated
        assert validated == judging.validation_set(names, 2, seed, new | low)
        assert rnd.val.calls == 1 + len(validated)
        assert rnd.train.calls == 2 + 5 * 2 * len(validated)


def test_low_rating_is_a_policy_threshold():
    rng = np.random.default_rng(10)
    names = [f"c{i}" for i in range(8)]
    ordinals = rng.uniform(-10, 30, size=len(names))
    prior = {n: ratings.Rating(float(o) + 6.0, 2.0) for n, o in zip(names, ordinals, strict=True)}
    threshold = float(np.median(ordinals))
    rnd = honest_round(rng, names)
    policy = Policy(validate_sample=1, low_rating=threshold)
    _, verdicts = rnd.judge(policy, int(rng.integers(2**62)), prior)
    below = {n for n in names if prior[n].ordinal < threshold}
    validated = {n for n, v in zip(names, verdicts, strict=True) if v.validated}
    assert below <= validated and len(validated) <= len(below) + 1


def test_unvalidated_contributions_are_accepted_with_their_rating():
    rng = np.random.default_rng(11)
    names = [f"c{i:02d}" for i in range(10)]
    prior = {n: ratings.Rating(float(rng.uniform(26, 40)), float(rng.uniform(1, 3))) for n in names}
    rnd = honest_round(rng, names)
    _, verdicts = rnd.judge(Policy(validate_sample=3), int(rng.integers(2**62)), prior)
    rest = [(n, v) for n, v in zip(names, verdicts, strict=True) if not v.validated]
    assert len(rest) == 7
    for n, v in rest:
        assert v.score is None and v.performance is None and v.assigned is None
        assert not v.failed and v.rating == prior[n]
        assert v.weight == pytest.approx(prior[n].ordinal)  # factor 1
        d = v.detail()
        assert d == {
            "validated": False,
            "weight": v.weight,
            "rating": [v.rating.mu, v.rating.sigma],
        }
    validated = [v for v in verdicts if v.validated]
    assert all(v.score is not None and v.score > 0 and not v.failed for v in validated)
    # one unit of reward, split by weight
    assert math.fsum(v.reward for v in verdicts) == pytest.approx(1.0)
    total_w = math.fsum(v.weight for v in verdicts)
    for v in verdicts:
        assert v.reward == pytest.approx(v.weight / total_w)


def test_an_empty_round_reads_nothing():
    rnd = Round([], [], {"w": W_TRUE.copy()}, {})
    assert rnd.judge(Policy(), 5, {"someone": RATED}) == (None, [])
    assert rnd.theta_calls == rnd.total_calls == rnd.val.calls == rnd.train.calls == 0


# -------------------------------------------------------- judge: the assigned-data check


def test_honest_contributions_pass_and_a_lazy_one_fails_often():
    rng = np.random.default_rng(13)
    names = [f"h{i}" for i in range(5)] + ["lazy"]
    rounds = 60
    honest_margins, lazy_margins, honest_failed, lazy_failed, lazy_last = [], [], 0, 0, 0
    for _ in range(rounds):
        rnd = honest_round(rng, names, lazy={"lazy"})
        seed = int(rng.integers(2**62))
        _, verdicts = rnd.judge(Policy(assigned_batches=H), seed, {n: RATED for n in names})
        assert all(v.validated and v.assigned is not None for v in verdicts)
        for name, v in zip(names, verdicts, strict=True):
            a = v.assigned
            gains = (a["gain"] - a["control_gain"]) - (a["random_gain"] - a["control_random_gain"])
            assert a["margin"] == pytest.approx(gains)
            assert a["pass"] == (a["margin"] > 0) == (not v.failed)
            assert a["batches"] == judging.check_indices(seed, name, H, H) == list(range(H))
            if v.failed:  # ranks last, earns nothing, records no performance
                assert v.reason.startswith("lazy: on its assigned batches")
                assert v.performance is None and v.weight == 0 and v.reward == 0
                d = v.detail()
                assert d["performance"] is None and d["failed"] is True and d["validated"]
                assert d["rating"] == [v.rating.mu, v.rating.sigma]
                assert v.score is not None and v.score > 0  # it does help the val loss
                assert v.rating.mu < min(w.rating.mu for w in verdicts if not w.failed)
            else:
                assert v.performance == a["margin"] and v.reward > 0
        honest_margins += [v.assigned["margin"] for v in verdicts[:-1]]
        honest_failed += sum(v.failed for v in verdicts[:-1])
        lazy_margins.append(verdicts[-1].assigned["margin"])
        lazy_failed += verdicts[-1].failed
        lazy_last += verdicts[-1].rating.mu < min(v.rating.mu for v in verdicts[:-1])
    assert honest_failed <= 0.02 * len(honest_margins)  # about 1 in 300 on this problem
    assert np.median(honest_margins) > 0.1
    assert abs(np.mean(lazy_margins)) < 0.2 * np.mean(honest_margins)  # around 0
    assert 0.25 <= lazy_failed / rounds <= 0.75  # a coin flip, not a free pass
    assert lazy_last >= 0.7 * rounds  # and mostly last even when it passes


def test_the_control_is_the_mean_of_the_others_at_the_norm_of_the_delta():
    rng = np.random.default_rng(24)
    names = [f"c{i}" for i in range(6)]
    rnd = honest_round(rng, names)
    rnd.deltas[4] = {"w": rnd.deltas[4]["w"] * np.float32(3.0)}  # rescaled: k < 1
    rnd.norms = [float(np.linalg.norm(d["w"])) for d in rnd.deltas]
    controls = {}

    def train(params, stream, index):
        if params is not rnd.theta and params is not rnd.yielded.get(rnd.current):
            controls.setdefault(rnd.current, []).append(params)
        return train_loss(params, stream, index)

    rnd.train = Counted(train)
    rnd.judge(Policy(assigned_batches=2), int(rng.integers(2**62)), {n: RATED for n in names})
    assert sorted(controls) == list(range(6))
    total = np.sum([d["w"] for d in rnd.deltas], axis=0)
    for i, trees in controls.items():
        assert len(trees) == 4 and all(t is trees[0] for t in trees)  # 2 on A, 2 on R
        step = rnd.theta["w"] - trees[0]["w"]
        own = rnd.theta["w"] - rnd.yielded[i]["w"]
        others = total - rnd.deltas[i]["w"]
        assert np.linalg.norm(step) == pytest.approx(np.linalg.norm(own), rel=1e-4)
        cos = step @ others / (np.linalg.norm(step) * np.linalg.norm(others))
        assert cos == pytest.approx(1.0, abs=1e-4)


def test_without_an_assignment_the_check_fails():
    rng = np.random.default_rng(14)
    names = [f"c{i}" for i in range(4)]
    rnd = honest_round(rng, names)
    del rnd.streams["c2"]  # no registered key: no stream seed
    _, verdicts = rnd.judge(Policy(assigned_batches=2), 7, {n: RATED for n in names})
    v = verdicts[2]
    assert v.reason.startswith("lazy: no assignment to check")
    assert v.assigned["batches"] == [] and math.isnan(v.assigned["margin"])
    assert v.reward == 0 and v.weight == 0 and v.detail()["performance"] is None
    assert json.loads(protocol.dumps(v.detail()))["assigned"]["margin"] is None
    assert all(not verdicts[i].failed for i in (0, 1, 3))
    assert rnd.train.calls == 2 + 3 * 5 * 2  # nothing evaluated for it


def test_a_contribution_alone_in_its_round_is_not_checked():
    rng = np.random.default_rng(15)
    rnd = honest_round(rng, ["solo"], lazy={"solo"})  # even a lazy one: no control
    base, (v,) = rnd.judge(Policy(assigned_batches=H), 3, {})
    assert v.validated and not v.failed and v.assigned is None
    moved = {"w": rnd.theta["w"] - rnd.deltas[0]["w"]}
    assert v.performance == v.score == pytest.approx(base - val_loss(moved, 3))
    assert rnd.train.calls == 0 and rnd.total_calls == 0
    assert v.rating == ratings.DEFAULT  # one player: no game


def test_the_check_is_off_by_policy_or_without_train_loss():
    rng = np.random.default_rng(16)
    names = [f"c{i}" for i in range(4)]
    for policy, kwargs in (
        (Policy(assigned_data=False), {}),
        (Policy(), {"with_train": False}),
        (Policy(), {"with_total": False}),
    ):
        rnd = honest_round(rng, names, lazy={"c0"})
        _, verdicts = rnd.judge(policy, 9, {n: RATED for n in names}, **kwargs)
        assert rnd.train.calls == 0
        for v in verdicts:
            assert v.assigned is None and not v.failed and v.performance == v.score


def test_non_finite_losses_are_harmful():
    rng = np.random.default_rng(17)
    names = [f"c{i}" for i in range(5)]
    rnd = honest_round(rng, names)

    def val(params, seed):  # c1's moved params overflow the eval loss
        return math.inf if params is rnd.yielded.get(1) else val_loss(params, seed)

    def train(params, stream, index):  # c3's make the train loss nan
        return math.nan if params is rnd.yielded.get(3) else train_loss(params, stream, index)

    rnd.val, rnd.train = Counted(val), Counted(train)
    _, verdicts = rnd.judge(Policy(assigned_batches=2), 11, {n: RATED for n in names})
    assert verdicts[1].reason.startswith("harmful: the eval loss is not finite")
    assert verdicts[1].score is None and verdicts[1].assigned is not None  # -inf: nothing
    assert verdicts[3].reason.startswith("harmful: the train loss is not finite")
    assert verdicts[3].score > 0
    for i in (1, 3):
        v = verdicts[i]
        assert v.reward == 0 and v.weight == 0 and v.performance is None
        d = v.detail()
        assert d["performance"] is None and d["failed"] is True
        assert json.loads(protocol.dumps(d)) == d  # JSON-able despite the nan and inf
    assert not any(verdicts[i].failed for i in (0, 2, 4))
    mus = [v.rating.mu for v in verdicts]
    assert max(mus[1], mus[3]) < min(mus[0], mus[2], mus[4])


def test_a_nan_base_loss_is_recorded_as_none():
    rng = np.random.default_rng(18)
    names = [f"c{i}" for i in range(3)]
    rnd = honest_round(rng, names)
    rnd.val = Counted(lambda params, seed: math.nan)
    base, verdicts = rnd.judge(Policy(), 1, {n: RATED for n in names})
    assert base is None
    for v in verdicts:
        assert v.reason.startswith("harmful") and v.score is None and v.reward == 0


def test_min_score_comes_before_the_assigned_check():
    rng = np.random.default_rng(19)
    names = [f"c{i}" for i in range(5)]
    rnd = honest_round(rng, names, lazy={"c4"})
    del rnd.streams["c1"]  # would fail the check, but scores too low first
    _, verdicts = rnd.judge(Policy(min_score=1e6), 2, {n: RATED for n in names})
    for v in verdicts:
        assert (
            v.reason.startswith("no improvement: score ") and "contrib.min_score=1e+06" in v.reason
        )
        assert v.performance is None and v.reward == 0 and v.score is not None
    # a threshold between the scores splits them
    rnd = honest_round(rng, names)
    _, first = rnd.judge(Policy(assigned_data=False), 2, {n: RATED for n in names})
    cut = float(np.median([v.score for v in first]))
    rnd = Round(rnd.names, rnd.deltas, rnd.theta, rnd.streams)
    _, verdicts = rnd.judge(
        Policy(assigned_data=False, min_score=cut), 2, {n: RATED for n in names}
    )
    for a, b in zip(first, verdicts, strict=True):
        assert b.score == a.score
        assert b.failed == (a.score < cut)


def test_inflating_a_delta_buys_no_score():
    rng = np.random.default_rng(20)
    names = [f"c{i}" for i in range(5)]
    rnd = honest_round(rng, names)
    rnd.deltas[2] = {"w": rnd.deltas[2]["w"] * np.float32(50.0)}
    rnd.norms = [float(np.linalg.norm(d["w"])) for d in rnd.deltas]
    median = float(np.median(rnd.norms))
    _, verdicts = rnd.judge(Policy(assigned_data=False), 4, {n: RATED for n in names})
    # scored at the round's median norm
    moved = {"w": rnd.theta["w"] - np.float32(median / rnd.norms[2]) * rnd.deltas[2]["w"]}
    np.testing.assert_array_equal(rnd.yielded[2]["w"], moved["w"])
    assert np.linalg.norm(rnd.theta["w"] - moved["w"]) == pytest.approx(median, rel=1e-5)
    assert verdicts[2].score == pytest.approx(val_loss(rnd.theta, 4) - val_loss(moved, 4))
    # those at most at the median are not scaled
    for i in (0, 1, 3, 4):
        if rnd.norms[i] <= median:
            want = rnd.theta["w"] - rnd.deltas[i]["w"]
            np.testing.assert_array_equal(rnd.yielded[i]["w"], want)


# ------------------------------------------------------------- detail, ledger replay


def test_detail_is_json_and_nulls_non_finite_numbers():
    rng = np.random.default_rng(21)
    for _ in range(30):
        vals = [math.nan, math.inf, -math.inf, float(rng.standard_normal())]
        score, margin = (vals[int(i)] for i in rng.integers(4, size=2))
        rating = (
            ratings.Rating(float(rng.uniform(0, 50)), float(rng.uniform(0, 9)))
            if rng.random() < 0.5
            else None
        )
        v = judging.Verdict(
            validated=bool(rng.random() < 0.7),
            score=score,
            reason="" if rng.random() < 0.5 else "lazy: x",
            performance=float(rng.standard_normal()),
            assigned={"margin": margin, "pass": False, "batches": [1, 3], "gain": math.inf},
            rating=rating,
            weight=float(rng.uniform(0, 5)),
        )
        d = v.detail()
        text = protocol.dumps(d)  # allow_nan=False: raises on a nan left in
        assert json.loads(text) == d
        r = rating or ratings.DEFAULT
        assert d["rating"] == [r.mu, r.sigma] and d["weight"] == v.weight
        assert d["assigned"]["gain"] is None
        assert (d["assigned"]["margin"] is None) == (not math.isfinite(margin))
        if v.validated:
            assert d["failed"] == v.failed
            assert d["performance"] == (None if v.failed else v.performance)
        else:
            assert "performance" not in d and "failed" not in d
        # what the ledger's replay reads back
        got = ratings.detail_of(
            {"key_id": "k", "detail": text.decode(), "round": 0, "contributor": "c"}
        )
        assert got["rating"] == r and got["validated"] == v.validated


def test_unjudged_detail():
    rng = np.random.default_rng(22)
    rating = ratings.Rating(float(rng.uniform(0, 50)), float(rng.uniform(0, 9)))
    assert judging.unjudged_detail(False, rating) == {"validated": False, "weight": 0.0}
    assert judging.unjudged_detail(False, None) == {"validated": False, "weight": 0.0}
    signed = judging.unjudged_detail(True, rating)
    assert signed == {"validated": False, "weight": 0.0, "rating": [rating.mu, rating.sigma]}
    default = judging.unjudged_detail(True, None)
    assert default["rating"] == [ratings.DEFAULT.mu, ratings.DEFAULT.sigma]
    for d in (signed, default):
        assert json.loads(protocol.dumps(d)) == d


def test_judged_rounds_replay_in_the_ledger_checks():
    """What judge() records (ratings, weights, rewards) is what ratings.check_rounds
    recomputes from the entries, round after round, with sampling, lazy ones and newcomers."""
    rng = np.random.default_rng(23)
    prior = {}  # the ledger's replay starts from nothing: everyone is new in round 0
    entries, unvalidated = [], 0
    for r in range(4):
        names = [f"h{i}" for i in range(6)] + ["lazy", f"new{r}"]
        rnd = honest_round(rng, names, lazy={"lazy"})
        _, verdicts = rnd.judge(
            Policy(validate_sample=3, assigned_batches=3), int(rng.integers(2**62)), prior
        )
        for n, v in zip(names, verdicts, strict=True):
            entries.append(
                {
                    "round": r,
                    "contributor": n,
                    "key_id": "k" + n,
                    "score": v.score,
                    "accepted": not v.failed,
                    "reward": v.reward,
                    "detail": protocol.dumps(v.detail()).decode(),
                }
            )
            prior[n] = v.rating
            unvalidated += not v.validated
    assert unvalidated > 0
    assert ratings.check_rounds(entries) == []
    assert ratings.latest(entries) == prior
    # a tampered reward is found
    i = max(i for i, e in enumerate(entries) if e["accepted"])
    entries[i] = {**entries[i], "reward": entries[i]["reward"] + 0.01}
    assert ratings.check_rounds(entries)
