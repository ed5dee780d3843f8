"""Contributor ratings (`near_jax.contrib.ratings`): the update against openskill itself, the
round's weights and shares, and the audit replaying a recorded history."""

import json
import math
import random
import statistics

import pytest
from openskill.models import PlackettLuce

from near_jax.contrib import ratings
from near_jax.contrib.ratings import DEFAULT, Rating, WeightInput
from near_jax.diloco.protocol import dumps

MODEL = PlackettLuce()


def random_prior(rng, names):
    return {n: Rating(rng.uniform(5, 45), rng.uniform(0.5, 9)) for n in names}


def openskill_update(prior, order, ranks):
    """A direct openskill call: players in `order`, lower rank = better."""
    teams = [[MODEL.rating(mu=prior[n].mu, sigma=prior[n].sigma)] for n in order]
    out = MODEL.rate(teams, ranks=ranks)
    return {n: (t[0].mu, t[0].sigma) for n, t in zip(order, out, strict=True)}


def assert_close(got, want, rel=1e-12):
    assert set(got) == set(want)
    for n, (mu, sigma) in want.items():
        assert math.isclose(got[n].mu, mu, rel_tol=rel), n
        assert math.isclose(got[n].sigma, sigma, rel_tol=rel), n


# ------------------------------------------------------------------------------- update


def test_default_is_openskills_and_earns_nothing():
    assert (DEFAULT.mu, DEFAULT.sigma) == (MODEL.mu, MODEL.sigma)
    assert DEFAULT.ordinal <= 0 and math.isclose(DEFAULT.ordinal, 0, abs_tol=1e-12)
    assert Rating(30, 2).ordinal == 24.0 and isinstance(Rating(30, 2).mu, float)


@pytest.mark.parametrize("seed", range(5))
def test_update_matches_openskill_on_random_performances(seed):
    rng = random.Random(seed)
    names = [f"c{i}" for i in rng.sample(range(100), rng.randint(2, 12))]
    prior = random_prior(rng, names[: len(names) // 2])  # the others are newcomers
    performance = {n: rng.gauss(0, 1) for n in names}
    got = ratings.update(prior, performance)
    full = {n: prior.get(n, DEFAULT) for n in names}
    teams = [[MODEL.rating(mu=full[n].mu, sigma=full[n].sigma)] for n in names]
    out = MODEL.rate(teams, scores=[performance[n] for n in names])  # openskill ranks them
    want = {n: (t[0].mu, t[0].sigma) for n, t in zip(names, out, strict=True)}
    assert_close(got, want)
    best = max(names, key=performance.get)
    worst = min(names, key=performance.get)
    assert got[best].mu > full[best].mu and got[worst].mu < full[worst].mu


@pytest.mark.parametrize("seed", range(3))
def test_update_is_independent_of_dict_order(seed):
    rng = random.Random(seed)
    names = [f"n{i}" for i in range(40)]
    prior = random_prior(rng, names)
    performance = {n: float(rng.randint(0, 3)) for n in names}  # ties: where order could leak
    first = ratings.update(prior, performance)
    for _ in range(8):
        order = rng.sample(names, len(names))
        again = ratings.update(
            {n: prior[n] for n in reversed(order)}, {n: performance[n] for n in order}
        )
        assert again == first  # exactly: same floats


def test_ties_share_a_rank():
    rng = random.Random(7)
    names = sorted(f"p{i}" for i in range(8))
    prior = random_prior(rng, names)
    performance = {n: rng.choice([0.5, 1.5, 2.5]) for n in names}
    got = ratings.update(prior, performance)
    levels = sorted(set(performance.values()), reverse=True)
    dense = [float(levels.index(performance[n])) for n in names]  # another rank numbering
    assert_close(got, openskill_update(prior, names, dense), rel=0)
    same = ratings.update({}, {"a": 1.0, "b": 1.0, "c": 0.0})  # equal priors, tied
    assert same["a"] == same["b"] and same["a"].mu > same["c"].mu


def test_failures_rank_last_tied_and_lose_rating():
    rng = random.Random(3)
    names = sorted(f"q{i}" for i in range(6))
    prior = random_prior(rng, names)
    failed = {"q1", "q4"}
    performance = {n: -math.inf if n in failed else rng.gauss(0, 1) for n in names}
    got = ratings.update(prior, performance)
    good = sorted((n for n in names if n not in failed), key=performance.get, reverse=True)
    ranks = [float(good.index(n)) if n in good else float(len(good)) for n in names]
    assert_close(got, openskill_update(prior, names, ranks), rel=0)
    assert all(got[n].mu < prior[n].mu for n in failed)


def test_fewer_than_two_players_change_nothing():
    prior = {"a": Rating(30.0, 3.0)}
    assert ratings.update(prior, {}) == {}
    assert ratings.update(prior, {"a": 1.0}) == prior
    assert ratings.update(prior, {"z": -math.inf}) == {"z": DEFAULT}


def test_keeps_failing_sinks_while_honest_ones_rise():
    rng = random.Random(11)
    honest = [f"h{i}" for i in range(8)]
    book: dict[str, Rating] = {}
    history = []
    for _ in range(20):
        performance = {n: rng.gauss(0, 1) for n in honest} | {"bad": -math.inf}
        book |= ratings.update(book, performance)
        history.append(book["bad"].ordinal)
    assert history[2] < -5 and all(b < a for a, b in zip(history, history[1:], strict=False))
    ordinals = [book[n].ordinal for n in honest]
    assert sum(o > 0 for o in ordinals) >= 6 and statistics.mean(ordinals) > 5
    assert min(ordinals) > book["bad"].ordinal + 20
    w = ratings.weights([WeightInput(book[n], False, None) for n in [*honest, "bad"]])
    assert w[-1] == 0 and sum(x > 0 for x in w[:-1]) >= 6


def test_update_refuses_bad_values_in_one_line():
    nan_rating = object.__new__(Rating)  # frozen is not sealed: a forged Rating
    object.__setattr__(nan_rating, "mu", math.nan)
    object.__setattr__(nan_rating, "sigma", 1.0)
    bad = [
        ({"a": nan_rating}, {"a": 1.0, "b": 0.0}),
        ({"a": (25.0, 8.0)}, {"a": 1.0, "b": 0.0}),
        ({"a": Rating(1e300, 1.0)}, {"a": 1.0, "b": 0.0}),  # exp() overflows
        ({}, {"a": math.nan, "b": 0.0}),
        ({}, {"a": math.inf, "b": 0.0}),
        ({}, {"a": "1", "b": 0.0}),
        ({}, {"a": True, "b": 0.0}),
        ({}, {"a": 10**400, "b": 0.0}),
        ({}, {1: 1.0, "b": 0.0}),
        ({}, {"": 1.0, "b": 0.0}),
    ]
    for prior, performance in bad:
        with pytest.raises(ValueError) as err:
            ratings.update(prior, performance)
        assert "\n" not in str(err.value)
    for mu, sigma in [(math.inf, 1.0), (1.0, math.nan), (1.0, -1.0), ("1", 1.0), (1.0, None)]:
        with pytest.raises(ValueError):
            Rating(mu, sigma)


# ------------------------------------------------------------------------------ weights


def expected_weights(entries):
    """The docstring's formula, written out again."""
    pos = sorted(e.score for e in entries if e.validated and e.score is not None and e.score > 0)
    n = len(pos)
    median = (pos[n // 2] if n % 2 else (pos[n // 2 - 1] + pos[n // 2]) / 2) if n else None
    out = []
    for e in entries:
        if not e.validated:
            factor = 1.0
        elif median is None:
            factor = 0.0
        else:
            factor = min(3.0, max(0.0, e.score or 0.0) / median)
        out.append(max(0.0, e.rating.mu - 3 * e.rating.sigma) * factor)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_weights_and_shares_on_random_rounds(seed):
    rng = random.Random(seed)
    entries = [
        WeightInput(
            Rating(rng.uniform(0, 50), rng.uniform(0.5, 9)),
            rng.random() < 0.6,
            rng.choice([None, rng.gauss(0.05, 0.1), rng.expovariate(10)]),
        )
        for _ in range(rng.randint(1, 15))
    ]
    w = ratings.weights(entries)
    assert w == pytest.approx(expected_weights(entries), rel=1e-12, abs=0)
    s = ratings.shares(entries)
    if sum(w) > 0:
        assert math.fsum(s) == pytest.approx(1.0) and s == pytest.approx([x / sum(w) for x in w])
    else:
        assert s == [0.0] * len(entries)


def test_newcomer_cap_unvalidated_and_no_positive_scores():
    strong = Rating(40.0, 2.0)  # ordinal 34
    newcomer = WeightInput(DEFAULT, True, 10.0)
    w = ratings.weights([newcomer, WeightInput(strong, True, 0.1)])
    assert w[0] == 0.0 and w[1] > 0  # the newcomer's top score earns nothing
    lucky = ratings.weights([WeightInput(strong, True, s) for s in [0.1, 0.1, 0.1, 50.0]])
    assert lucky == [34.0, 34.0, 34.0, 3 * 34.0]
    unvalidated = ratings.weights([WeightInput(strong, False, 1e9), WeightInput(strong, True, 0.2)])
    assert unvalidated == [34.0, 34.0]
    none_positive = [WeightInput(strong, True, -0.1), WeightInput(strong, True, None)]
    none_positive += [WeightInput(strong, True, -math.inf), WeightInput(strong, False, None)]
    assert ratings.weights(none_positive) == [0.0, 0.0, 0.0, 34.0]
    assert ratings.shares(none_positive) == [0.0, 0.0, 0.0, 1.0]
    assert ratings.shares([WeightInput(DEFAULT, False, None)]) == [0.0]
    assert ratings.shares([]) == []
    for bad in [WeightInput(strong, 1, 0.1), WeightInput(strong, True, "0.1"), (strong, True, 0)]:
        with pytest.raises(ValueError):
            ratings.weights([bad])


# ------------------------------------------------------------------------------- ledger


def simulate(seed, rounds=8, before=2):
    """Ledger entries as an aggregator would record them: `before` rounds without ratings,
    then each round: validated ones play (-inf: failed, rejected), accepted ones share."""
    rng = random.Random(seed)
    names = [f"c{i}" for i in range(7)]
    entries, book, seq = [], {}, 0

    def add(**fields):
        nonlocal seq
        seq += 1
        entries.append({"seq": seq, "applied": fields["accepted"], "reason": "", **fields})

    for rnd in range(before):
        for n in names:
            add(round=rnd, contributor=n, key_id="k" + n, score=0.1, accepted=True, reward=1 / 7)
    for rnd in range(before, before + rounds):
        validated = {n: rng.random() < 0.7 for n in names}
        perf = {n: -math.inf if n == "c6" else rng.gauss(0, 1) for n in names if validated[n]}
        book |= ratings.update(book, perf)
        accepted = [n for n in names if perf.get(n, 0.0) > -math.inf]
        score = {n: rng.gauss(0.05, 0.1) if validated[n] else None for n in names}
        inputs = [WeightInput(book.get(n, DEFAULT), validated[n], score[n]) for n in accepted]
        w = dict(zip(accepted, ratings.weights(inputs), strict=True))
        paid = dict(zip(accepted, ratings.shares(inputs), strict=True))
        for n in names:
            rating = book.get(n, DEFAULT)
            detail = ratings.detail_text(validated[n], perf.get(n), rating, w.get(n, 0.0))
            add(
                round=rnd,
                contributor=n,
                key_id="k" + n,
                score=score[n],
                accepted=n in accepted,
                reward=paid.get(n, 0.0),
                detail=detail,
            )
        detail = ratings.detail_text(False, None, None, 0.0)  # unsigned: not held against c0
        add(
            round=rnd,
            contributor="c0",
            key_id="",
            score=None,
            accepted=False,
            reward=0.0,
            detail=detail,
        )
    return entries, book


def test_detail_round_trips_and_is_canonical():
    text = ratings.detail_text(True, -math.inf, Rating(20.5, 3.25), 0.75)
    assert text == dumps(json.loads(text)).decode()
    entry = {"contributor": "a", "key_id": "k", "round": 3, "detail": text}
    assert ratings.detail_of(entry) == {
        "validated": True,
        "performance": -math.inf,
        "rating": Rating(20.5, 3.25),
        "weight": 0.75,
    }
    for empty in ["", "{}"]:
        assert ratings.detail_of({**entry, "detail": empty}) == {}
    assert ratings.detail_of({"contributor": "a", "key_id": "k", "round": 0}) == {}


@pytest.mark.parametrize(
    "text",
    [
        "{",
        "[1, 2]",
        '"x"',
        '{"validated": 1, "performance": null, "rating": [25, 8], "weight": 0}',
        '{"validated": false, "performance": 0.5, "rating": [25, 8], "weight": 0}',
        '{"validated": true, "performance": NaN, "rating": [25, 8], "weight": 0}',
        '{"validated": true, "performance": 1e400, "rating": [25, 8], "weight": 0}',
        '{"validated": true, "performance": 1, "rating": [25], "weight": 0}',
        '{"validated": true, "performance": 1, "rating": [25, -8], "weight": 0}',
        '{"validated": true, "performance": 1, "rating": "25,8", "weight": 0}',
        '{"validated": true, "performance": 1, "weight": 0}',
        '{"validated": true, "performance": 1, "rating": [25, 8], "weight": -1}',
        '{"validated": true, "performance": 1, "rating": [25, 8], "weight": true}',
        '{"validated": true, "performance": 1, "rating": [25, 8]}',
        "[" * 100000,
    ],
)
def test_malformed_detail_is_one_valueerror_line(text):
    with pytest.raises(ValueError) as err:
        ratings.detail_of({"contributor": "a", "key_id": "k", "round": 1, "seq": 4, "detail": text})
    assert "\n" not in str(err.value) and "entry 4" in str(err.value)
    for entry in [{"contributor": "a", "key_id": "k", "round": 1, "detail": 5}, [("detail", "")]]:
        with pytest.raises(ValueError):
            ratings.detail_of(entry)
    unsigned = ratings.detail_text(True, 1.0, Rating(25, 8), 0.0)  # a rating without a key
    with pytest.raises(ValueError):
        ratings.detail_of({"contributor": "a", "key_id": "", "round": 1, "detail": unsigned})


def test_latest_takes_each_signed_contributors_last_rating():
    entries, book = simulate(seed=5)
    rng = random.Random(0)
    assert ratings.latest(rng.sample(entries, len(entries))) == book  # sorted by round/seq
    forged = {"seq": 10**6, "round": 99, "contributor": "c1", "key_id": "", "detail": "{}"}
    assert ratings.latest([*entries, forged]) == book
    with pytest.raises(ValueError):
        ratings.latest([*entries, {**forged, "round": "99"}])


@pytest.mark.parametrize("seed", range(3))
def test_check_rounds_passes_a_replayed_history(seed):
    entries, _ = simulate(seed)
    assert ratings.check_rounds(entries) == []
    assert ratings.check_rounds(random.Random(seed).sample(entries, len(entries))) == []
    assert any(e["reward"] > 0 for e in entries if e.get("detail"))  # someone was paid


def test_check_rounds_reports_a_tampered_rating_reward_and_weight():
    entries, _ = simulate(seed=1)
    signed = [e for e in entries if e.get("detail") and e["key_id"]]
    victim = signed[len(signed) // 2]
    d = json.loads(victim["detail"])
    d["rating"][0] *= 1 + 1e-7
    tampered = [{**e, "detail": json.dumps(d)} if e is victim else e for e in entries]
    problems = ratings.check_rounds(tampered)
    assert problems and f"entry {victim['seq']} " in problems[0] and "rating" in problems[0]
    paid = next(e for e in signed if e["reward"] > 0)
    problems = ratings.check_rounds(
        [{**e, "reward": e["reward"] + 1e-6} if e is paid else e for e in entries]
    )
    assert len(problems) == 1 and f"round {paid['round']}: rewards" in problems[0]
    d = json.loads(paid["detail"])
    d["weight"] *= 2
    problems = ratings.check_rounds(
        [{**e, "detail": json.dumps(d)} if e is paid else e for e in entries]
    )
    assert len(problems) == 1 and "weight" in problems[0]
    idle = next(e for e in signed if not json.loads(e["detail"])["validated"])
    d = json.loads(idle["detail"])  # not a player: its rating must stay the recorded one
    d["rating"][1] += 0.01
    problems = ratings.check_rounds(
        [{**e, "detail": json.dumps(d)} if e is idle else e for e in entries]
    )
    assert problems and f"entry {idle['seq']} " in problems[0] and "rating" in problems[0]
    gap = [{**e, "detail": ""} if e is paid else e for e in entries]
    assert any("no detail" in p for p in ratings.check_rounds(gap))


def test_check_rounds_never_raises_on_junk():
    entries, _ = simulate(seed=2, rounds=4)
    rng = random.Random(9)
    junk = [None, "x", [], {}, True, -1, math.nan, 10**400, "{", '{"validated": true}']
    for _ in range(60):
        mutated = [dict(e) for e in entries]
        for _ in range(rng.randint(1, 3)):
            e = rng.choice(mutated)
            e[
                rng.choice(
                    [
                        "round",
                        "seq",
                        "contributor",
                        "key_id",
                        "score",
                        "accepted",
                        "reward",
                        "detail",
                    ]
                )
            ] = rng.choice(junk)
        problems = ratings.check_rounds(mutated)
        assert all(isinstance(p, str) and "\n" not in p for p in problems)
    assert ratings.check_rounds([None, 5]) and ratings.check_rounds([]) == []
