"""How a contributor round judges the contributions that passed screening.

    validated  with contrib.validate_sample = K > 0: K of them, drawn by the round's seed
               (revealed only in the decision and committed a round ahead, so nobody can
               predict who is checked), plus every contributor without a rating yet and every
               one rated below contrib.low_rating; K = 0: all of them. A round costs
               O(K + new + low-rated) model evaluations, not O(N).
    score      the eval-loss gain of θ_r − k·Δ alone on validation batches drawn from the
               seed (k scales Δ down to the round's median norm: inflating buys nothing)
    assigned   (contrib.assigned_data) a difference in differences. On B of the
               contributor's assigned train batches A (its round-r stream,
               `diloco.assignment`; which B of the H it trained on is drawn from the seed)
               and on B random train batches R (a stream seeded by the round's seed),
               compare the loss drop of its Δ with that of the control: the mean update of
               the round's other contributions, at Δ's norm. margin = (gain_Δ(A) − gain_ctl(A)) −
               (gain_Δ(R) − gain_ctl(R)) > 0 passes: a contributor that trained on its
               assignment improves it more than the common update does, beyond how it
               compares on random data; one that did not ("lazy": other data, the scoring
               split, someone else's Δ) has a margin around 0 and fails about half the
               time — and ranks last in the ratings every time. (Comparing gain_Δ(A) with
               gain_Δ(R) alone mixes in how much any update improves those batches: on a
               small transformer early in training honest islands failed 1 in 4 checks that
               way, none with the control.) A Δ alone in its round has no control: it is
               not checked (untrusted runs want a quorum of several).
    ratings    OpenSkill over the validated contributions (`ratings`), ranked by performance
               = the margin (the score when the check is off); a failed check ranks last.
               Unvalidated contributions keep their rating.
    rewards    `ratings.shares`: the round's unit split by rating and round score.

Unvalidated contributions that passed screening are accepted and applied (the robust rule
still bounds what one of them can do); a validated one that fails is neither.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

from near_jax.contrib import ratings, screening
from near_jax.contrib.policy import Policy

_VALIDATE_DOMAIN = b"near_jax/validate/v1\n"
_INDICES_DOMAIN = b"near_jax/check_batches/v1\n"
_RANDOM_DOMAIN = b"near_jax/random_batches/v1\n"


def _digest(domain: bytes, *parts: Any) -> bytes:
    return hashlib.sha256(domain + repr(parts).encode()).digest()


def validation_set(names: Sequence[str], k: int, seed: int, must: set[str]) -> set[str]:
    """The contributors validated this round: all when k <= 0, else the k first in an order
    drawn from `seed`, plus those in `must` (new or low-rated)."""
    if k <= 0:
        return set(names)
    order = sorted(names, key=lambda n: (_digest(_VALIDATE_DOMAIN, seed, n), n))
    return set(order[:k]) | (must & set(names))


def check_indices(seed: int, name: str, inner_steps: int, count: int) -> list[int]:
    """Which of the H assigned batches (0..H−1) the assigned-data check evaluates: `count`
    distinct ones drawn from the round's seed and the contributor's name."""
    rng = np.random.default_rng(int.from_bytes(_digest(_INDICES_DOMAIN, seed, name)[:8], "little"))
    picked = rng.choice(inner_steps, size=min(count, inner_steps), replace=False)
    return sorted(int(i) for i in picked)


def random_seed(seed: int) -> int:
    """The seed of the round's random train batches (a 31-bit stream seed)."""
    return int.from_bytes(_digest(_RANDOM_DOMAIN, seed)[:4], "little") & 0x7FFFFFFF


@dataclasses.dataclass
class Evaluators:
    """The losses a round is judged with: `val(params, seed)` on validation batches drawn from
    a seed; `train(params, stream_seed, index)` on batch `index` of a train stream (None:
    no assigned-data check); `inner_steps` H, the batches each contributor trains on."""

    val: Callable[[Any, int], float]
    train: Callable[[Any, int, int], float] | None
    inner_steps: int


@dataclasses.dataclass
class Verdict:
    """What judging found about one contribution (the ledger's detail, and its fate)."""

    validated: bool
    score: float | None = None
    reason: str = ""  # "" when it passes
    performance: float | None = None  # what the rating ranks (None: not validated)
    assigned: dict | None = None
    rating: ratings.Rating | None = None
    weight: float = 0.0
    reward: float = 0.0

    @property
    def failed(self) -> bool:
        return bool(self.reason)

    def detail(self) -> dict:
        """The JSON-able detail recorded in the contribution's ledger entry (a non-finite
        number is recorded as null: JSON has none)."""
        out: dict[str, Any] = {"validated": self.validated, "weight": self.weight}
        if self.validated:
            out["performance"] = None if self.failed else self.performance
            out["failed"] = self.failed
        if self.assigned is not None:
            out["assigned"] = self.assigned
        rating = self.rating or ratings.DEFAULT  # every signed entry carries one
        out["rating"] = [rating.mu, rating.sigma]
        return _finite(out)


def unjudged_detail(signed: bool, rating: ratings.Rating | None) -> dict:
    """The detail of an entry rejected before judging (checks, screening, the new-key cap,
    late): not validated, no weight; a signed one carries its unchanged rating."""
    out: dict[str, Any] = {"validated": False, "weight": 0.0}
    if signed:
        rating = rating or ratings.DEFAULT
        out["rating"] = [rating.mu, rating.sigma]
    return out


def _finite(value: Any) -> Any:
    """`value` with every non-finite float replaced by None (recursively)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _mean(values: list[float]) -> float:
    total = math.fsum(values) / len(values)
    return total if math.isfinite(total) else math.nan


def judge(
    policy: Policy,
    evaluators: Evaluators,
    names: Sequence[str],
    norms: Sequence[float],
    seed: int,
    theta: Callable[[], Any],
    moved: Callable[[list[int], list[float | None]], Iterator[Any]],
    prior: dict[str, ratings.Rating],
    assigned_seeds: dict[str, int],
    total: Callable[[], tuple[Any, int]] | None = None,
) -> tuple[float | None, list[Verdict]]:
    """(base val loss or None, a Verdict per contribution) for the screened contributions
    `names` (with their norms). `theta()` gives θ_r (read only if something is validated);
    `moved(indices, scales)` yields θ_r − k·Δ_i for those contributions, one at a time;
    `prior` holds the ratings before this round, `assigned_seeds` each contributor's
    round-r stream seed (contributors without one fail the assigned check); `total()` gives
    (Σ Δ_i, their count) over `names`, for the assigned check's controls."""
    must = {n for n in names if n not in prior or prior[n].ordinal < policy.low_rating}
    chosen = validation_set(names, policy.validate_sample, seed, must)
    verdicts = [Verdict(validated=n in chosen) for n in names]
    picked = [i for i, v in enumerate(verdicts) if v.validated]
    base_loss = None
    check = policy.assigned_data and evaluators.train is not None and total is not None
    if picked:
        params = theta()
        base_loss = float(evaluators.val(params, seed))
        # Rescaled to the round's median norm: inflating a Δ cannot buy score or reward.
        scales = screening.median_scales(list(norms))
        checker = None
        if check and len(names) > 1:
            checker = _Assigned(evaluators, params, seed, policy.assigned_batches, *total())
        for i, tree in zip(picked, moved(picked, [scales[i] for i in picked]), strict=True):
            v, name = verdicts[i], names[i]
            v.score = base_loss - float(evaluators.val(tree, seed))
            if checker is not None:
                k = 1.0 if scales[i] is None else scales[i]
                v.assigned = checker.check(tree, k, name, assigned_seeds.get(name))
            del tree
            v.reason, v.performance = _fate(policy, v)
        if not math.isfinite(base_loss):
            base_loss = None  # JSON has no nan; every score is then -inf, nothing applied
    for v in verdicts:
        if v.score is not None and not math.isfinite(v.score):
            v.score = None
    performance = {
        names[i]: (-math.inf if verdicts[i].failed else verdicts[i].performance) for i in picked
    }
    updated = ratings.update({n: prior[n] for n in performance if n in prior}, performance)
    for name, v in zip(names, verdicts, strict=True):
        v.rating = updated.get(name, prior.get(name))
    accepted = [i for i, v in enumerate(verdicts) if not v.failed]
    inputs = [
        ratings.WeightInput(
            verdicts[i].rating or ratings.DEFAULT, verdicts[i].validated, verdicts[i].score
        )
        for i in accepted
    ]
    for i, w, share in zip(accepted, ratings.weights(inputs), ratings.shares(inputs), strict=True):
        verdicts[i].weight, verdicts[i].reward = w, share
    return base_loss, verdicts


def _norm(tree: Any) -> float:
    return math.sqrt(
        math.fsum(float(np.sum(np.square(x, dtype=np.float64))) for x in jax.tree.leaves(tree))
    )


class _Assigned:
    """The assigned-data check of one round (see the module docstring); `total` is Σ Δ_i
    over the round's `count` screened contributions, each one's control the mean of the
    others."""

    def __init__(
        self, evaluators: Evaluators, params: Any, seed: int, batches: int, total: Any, count: int
    ):
        self.ev, self.params, self.seed, self.batches = evaluators, params, seed, batches
        self.total, self.count = total, count
        self.stream = random_seed(seed)
        self.randoms = list(range(batches))
        self.base_random = [self._loss(params, self.stream, j) for j in self.randoms]

    def _loss(self, tree: Any, stream: int, j: int) -> float:
        return float(self.ev.train(tree, stream, j))

    def _gain(self, tree: Any, stream: int, indices: list[int], base: list[float]) -> float:
        return _mean([b - self._loss(tree, stream, j) for b, j in zip(base, indices, strict=True)])

    def _control(self, moved: Any, k: float) -> Any:
        """θ_r − the mean of the other contributions' Δs, at the norm of k·Δ (moved = θ_r − k·Δ)."""
        scaled = jax.tree.map(lambda p, m: np.asarray(p, np.float32) - m, self.params, moved)
        others = jax.tree.map(lambda t, d: t - d / np.float32(k), self.total, scaled)
        size, target = _norm(others), _norm(scaled)
        if not (math.isfinite(size) and size > 0 and math.isfinite(target)):
            return self.params
        return jax.tree.map(screening.moved(target / size), self.params, others)

    def check(self, moved: Any, k: float, name: str, stream: int | None) -> dict:
        """The check of θ_r − k·Δ (`moved`) from `name`'s assigned `stream`; "pass" says how
        it went (no stream: no registered key, nothing to check: it fails)."""
        if stream is None:
            return {"margin": math.nan, "pass": False, "batches": []}
        control = self._control(moved, k)
        indices = check_indices(self.seed, name, self.ev.inner_steps, self.batches)
        base = [self._loss(self.params, stream, j) for j in indices]
        gain = self._gain(moved, stream, indices, base)
        control_gain = self._gain(control, stream, indices, base)
        gain_random = self._gain(moved, self.stream, self.randoms, self.base_random)
        control_random = self._gain(control, self.stream, self.randoms, self.base_random)
        margin = (gain - control_gain) - (gain_random - control_random)
        return {
            "gain": gain,
            "control_gain": control_gain,
            "random_gain": gain_random,
            "control_random_gain": control_random,
            "margin": margin,
            "pass": bool(margin > 0),
            "batches": indices,
        }


def _fate(policy: Policy, v: Verdict) -> tuple[str, float | None]:
    """(the rejection reason or "", the performance the rating ranks) of a validated one."""
    if v.score is None or not math.isfinite(v.score):
        return "harmful: the eval loss is not finite with this Δ", None
    if policy.screen and v.score < policy.min_score:
        return (
            f"no improvement: score {v.score:.4g} < contrib.min_score={policy.min_score:g}"
        ), None
    if v.assigned is None:
        return "", v.score
    a = v.assigned
    if not a["batches"]:
        return "lazy: no assignment to check (its key is unknown)", None
    if not math.isfinite(a["margin"]):
        return "harmful: the train loss is not finite with this Δ", None
    if not a["pass"]:
        return (
            f"lazy: on its assigned batches its Δ beats the round's mean update by "
            f"{a['gain'] - a['control_gain']:.4g}, on random train batches by "
            f"{a['random_gain'] - a['control_random_gain']:.4g} (margin {a['margin']:.3g} "
            "<= 0): it did not train on its assignment"
        ), None
    return "", a["margin"]
