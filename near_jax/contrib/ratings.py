"""Contributor ratings over rounds (OpenSkill's Plackett-Luce) and the round's reward weights.

Ratings
-------
A contributor's skill is a Weng-Lin rating (mu, sigma): a belief about its skill and how
unsure it is. Each round, the contributors whose contributions were validated are the players
of one game, ranked by performance (higher is better, ties share a rank, -inf — failed a
check — is tied last), and `update` applies Plackett-Luce to them (openskill, the model
templar's Gauntlet rates its peers with). Newcomers start at the model's default, mu = 25,
sigma = 25/3. The conservative estimate `ordinal` = mu − 3·sigma is what the rewards use.

Weights
-------
For the accepted contributions of a round, with the contributors' ratings after its update:

    w_i      = max(0, ordinal_i) × factor_i                     share_i = w_i / Σ_j w_j
    factor_i = min(3, max(0, score_i) / median⁺)   validated this round
             = 1                                   not validated this round

median⁺ is the median of the positive scores of the round's validated contributions; when
none is positive, factor_i is 0 for a validated one (no evidence of help) and still 1 for the
others. A missing or non-finite score counts as 0, as in `screening.reward_shares`. Why:
- the ordinal: a newcomer (ordinal 0 at the default) or a contributor that keeps failing
  earns nothing until its rating climbs, so fresh keys (sybils) and cheaters earn nothing;
- the score factor: fresh evidence counts — a validated contribution is paid for what it
  did this round, relative to the round's typical contribution;
- the cap at 3: one lucky batch cannot take the round;
- factor 1 unvalidated: with sampled validation most contributions have no fresh score, and
  the contributor's record speaks for it.
All shares are 0 when Σ w is 0 (or not finite).

Ledger detail
-------------
A ledger entry's `detail` is the canonical JSON text (`detail_text`) of

    {"validated": bool, "performance": float | null, "rating": [mu, sigma], "weight": float}

"" or "{}" meaning nothing recorded (runs from before ratings). performance is null when not
validated, and also for a validated one that failed a check (-inf: JSON has no infinity).
rating is the contributor's rating after the round, in signed entries (non-empty key_id)
only: those are the players when validated, and unsigned rejections are never held against a
name. weight is the entry's w (0 when rejected). `check_rounds` replays all of it.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from openskill.models import PlackettLuce

from near_jax._io import one_line, short_repr

_MODEL = PlackettLuce()  # stateless once built (rate() copies its teams); defaults only
MAX_FACTOR = 3.0
REL_TOLERANCE = 1e-9  # ratings: another libm may round exp/log in the last ulp
REWARD_TOLERANCE = 1e-9


def _number(what: str, value: Any, *, neg_inf: bool = False) -> float:
    # bool is an int subclass; True as a rating is a bug, not a number
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{what} must be a float: {short_repr(value)}")
    try:
        out = float(value)
    except OverflowError:  # an int too large for a float
        raise ValueError(f"{what} is out of range: {short_repr(value)}") from None
    if not (math.isfinite(out) or (neg_inf and out == -math.inf)):
        raise ValueError(f"{what} must be finite{' or -inf' if neg_inf else ''}: {out!r}")
    return out


@dataclasses.dataclass(frozen=True)
class Rating:
    """A Weng-Lin rating: mean skill mu and its uncertainty sigma (finite, sigma ≥ 0)."""

    mu: float
    sigma: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "mu", _number("rating mu", self.mu))
        object.__setattr__(self, "sigma", _number("rating sigma", self.sigma))
        if self.sigma < 0:
            raise ValueError(f"rating sigma must be ≥ 0: {self.sigma!r}")

    @property
    def ordinal(self) -> float:
        """mu − 3·sigma: the skill the contributor has with ~99.9% confidence."""
        return self.mu - 3.0 * self.sigma


DEFAULT = Rating(_MODEL.mu, _MODEL.sigma)


def update(prior: Mapping[str, Rating], performance: Mapping[str, float]) -> dict[str, Rating]:
    """The ratings after one round of the players in `performance` (see the module docstring);
    those missing from `prior` start at DEFAULT. ValueError (one line) for a bad value."""
    players = sorted(performance, key=str)  # by name: independent of dict order
    scores, before = [], []
    for name in players:
        if not isinstance(name, str) or not name:
            raise ValueError(f"a player's name must be a non-empty str: {short_repr(name)}")
        scores.append(_number(f"{name}'s performance", performance[name], neg_inf=True))
        rating = prior.get(name, DEFAULT)
        if not isinstance(rating, Rating):
            raise ValueError(f"{name}'s prior is not a Rating: {short_repr(rating)}")
        before.append(Rating(rating.mu, rating.sigma))  # re-checked: frozen is not sealed
    if len(players) < 2:
        return dict(zip(players, before, strict=True))
    ascending = sorted(scores)
    # competition rank, 0 = best: how many did strictly better (ties share; -inf ties last)
    ranks = [float(len(scores) - bisect.bisect_right(ascending, s)) for s in scores]
    teams = [[_MODEL.rating(mu=r.mu, sigma=r.sigma)] for r in before]
    try:
        after = _MODEL.rate(teams, ranks=ranks)
        return {
            name: Rating(team[0].mu, team[0].sigma)
            for name, team in zip(players, after, strict=True)
        }
    except (ArithmeticError, ValueError) as e:  # absurd priors overflow exp()
        raise ValueError(f"rating update failed: {one_line(e)}") from None


@dataclasses.dataclass(frozen=True)
class WeightInput:
    """One accepted contribution of the round: its contributor's rating after the round's
    update, whether it was validated this round, and its score (None: not scored)."""

    rating: Rating
    validated: bool
    score: float | None


def _fresh_score(score: Any) -> float:
    if score is None:
        return 0.0
    if isinstance(score, bool) or not isinstance(score, int | float):
        raise ValueError(f"a score must be a float or None: {short_repr(score)}")
    try:
        value = float(score)
    except OverflowError:
        return 0.0
    return max(0.0, value) if math.isfinite(value) else 0.0  # as screening.reward_shares


def weights(entries: Sequence[WeightInput]) -> list[float]:
    """w_i = max(0, ordinal_i) × factor_i for the round's accepted contributions (see the
    module docstring)."""
    scores = []
    for e in entries:
        ok = isinstance(e, WeightInput) and isinstance(e.rating, Rating)
        if not ok or not isinstance(e.validated, bool):
            raise ValueError(f"a weight input needs a Rating and a bool: {short_repr(e)}")
        scores.append(_fresh_score(e.score))
    positive = [s for e, s in zip(entries, scores, strict=True) if e.validated and s > 0]
    median = statistics.median(positive) if positive else 0.0
    out = []
    for e, s in zip(entries, scores, strict=True):
        if not e.validated:
            factor = 1.0
        else:
            factor = min(MAX_FACTOR, s / median) if median > 0 else 0.0
        out.append(max(0.0, e.rating.ordinal) * factor)
    return out


def shares(entries: Sequence[WeightInput]) -> list[float]:
    """share_i = w_i / Σ w: the round's one unit of reward split by weight (all 0 when Σ w
    is 0 or not finite)."""
    w = weights(entries)
    total = math.fsum(w)
    if not (total > 0 and math.isfinite(total)):
        return [0.0] * len(w)
    return [x / total for x in w]


# ---------------------------------------------------------------------------- ledger detail


def detail_text(
    validated: bool, performance: float | None, rating: Rating | None, weight: float
) -> str:
    """The canonical JSON text of an entry's detail (rating None: an unsigned entry)."""
    perf = None if performance is None or performance == -math.inf else performance
    obj: dict[str, Any] = {"validated": validated, "performance": perf, "weight": weight}
    if rating is not None:
        obj["rating"] = [rating.mu, rating.sigma]
    # as protocol.dumps (sorted keys, no spaces, no NaN), without importing the protocol
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _where(entry: Mapping[str, Any]) -> str:
    seq = f" {short_repr(entry['seq'], 30)}" if "seq" in entry else ""
    return f"ledger entry{seq} (round {short_repr(entry.get('round'), 30)}, " + (
        f"{short_repr(entry.get('contributor'), 60)})"
    )


def _signed(entry: Mapping[str, Any]) -> bool:
    return bool(entry.get("key_id"))


def detail_of(entry: Mapping[str, Any]) -> dict[str, Any]:
    """The entry's detail: {} when nothing is recorded, else validated (bool), performance
    (float, -inf for a failed check, None when not validated), rating (a Rating, None when
    unsigned) and weight (float ≥ 0). ValueError, one line, when malformed."""
    if not isinstance(entry, Mapping):
        raise ValueError(f"a ledger entry must be a dict: {short_repr(entry)}")
    text, where = entry.get("detail", ""), _where(entry)
    if not isinstance(text, str) or not isinstance(entry.get("key_id", ""), str):
        raise ValueError(f"{where}: detail and key_id must be str")
    if text in ("", "{}"):
        return {}
    try:
        obj = json.loads(text)  # it takes NaN, ±Infinity: the checks below refuse them
    except (ValueError, RecursionError) as e:  # RecursionError: absurdly nested JSON
        raise ValueError(f"{where}: detail is not JSON: {one_line(e, 120)}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: detail is not a JSON object")
    try:
        validated = obj.get("validated")
        if not isinstance(validated, bool):
            raise ValueError(f"validated must be a bool: {short_repr(validated)}")
        performance = obj.get("performance")
        if not validated and performance is not None:
            raise ValueError("performance recorded for a contribution not validated")
        if validated:
            performance = -math.inf if performance is None else _number("performance", performance)
        weight = _number("weight", obj.get("weight"))
        if weight < 0:
            raise ValueError(f"weight must be ≥ 0: {weight!r}")
        pair = obj.get("rating")
        if not _signed(entry):
            if pair is not None:
                raise ValueError("an unsigned entry carries a rating")
            rating = None
        elif not isinstance(pair, list) or len(pair) != 2:
            raise ValueError(f"rating must be [mu, sigma]: {short_repr(pair)}")
        else:
            rating = Rating(pair[0], pair[1])
    except ValueError as e:
        raise ValueError(f"{where}: detail {one_line(e, 160)}") from None
    return {"validated": validated, "performance": performance, "rating": rating, "weight": weight}


def _ordered(
    entries: Iterable[Mapping[str, Any]], problems: list[str] | None = None
) -> list[tuple[int, Mapping[str, Any]]]:
    """(round, entry) in round/seq order (append order where there is no seq). A malformed
    entry raises ValueError, or is left out with a line in `problems` when given."""
    keyed = []
    for i, e in enumerate(entries):
        try:
            if not isinstance(e, Mapping):
                raise ValueError(f"a ledger entry must be a dict: {short_repr(e)}")
            rnd, seq, name = e.get("round"), e.get("seq", i), e.get("contributor")
            for ok in (rnd, seq):
                if isinstance(ok, bool) or not isinstance(ok, int) or ok < 0:
                    raise ValueError(f"{_where(e)}: round and seq must be ints ≥ 0")
            if not isinstance(name, str) or not name:
                raise ValueError(f"{_where(e)}: contributor must be a non-empty str")
        except ValueError as err:
            if problems is None:
                raise
            problems.append(one_line(err))
            continue
        keyed.append(((rnd, seq, i), e))
    keyed.sort(key=lambda kv: kv[0])
    return [(key[0], e) for key, e in keyed]


def latest(entries: Iterable[Mapping[str, Any]]) -> dict[str, Rating]:
    """Each contributor's latest recorded rating (signed entries with detail only)."""
    out: dict[str, Rating] = {}
    for _, e in _ordered(entries):
        detail = detail_of(e)
        if detail and _signed(e):
            out[e["contributor"]] = detail["rating"]
    return out


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=REL_TOLERANCE, abs_tol=1e-12)


def _round_problems(rnd: int, rows: list, recorded: dict[str, Rating]) -> list[str]:
    """A round's recorded ratings against the replay, and its rewards against `shares`."""
    problems = []
    performance: dict[str, float] = {}
    for e, d in rows:
        if _signed(e) and d["validated"]:
            if e["contributor"] in performance:
                problems.append(f"{_where(e)}: a second validated entry of the contributor")
                continue
            performance[e["contributor"]] = d["performance"]
    try:
        replay = update(recorded, performance)
    except ValueError as err:
        return [*problems, f"round {rnd}: cannot replay the ratings: {one_line(err)}"]
    for e, d in rows:
        if _signed(e):
            name = e["contributor"]
            want, got = replay.get(name, recorded.get(name, DEFAULT)), d["rating"]
            if not (_close(got.mu, want.mu) and _close(got.sigma, want.sigma)):
                problems.append(
                    f"{_where(e)}: rating [{got.mu!r}, {got.sigma!r}] differs from the "
                    f"replay [{want.mu!r}, {want.sigma!r}]"
                )
    accepted = [(e, d) for e, d in rows if e.get("accepted") is True]
    try:
        # an unsigned entry has no rating: DEFAULT weighs nothing (its ordinal is ≤ 0)
        inputs = [
            WeightInput(d["rating"] or DEFAULT, d["validated"], e["score"]) for e, d in accepted
        ]
        w, want_shares = weights(inputs), shares(inputs)
        paid = [_number("reward", e.get("reward")) for e, _ in accepted]
    except (KeyError, ValueError) as err:
        return [*problems, f"round {rnd}: cannot recompute the rewards: {one_line(err)}"]
    wrong = [
        f"{short_repr(e['contributor'], 40)} {got!r} (want {want!r})"
        for (e, _), got, want in zip(accepted, paid, want_shares, strict=True)
        if abs(got - want) > REWARD_TOLERANCE
    ]
    if wrong:  # the first few name the round's fault; one line stays readable
        more = f"; and {len(wrong) - 3} more" if len(wrong) > 3 else ""
        problems.append(f"round {rnd}: rewards differ from shares: {'; '.join(wrong[:3])}{more}")
    weight_of = {id(e): x for (e, _), x in zip(accepted, w, strict=True)}
    for e, d in rows:
        want = weight_of.get(id(e), 0.0)
        if not _close(d["weight"], want):
            problems.append(f"{_where(e)}: weight {d['weight']!r} differs from {want!r}")
    return problems


def check_rounds(entries: Iterable[Mapping[str, Any]]) -> list[str]:
    """Problems, one line each, of the ratings and rewards recorded in ledger entries: a
    rating that the round-by-round replay does not give, a round paying other than `shares`,
    a recorded weight other than w, a malformed detail. Rounds without detail are skipped
    (until one has it: from then on every entry must carry it)."""
    problems: list[str] = []
    ordered = _ordered(entries, problems)
    rounds: dict[int, list[tuple[Mapping[str, Any], dict[str, Any]]]] = {}
    for rnd, e in ordered:
        try:
            rounds.setdefault(rnd, []).append((e, detail_of(e)))
        except ValueError as err:
            problems.append(one_line(err))
    recorded: dict[str, Rating] = {}  # each contributor's rating before the round
    started = False
    for rnd, rows in rounds.items():
        if not any(d for _, d in rows) and not started:
            continue  # recorded before ratings existed
        started = True
        problems.extend(f"{_where(e)}: no detail, in a run with ratings" for e, d in rows if not d)
        problems.extend(_round_problems(rnd, [(e, d) for e, d in rows if d], recorded))
        for e, d in rows:
            if d and _signed(e):
                recorded[e["contributor"]] = d["rating"]
    return problems
