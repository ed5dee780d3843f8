"""Screening and scoring of contributions (pseudo-gradients, float32 numpy; whole or in shards).

Before robust aggregation (`robust.py`) the aggregator rejects contributions that are
cheap attacks on the protocol rather than on the numbers: free riders pushing a (near) zero
update, norm outliers, replays of an earlier round's applied update, and copies of another
contributor's update of the same round (by cosine; by the cosine after removing the round's
common update, which sees an honest Δ plus noise; by the overlap of top-k positions). It
then scores each contribution by the eval-loss improvement it alone brings to the global
params, and splits rewards by score.

Norms and dot products accumulate float32 values in float64. `screen` gets all of them
from one Gram matrix, computed chunk by chunk with a float64 matrix product (BLAS): N
contributions cost N²·P multiply-adds at BLAS speed instead of N²/2 Python-level dot
products. The Gram matrix adds up over any split of the elements: `GramAccumulator` takes
one shard of every tree at a time and `screen_gram` screens from the result, so the
validator never holds a whole tree (`streamed.py`; `screen_details` is the whole-tree
form: every leaf, then `screen_gram`); scoring likewise takes the moved params one at
a time (`score_moved`). BLAS kernels may round differently on another CPU, which is fine
here: the screening verdicts are recorded in the round's decision and never recomputed
by replays (only the aggregation, `robust.py`, must be bit-exact everywhere). Weird
numbers never raise: a non-finite norm is an outlier and a non-finite cosine counts as 0.
Mismatched inputs (lengths, tree shapes) are caller bugs and raise ValueError.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import numpy as np

_CHUNK = 1 << 20  # elements per float64 chunk: bounds the temporary memory (8 MiB)

FREE_RIDER, OUTLIER, STALE, COPY = "free-rider", "outlier", "stale", "copy"
DUPLICATE = "duplicate"  # a near-duplicate pair first seen together: the original is unknown
_TOGETHER = ", arrived together (nothing orders them): the original is unknown, neither is applied"


def _flat(tree: Any) -> list[np.ndarray]:
    return [np.asarray(x, dtype=np.float32).reshape(-1) for x in jax.tree.leaves(tree)]


def _check_like(a: list[np.ndarray], b: list[np.ndarray], what: str) -> None:
    if len(a) != len(b) or any(x.size != y.size for x, y in zip(a, b, strict=True)):
        raise ValueError(f"{what} is not shaped like the first contribution")


def _dot(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    total = 0.0
    for x, y in zip(a, b, strict=True):
        for start in range(0, x.size, _CHUNK):
            cx = x[start : start + _CHUNK].astype(np.float64)
            cy = y[start : start + _CHUNK].astype(np.float64)
            total += float(np.sum(cx * cy))
    return total


def _norm(a: list[np.ndarray]) -> float:
    total = 0.0
    for x in a:
        for start in range(0, x.size, _CHUNK):
            c = x[start : start + _CHUNK].astype(np.float64)
            total += float(np.sum(c * c))
    return math.sqrt(total)  # nan stays nan, inf stays inf


_GRAM_BYTES = 64 << 20  # bound on one float64 block of the Gram matrix product


class GramAccumulator:
    """G[a, b] = <tree a, tree b> for n trees, in float64, added up one part (a shard, or
    a leaf) at a time: dot products are sums over the elements, so the parts may come in
    any order and only the float64 summation order differs. Memory: the n × n matrix and
    one float64 block of at most _GRAM_BYTES (plus the caller's n parts). With
    `indicators`, it adds up the 0/1 vectors of the non-zero positions instead: I[a, b]
    counts the positions where both trees are non-zero (top-k supports, `overlap_ratios`)."""

    def __init__(self, n: int, *, indicators: bool = False):
        self.n, self.indicators = n, indicators
        self.gram = np.zeros((n, n), np.float64)
        self._chunk = max(1024, _GRAM_BYTES // (8 * max(n, 1)))

    def add(self, parts: Sequence[Sequence[np.ndarray] | None]) -> None:
        """Adds one part of every tree: parts[a] lists tree a's arrays of this part (the
        same shapes for every tree), or is None when tree a is left out (its row and
        column stop growing: the caller drops them)."""
        if len(parts) != self.n:
            raise ValueError(f"GramAccumulator: {len(parts)} parts for {self.n} trees")
        rows = [a for a, p in enumerate(parts) if p is not None]
        if not rows:
            return
        flats = [[np.asarray(x, dtype=np.float32).reshape(-1) for x in parts[a]] for a in rows]
        if self.indicators:  # nan counts as non-zero: it is a position the payload sent
            flats = [[(x != 0).astype(np.float32) for x in f] for f in flats]
        for f in flats[1:]:
            _check_like(flats[0], f, "a part")
        every = len(rows) == self.n
        with np.errstate(over="ignore", invalid="ignore"):  # non-finite rows stay non-finite
            for leaf in range(len(flats[0])):
                for start in range(0, flats[0][leaf].size, self._chunk):
                    block = np.stack([f[leaf][start : start + self._chunk] for f in flats])
                    block = block.astype(np.float64)
                    if every:
                        self.gram += block @ block.T
                    else:
                        self.gram[np.ix_(rows, rows)] += block @ block.T


def _gram(flats: list[list[np.ndarray]], indicators: bool = False) -> np.ndarray:
    """G[a, b] = <flat a, flat b> for every pair, in float64, one leaf chunk at a time."""
    acc = GramAccumulator(len(flats), indicators=indicators)
    if flats:
        acc.add(flats)
    return acc.gram


def gram_norms(gram: np.ndarray) -> list[float]:
    """The L2 norms on a Gram matrix's diagonal (nan where it is negative or nan)."""
    return [math.sqrt(g) if g >= 0 else math.nan for g in np.diag(gram).tolist()]


def center_weights(gram: np.ndarray, rows: Sequence[int], clip: float = 1.5) -> np.ndarray:
    """Weights w (summing to 1) of a robust center m = Σ_k w_k·Δ_k of the trees in `rows`,
    from their Gram matrix alone: the mean with each Δ's pull clipped at `clip` × the
    median distance to m (Huber), from the geometric median (Weiszfeld). Within the
    honest spread it is the mean; one Δ however far moves it by about clip × that
    distance / n. The mean itself moves by the Δ's norm / n, enough within the norm
    limit to make two honest Δs look alike (centered cosine −0.2 became 0.8)."""
    g = np.asarray(gram, np.float64)[np.ix_(rows, rows)]
    n, diag = len(rows), np.diag(g)
    if n == 0:
        return np.zeros(0)
    w = np.full(n, 1.0 / n)
    eps = 1e-9 * math.sqrt(max(float(np.mean(np.abs(diag))), 1e-300))
    for step in range(150):  # 100 Weiszfeld steps (w_k ∝ 1/d_k), then 50 Huber steps
        gw = g @ w
        d = np.maximum(np.sqrt(np.maximum(diag - 2 * gw + w @ gw, 0.0)), eps)  # ‖Δ_k − m‖
        if step < 100:
            w = (1.0 / d) / np.sum(1.0 / d)
        else:  # m += mean_k min(1, τ/d_k)·(Δ_k − m)
            c = np.minimum(1.0, clip * float(np.median(d)) / d)
            w = w * (1.0 - c.mean()) + c / n
    return w


def centered_gram(
    gram: np.ndarray, rows: Sequence[int], weights: np.ndarray | None = None
) -> np.ndarray:
    """<Δ_a − m, Δ_b − m> for a, b in `rows`, m = Σ_k w_k·Δ_k (`weights` summing to 1;
    None: the mean), from the Gram matrix alone: G_ab − r_a − r_b + wᵀGw, r = Gw."""
    g = np.asarray(gram, np.float64)[np.ix_(rows, rows)]
    w = np.full(len(rows), 1.0 / len(rows)) if weights is None else np.asarray(weights)
    r = g @ w
    return g - r[:, None] - r[None, :] + w @ r


def overlap_ratios(indicators: np.ndarray, rows: Sequence[int]) -> np.ndarray:
    """I_ab / max(I_aa, I_bb) for a, b in `rows` (I: the indicator Gram matrix), nan where
    a support is empty or a count not finite. Over the smaller support, a dense Δ (it
    covers every sparse one) would overlap everyone fully and make them all its copies."""
    ind = np.asarray(indicators, np.float64)[np.ix_(rows, rows)]
    d = np.diag(ind)
    high = np.maximum(d[:, None], d[None, :])
    with np.errstate(divide="ignore", invalid="ignore"):
        out = ind / high
    out[~(np.isfinite(out) & (high > 0) & (np.minimum(d[:, None], d[None, :]) > 0))] = math.nan
    return out


def median_scales(norms_: Sequence[float]) -> list[float | None]:
    """For each norm, the factor k = median / norm that brings a norm above the median of
    the finite positive ones down to it, or None (left as it is: at most the median, not
    finite, or no median). Scaling up a token update would reward doing nothing."""
    finite = [n for n in norms_ if math.isfinite(n) and n > 0]
    if not finite:
        return [None] * len(norms_)
    median = float(np.median(finite))
    return [median / n if math.isfinite(n) and n > median else None for n in norms_]


def _cos(dot: float, norm_a: float, norm_b: float) -> float:
    if not (norm_a > 0 and norm_b > 0 and math.isfinite(norm_a) and math.isfinite(norm_b)):
        return 0.0
    c = dot / (norm_a * norm_b)
    if not math.isfinite(c):
        return 0.0
    return max(-1.0, min(1.0, c))  # rounding can step just past ±1


def norms(deltas: Sequence[Any]) -> list[float]:
    """The global L2 norm of each tree (float64 accumulation; inf or nan if non-finite)."""
    return [_norm(_flat(d)) for d in deltas]


def cosine(a: Any, b: Any) -> float:
    """Cosine similarity of two trees flattened; 0.0 if either norm is 0 or not finite."""
    fa, fb = _flat(a), _flat(b)
    _check_like(fa, fb, "the second tree")
    return _cos(_dot(fa, fb), _norm(fa), _norm(fb))


def _g(x: float) -> str:
    return f"{x:.3g}"


@dataclasses.dataclass
class Screen:
    """The screening verdict on one contribution; `reason` is "" when it passes."""

    reason: str = ""
    check: str = ""  # "", FREE_RIDER, OUTLIER, STALE, COPY or DUPLICATE: the first that failed
    norm: float = 0.0
    ratio: float = math.nan  # norm / the round's median norm (nan when undefined)
    duplicate_of: str = ""  # the history label or contributor name it near-duplicates
    cosine: float = 0.0  # the cosine with `duplicate_of`
    measure: str = ""  # what found the copy: "cosine", "centered cosine", "top-k index overlap"
    similarity: float = 0.0  # that measure's value

    @property
    def passed(self) -> bool:
        return not self.reason


def screen_details(
    deltas: Sequence[Any],
    names: Sequence[str],
    *,
    history: Sequence[tuple[str, Any]] = (),
    copy_overlap: float = 0.0,
    **options: Any,
) -> list[Screen]:
    """`screen` with the numbers behind each verdict (see `screen`): the Gram matrix of
    the whole trees, leaf by leaf, then `screen_gram` (`options`: its keywords; with
    copy_overlap > 0, the indicator Gram matrix of the trees' non-zero positions too)."""
    if len(names) != len(deltas):
        raise ValueError(f"screen: {len(deltas)} contributions but {len(names)} names")
    flats = [_flat(d) for d in deltas]
    hist = [(label, _flat(tree)) for label, tree in history]
    for i, f in enumerate(flats[1:], 1):
        _check_like(flats[0], f, f"contribution {i} ({names[i]})")
    for label, f in hist:
        if flats:
            _check_like(flats[0], f, f"history tree {label}")
    trees = flats + [f for _, f in hist]  # contributions first, then history
    overlap = _gram(trees, indicators=True) if copy_overlap > 0 else None
    labels = [label for label, _ in hist]
    return screen_gram(
        _gram(trees), names, labels, overlap=overlap, copy_overlap=copy_overlap, **options
    )


def _copy_test(
    gram: np.ndarray, norms_: Sequence[float], rows: Sequence[int], limits: tuple
) -> Callable[[int, int], tuple[str, str, str, float] | None]:
    """Check 4's test of a pair of `rows` (those checks 1-3 passed) under `limits`, screen_
    gram's (duplicate_cosine, centered_cosine, overlap, copy_overlap): the first measure
    at or above its limit, as (how, what: for the reason; measure, value), or None. Both
    round-relative tests need enough of the round: the top-k overlap >= 3 rows (with 2,
    the only overlap is the pair's own), the centered cosine >= 4 (with 3, a copy pair
    is the majority and a robust center sits between them, so they look opposite)."""
    duplicate_cosine, centered_cosine, overlap, copy_overlap = limits
    pos = {a: k for k, a in enumerate(rows)}
    centered = cnorms = None
    if centered_cosine is not None and centered_cosine <= 1 and len(rows) >= 4:
        centered = centered_gram(gram, rows, center_weights(gram, rows))
        cnorms = gram_norms(centered)  # a rounding-negative diagonal: nan, cosine 0
    ratios, base = None, math.nan
    if overlap is not None and copy_overlap > 0 and len(rows) >= 3:
        ratios = overlap_ratios(overlap, rows)
        pairs = ratios[np.triu_indices(len(rows), 1)]
        pairs = pairs[np.isfinite(pairs)]
        # Honest top-k supports share the round's large coordinates (raw cosine 0.9 gave
        # overlaps of 0.6): what counts is the overlap beyond the round's typical pair.
        base = float(np.median(pairs)) if pairs.size else math.nan

    def test(i: int, j: int) -> tuple[str, str, str, float] | None:
        c = _cos(float(gram[i, j]), norms_[i], norms_[j])
        if c >= duplicate_cosine:
            return "", f"cosine {c:.4f}", "cosine", c
        a, b = pos[i], pos[j]
        if centered is not None:
            cc = _cos(float(centered[a, b]), cnorms[a], cnorms[b])
            if cc >= centered_cosine:
                how = " after removing the round's common update"
                return how, f"centered cosine {cc:.3f}", "centered cosine", cc
        if ratios is not None and base < 1:
            o = float(ratios[a, b])
            if (o - base) / (1 - base) >= copy_overlap:  # nan never is
                what = f"top-k index overlap {o:.2f}, the round's median {base:.2f}"
                return " by its top-k positions", what, "top-k index overlap", o
        return None

    return test


def screen_gram(
    gram: np.ndarray,
    names: Sequence[str],
    history_labels: Sequence[str] = (),
    *,
    max_norm_ratio: float = 3.0,
    zero_norm_ratio: float = 1e-3,
    duplicate_cosine: float = 0.99,
    arrival: Sequence[int] | None = None,
    centered_cosine: float | None = None,
    overlap: np.ndarray | None = None,
    copy_overlap: float = 0.4,
) -> list[Screen]:
    """`screen_details` from the Gram matrix of the n = len(names) contributions followed
    by the history trees (`GramAccumulator`: it adds up over shards, so nobody needs a
    whole tree to screen); `overlap`, if given, is their indicator Gram matrix, the same
    shape (`GramAccumulator(indicators=True)`)."""
    n, h = len(names), len(history_labels)
    if np.shape(gram) != (n + h, n + h):
        raise ValueError(f"screen: a {np.shape(gram)} Gram matrix for {n} + {h} trees")
    if overlap is not None and np.shape(overlap) != (n + h, n + h):
        raise ValueError(f"screen: a {np.shape(overlap)} overlap matrix for {n} + {h} trees")
    for what, value in (
        ("max_norm_ratio", max_norm_ratio),
        ("zero_norm_ratio", zero_norm_ratio),
        ("copy_overlap", copy_overlap),
    ):
        if not value >= 0:
            raise ValueError(f"screen: {what} {value!r} is not >= 0")
    if math.isnan(duplicate_cosine):
        raise ValueError("screen: duplicate_cosine is nan")
    if centered_cosine is not None and not centered_cosine > 0:
        raise ValueError(f"screen: centered_cosine {centered_cosine!r} is not > 0 (None: off)")
    if arrival is not None and len(arrival) != n:
        raise ValueError(f"screen: {n} contributions but {len(arrival)} arrivals")
    hist = list(history_labels)
    all_norms = gram_norms(gram)
    out = [Screen(norm=all_norms[i]) for i in range(n)]

    # 1-2. Norms against the round's median: the adversaries are a minority, so the median
    # over everyone (finite) is an honest norm. With a median of 0 ratios mean nothing.
    finite = [s.norm for s in out if math.isfinite(s.norm)]
    median = statistics.median(finite) if finite else math.nan
    for s in out:
        if not math.isfinite(s.norm):
            s.check, s.reason = OUTLIER, f"norm outlier: norm {_g(s.norm)} is not finite"
            continue
        if s.norm == 0:
            s.check, s.reason = FREE_RIDER, "free-rider: zero update (norm 0)"
            continue
        if not median > 0:
            continue
        s.ratio = s.norm / median
        if s.ratio < zero_norm_ratio:
            s.check = FREE_RIDER
            s.reason = (
                f"free-rider: norm {_g(s.norm)} is {_g(s.ratio)}× the round's median "
                f"{_g(median)} (limit {_g(zero_norm_ratio)}×)"
            )
        elif max_norm_ratio > 0 and s.ratio > max_norm_ratio:
            s.check = OUTLIER
            s.reason = (
                f"norm outlier: norm {_g(s.norm)} is {_g(s.ratio)}× the round's median "
                f"{_g(median)} (limit {_g(max_norm_ratio)}×)"
            )

    # 3. Replays of an earlier round's applied update: report the closest one. (Not by
    # top-k overlap: the published update's support is the union of the applied ones,
    # and honest supports persist from round to round.)
    for i, s in enumerate(out):
        if s.reason:
            continue
        best: tuple[str, float] | None = None
        for k, label in enumerate(hist):
            c = _cos(float(gram[i, n + k]), s.norm, all_norms[n + k])
            if c >= duplicate_cosine and (best is None or c > best[1]):
                best = (label, c)
        if best is not None:
            s.check, (s.duplicate_of, s.cosine) = STALE, best
            s.measure, s.similarity = "cosine", s.cosine
            s.reason = f"stale: near-duplicate of {s.duplicate_of} (cosine {s.cosine:.4f})"

    # 4. Copies within the round, in arrival order (the index order without `arrival`):
    # an earlier arrival is presumed the original, so j is flagged against the earliest
    # arrival before it that checks 1-3 did not reject (a copy may itself be the original
    # of a later copy). A pair that arrived together (the same `arrival` value) has no
    # known original: both are flagged as duplicates.
    rows = [i for i, s in enumerate(out) if not s.reason]
    limits = (duplicate_cosine, centered_cosine, overlap, copy_overlap)
    test = _copy_test(gram, all_norms, rows, limits)
    order = sorted(rows, key=lambda k: (arrival[k], k)) if arrival is not None else rows
    for at, j in enumerate(order):
        for i in order[:at] if not out[j].reason else ():
            hit = test(i, j)
            if hit is None:
                continue
            how, what, measure, value = hit
            cos = _cos(float(gram[i, j]), all_norms[i], all_norms[j])
            together = arrival is not None and arrival[i] == arrival[j]
            check = DUPLICATE if together else COPY
            for a, b in ((j, i), (i, j))[: 2 if together else 1]:
                if not out[a].reason:
                    out[a].check, out[a].duplicate_of, out[a].cosine = check, names[b], cos
                    out[a].measure, out[a].similarity = measure, value
                    out[a].reason = f"{check}: near-duplicate of {names[b]}{how} ({what})"
                    out[a].reason += _TOGETHER if together else ""
            break
    return out


def screen(deltas: Sequence[Any], names: Sequence[str], **options: Any) -> list[str]:
    """One reason per contribution, "" when it passes. `options` are screen_details'
    keywords: history, max_norm_ratio (3.0), zero_norm_ratio (1e-3), duplicate_cosine
    (0.99), arrival, centered_cosine (None), copy_overlap (0). Checks, first failure wins:

    1. free-rider: norm 0, or norm / the round's median norm < zero_norm_ratio;
    2. norm outlier: a non-finite norm, or norm / median > max_norm_ratio (0 disables);
    3. stale: cosine >= duplicate_cosine with a tree of `history` (earlier rounds' applied
       deltas, labelled "contributor@round");
    4. copy: a pair of contributions that checks 1-3 did not reject is a copy pair when
       their cosine >= duplicate_cosine, or (with >= 4 of them) the cosine of Δ − m, m
       a robust mean of them (`center_weights`), >= centered_cosine (an honest Δ plus
       noise; honest Δs sharing a large common direction stay near −1/(n−1)), or the
       overlap (>= 3 of them) of their non-zero positions (shared / the larger support)
       is at least copy_overlap of the way from the round's median pair overlap to 1.
       The later arrival (the given order without `arrival`, e.g. commitment slots) is
       the copy; the earlier keeps its status — unless they arrived together (the same
       `arrival`): then both are flagged "duplicate": nobody can tell the original.

    The median is over every contribution with a finite norm; when it is 0 (or there is
    none) the ratio checks are skipped. duplicate_cosine > 1 disables the cosine tests of
    checks 3-4, centered_cosine None (or > 1) the centered one, copy_overlap 0 the overlap."""
    details = screen_details(deltas, names, **options)
    return [s.reason for s in details]


def _loss(value: Any) -> float:
    loss = float(np.asarray(value, dtype=np.float64).reshape(()))
    return loss if math.isfinite(loss) else math.nan


def score_contributions(
    loss_fn: Callable[[Any], Any], params: Any, deltas: Sequence[Any], *, step: float = 1.0
) -> tuple[float, list[float]]:
    """(base, scores): base = loss_fn(params) and score_i = base − loss_fn(params − step·Δ_i),
    the eval-loss improvement of Δ_i applied alone (params − step·Δ_i in float32). A
    non-finite loss (or difference) scores -inf; a non-finite base is returned as nan."""
    return score_moved(loss_fn, params, (jax.tree.map(moved(step), params, d) for d in deltas))


def moved(step: float = 1.0) -> Callable[[Any, Any], np.ndarray]:
    """p, d ↦ p − step·d in float32: how a scored Δ moves the params (leaf or piece)."""
    scale = np.float32(step)

    def move(p: Any, d: Any) -> np.ndarray:
        p32, d32 = np.asarray(p, dtype=np.float32), np.asarray(d, dtype=np.float32)
        return np.asarray(p32 - scale * d32, dtype=np.float32)

    return move


def score_moved(
    loss_fn: Callable[[Any], Any], params: Any, moved_params: Iterable[Any]
) -> tuple[float, list[float]]:
    """`score_contributions` given each params − step·Δ_i, taken one at a time from an
    iterable (a generator builds each from Δ_i's shards, so one moved copy is alive)."""
    base = _loss(loss_fn(params))
    scores = []
    for tree in moved_params:
        score = base - _loss(loss_fn(tree))
        del tree
        scores.append(score if math.isfinite(score) else -math.inf)
    return base, scores


def reward_shares(
    scores: Sequence[float | None], applied_or_accepted: Sequence[bool]
) -> list[float]:
    """share_i = max(score_i, 0) / Σ_j max(score_j, 0) over the eligible contributions
    (flagged True, with a finite score); 0 for the others, and all 0 when the total is 0."""
    if len(scores) != len(applied_or_accepted):
        raise ValueError(
            f"reward_shares: {len(scores)} scores but {len(applied_or_accepted)} flags"
        )
    positive = []
    for score, eligible in zip(scores, applied_or_accepted, strict=True):
        value = 0.0
        if eligible and score is not None:
            s = float(score)
            if math.isfinite(s) and s > 0:
                value = s
        positive.append(value)
    total = math.fsum(positive)
    if not (total > 0 and math.isfinite(total)):
        return [0.0] * len(positive)
    return [value / total for value in positive]
