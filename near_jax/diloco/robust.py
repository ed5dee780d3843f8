"""Robust aggregation of pseudo-gradients pushed by untrusted contributors.

A rule names how the aggregator combines the contributions of a round that passed screening
(`screening.py`):

    mean              the plain mean, bit-identical to `diloco.protocol.average`
    trimmed_mean:F    per coordinate, drop the floor(F·n) lowest and highest values and
                      average the rest (0 <= F < 0.5)
    median            the per-coordinate median (mean of the two middle values for even n)
    top_g:G           the plain mean of the G contributions with the highest scores
                      (`select` picks them; `combine` then averages what it is given)

Determinism: every machine replays the aggregation and checks a sha256 of the result, so
everything is numpy float32 with a fixed operation order. Sums run in a fixed order (the
given order for the mean, ascending value order for the trimmed mean) as elementwise
correctly-rounded float32 adds, never as a reduction whose order numpy may choose. Sorting
is deterministic up to the order of values that compare equal but differ in bits: −0.0 and
+0.0 (NaN payloads too, but non-finite contributions are rejected before aggregation), so
negative zeros are turned into +0.0 before sorting.

Memory: the order statistics (trimmed mean, median) need all n values of a coordinate at
once. `combine` works leaf by leaf: it stacks one leaf of every contribution (n × the leaf),
sorts that stack in place and keeps only the leaf's result, so the peak on top of the
contributions themselves and the output is about n × the largest leaf, not n × the model.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

RULES = ("mean", "trimmed_mean", "median", "top_g")
FORMS = "mean, trimmed_mean:F (0 <= F < 0.5), median, top_g:G (integer G >= 1)"
DEFAULT_TRIM_FRACTION = 0.2
DEFAULT_TOP_G = 4
_INT = re.compile(r"[0-9]+")


def _bad(text: Any, why: str) -> ValueError:
    return ValueError(f"bad aggregation rule {str(text)!r}: {why}; allowed forms: {FORMS}")


def _check_trim(trim: Any, text: Any) -> float:
    if isinstance(trim, bool) or not isinstance(trim, numbers.Real):
        raise _bad(text, f"trim fraction {trim!r} is not a number")
    trim = float(trim)
    if not 0.0 <= trim < 0.5:  # also rejects NaN
        raise _bad(text, f"trim fraction {trim!r} is not in [0, 0.5)")
    return trim


def _check_top_g(top_g: Any, text: Any) -> int:
    if isinstance(top_g, bool) or not isinstance(top_g, numbers.Integral):
        raise _bad(text, f"G {top_g!r} is not an integer")
    if top_g < 1:
        raise _bad(text, f"G {top_g!r} is not >= 1")
    return int(top_g)


@dataclasses.dataclass(frozen=True)
class Rule:
    """An aggregation rule. Parameters the rule does not use are reset to their defaults, so
    equal rules compare equal and `str` is canonical: Rule.parse(str(rule)) == rule."""

    name: str
    trim_fraction: float = DEFAULT_TRIM_FRACTION
    top_g: int = DEFAULT_TOP_G

    def __post_init__(self) -> None:
        if self.name not in RULES:
            raise _bad(self.name, "unknown rule")
        trim, top_g = DEFAULT_TRIM_FRACTION, DEFAULT_TOP_G
        if self.name == "trimmed_mean":
            trim = _check_trim(self.trim_fraction, f"{self.name}:{self.trim_fraction}")
        elif self.name == "top_g":
            top_g = _check_top_g(self.top_g, f"{self.name}:{self.top_g}")
        object.__setattr__(self, "trim_fraction", trim)
        object.__setattr__(self, "top_g", top_g)

    def __str__(self) -> str:
        if self.name == "trimmed_mean":
            return f"trimmed_mean:{self.trim_fraction!r}"  # repr: the shortest exact float
        if self.name == "top_g":
            return f"top_g:{self.top_g}"
        return self.name

    @classmethod
    def parse(cls, text: str) -> Rule:
        """ "mean", "trimmed_mean:F", "median" or "top_g:G" (bare names take the defaults);
        ValueError (one line, naming the text and the allowed forms) for anything else."""
        if not isinstance(text, str):
            raise _bad(text, "not a string")
        name, sep, arg = text.strip().partition(":")
        if name not in RULES:
            raise _bad(text, "unknown rule")
        if name in ("mean", "median"):
            if sep:
                raise _bad(text, f"{name} takes no parameter")
            return cls(name)
        if not sep:
            return cls(name)
        arg = arg.strip()
        if name == "trimmed_mean":
            try:
                trim = float(arg)
            except ValueError:
                raise _bad(text, f"trim fraction {arg!r} is not a number") from None
            return cls(name, trim_fraction=_check_trim(trim, text))
        if not _INT.fullmatch(arg):
            raise _bad(text, f"G {arg!r} is not an integer")
        return cls(name, top_g=_check_top_g(int(arg), text))

    @classmethod
    def from_config(cls, contrib_cfg: Any) -> Rule:
        """The rule of a contributors config: its `aggregation` (a rule name, or a full rule
        string such as "trimmed_mean:0.1", which then wins), `trim_fraction` and `top_g`."""
        name = contrib_cfg.aggregation
        if isinstance(name, str) and ":" in name:
            return cls.parse(name)
        return cls(
            name,
            trim_fraction=getattr(contrib_cfg, "trim_fraction", DEFAULT_TRIM_FRACTION),
            top_g=getattr(contrib_cfg, "top_g", DEFAULT_TOP_G),
        )


def _rank(score: Any) -> float:
    # A missing or NaN score ranks last, like a non-finite eval loss (-inf).
    if score is None:
        return -math.inf
    score = float(score)
    return -math.inf if math.isnan(score) else score


def select(rule: Rule, scores: Sequence[float | None]) -> list[int]:
    """Indices (ascending) of the contributions `rule` aggregates: all of them, except for
    top_g: the G highest scores (ties go to the lower index; all if there are at most G)."""
    n = len(scores)
    if rule.name != "top_g" or n <= rule.top_g:
        return list(range(n))
    best = sorted(range(n), key=lambda i: (-_rank(scores[i]), i))[: rule.top_g]
    return sorted(best)


def trim_count(trim_fraction: float, n: int) -> int:
    """k = floor(trim_fraction · n) values dropped at each end (a 1e-9 slack absorbs the
    binary representation error of products meant to be integers, e.g. 0.29 · 100)."""
    return math.floor(trim_fraction * n + 1e-9)


def _mean(leaves: list[np.ndarray]) -> np.ndarray:
    # Same operations as rounds.average: add in the given order, divide by n, in float32.
    total = leaves[0]
    for x in leaves[1:]:
        total = np.add(total, x)
    return np.asarray(total / np.float32(len(leaves)), dtype=np.float32)


def _sorted_stack(leaves: list[np.ndarray]) -> np.ndarray:
    stack = np.stack(leaves, axis=0)
    # -0.0 + 0.0 == +0.0: equal values get equal bits, so any sort algorithm (numpy picks
    # SIMD kernels by CPU) puts the same bits in the same places.
    np.add(stack, np.float32(0.0), out=stack)
    stack.sort(axis=0)
    return stack


def _median(leaves: list[np.ndarray]) -> np.ndarray:
    s = _sorted_stack(leaves)
    h = len(leaves) // 2
    if len(leaves) % 2:
        return s[h].copy()  # a copy, so the stack is freed
    # What np.median computes for float32: (a + b) / 2 in float32.
    return np.asarray((s[h - 1] + s[h]) / np.float32(2), dtype=np.float32)


def _trimmed_mean(leaves: list[np.ndarray], trim_fraction: float) -> np.ndarray:
    n = len(leaves)
    k = trim_count(trim_fraction, n)
    if n - 2 * k < 1:
        return _median(leaves)
    s = _sorted_stack(leaves)
    total = s[k]
    for j in range(k + 1, n - k):
        total = np.add(total, s[j])
    return np.asarray(total / np.float32(n - 2 * k), dtype=np.float32)


def combine(rule: Rule, deltas: Sequence[Any]) -> Any:
    """The robust aggregate under `rule` of the given (already selected) delta trees, float32.

    Leaf by leaf (see the module docstring for memory). ValueError if `deltas` is empty or
    the trees differ in structure or leaf shapes. trimmed_mean with F = 0 is the mean of the
    sorted values, equal to `mean` up to rounding but not bit-identical to it."""
    if len(deltas) == 0:
        raise ValueError(f"combine {rule}: no contributions to aggregate")
    flat = [jax.tree.flatten(d) for d in deltas]
    treedef = flat[0][1]
    for i, (_, other) in enumerate(flat[1:], 1):
        if other != treedef:
            raise ValueError(f"combine {rule}: contribution {i} is not structured like #0")
    leaf_fn: Callable[[list[np.ndarray]], np.ndarray]
    if rule.name == "trimmed_mean":
        leaf_fn = lambda leaves: _trimmed_mean(leaves, rule.trim_fraction)
    elif rule.name == "median":
        leaf_fn = _median
    else:  # mean, and top_g whose selection happened in `select`
        leaf_fn = _mean
    out = []
    for k in range(treedef.num_leaves):
        leaves = [np.asarray(leaves_i[k], dtype=np.float32) for leaves_i, _ in flat]
        for i, x in enumerate(leaves[1:], 1):
            if x.shape != leaves[0].shape:
                raise ValueError(
                    f"combine {rule}: leaf {k} of contribution {i} has shape {x.shape}, "
                    f"#0 has {leaves[0].shape}"
                )
        out.append(leaf_fn(leaves))
        del leaves
    return jax.tree.unflatten(treedef, out)
