"""Standings from the ledger: the leaderboard, and who is promoted to the next rung.

Each round's reward is one unit, shared among its accepted contributions in proportion to
their positive scores (`screening.reward_shares`, recorded per entry in the ledger). Over a
window of the last W rounds a contributor's standing sums its rewards and counts what it
sent, what was accepted and applied, and what was rejected.

Promotion (`promotable`) takes the top K by total reward among contributors that were
accepted in at least `min_rounds` rounds of the window and were never caught cheating in it:
a rejection for a replay, a copy or a stale copy disqualifies — but only of an entry the
contributor signed for that round (it has a key id). Anyone can write an object under
someone else's name (a bad signature, an old statement of theirs replayed), so unsigned
rejections are never held against the name. Free-riders, norm outliers (a poisoner, or an
honest island that diverged — or honest ones, if sybils flood the round's median) and
"duplicates" (a pair seen together, the original unknown) are not disqualified: they earn
0 for that round, which keeps them off the top anyway.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from collections.abc import Iterable, Sequence

DISQUALIFYING = ("replayed", "copy", "stale")


@dataclasses.dataclass
class Standing:
    """One contributor's record over the window."""

    contributor: str
    key_id: str = ""
    contributions: int = 0
    accepted: int = 0
    applied: int = 0
    rejected: int = 0
    reward: float = 0.0
    score_sum: float = 0.0
    rounds: set[int] = dataclasses.field(default_factory=set)
    last_round: int = -1
    flags: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def mean_score(self) -> float | None:
        return self.score_sum / self.accepted if self.accepted else None

    @property
    def disqualified(self) -> bool:
        return bool(self.flags)

    def row(self) -> dict:
        """The CSV/table row."""
        mean = self.mean_score
        return {
            "contributor": self.contributor,
            "key_id": self.key_id,
            "reward": round(self.reward, 6),
            "accepted": self.accepted,
            "applied": self.applied,
            "rejected": self.rejected,
            "contributions": self.contributions,
            "rounds": len(self.rounds),
            "mean_score": "" if mean is None else round(mean, 6),
            "last_round": self.last_round,
            "flags": ";".join(f"{k}={v}" for k, v in sorted(self.flags.items())),
        }


def window_bounds(latest: int, window: int) -> tuple[int, int]:
    """(first, last) round of the last `window` closed rounds (0: all), counted back from
    the latest closed round, latest − 1, whoever contributed to it."""
    last = latest - 1
    first = 0 if window <= 0 else max(0, last - window + 1)
    return first, last


def standings(entries: Iterable[dict], first: int = 0, last: int | None = None) -> list[Standing]:
    """Contributors' standings over rounds [first, last], best first (reward, then mean
    score, then name)."""
    table: dict[str, Standing] = {}
    for e in entries:
        if e["round"] < first or (last is not None and e["round"] > last):
            continue
        s = table.setdefault(e["contributor"], Standing(e["contributor"]))
        s.key_id = e["key_id"] or s.key_id
        s.contributions += 1
        s.last_round = max(s.last_round, e["round"])
        if e["accepted"]:
            s.accepted += 1
            s.rounds.add(e["round"])
            s.score_sum += e["score"] or 0.0
        else:
            s.rejected += 1
            for flag in DISQUALIFYING if e["key_id"] else ():  # signed by the contributor
                if e["reason"].startswith(flag):
                    s.flags[flag] = s.flags.get(flag, 0) + 1
        s.applied += bool(e["applied"])
        s.reward += e["reward"]
    return sorted(table.values(), key=lambda s: (-s.reward, -(s.mean_score or 0.0), s.contributor))


def promotable(ranked: Sequence[Standing], top: int, min_rounds: int = 1) -> list[Standing]:
    """The top `top` qualifying contributors (see the module docstring), best first."""
    eligible = [s for s in ranked if not s.disqualified and len(s.rounds) >= min_rounds]
    return [s for s in eligible if s.reward > 0][:top]


def to_csv(ranked: Sequence[Standing]) -> str:
    """The standings as CSV text (header + one row per contributor)."""
    out = io.StringIO()
    fields = list(Standing("").row())
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for s in ranked:
        writer.writerow(s.row())
    return out.getvalue()


def table(ranked: Sequence[Standing]) -> str:
    """The standings as an aligned text table."""
    head = (
        "#",
        "contributor",
        "reward",
        "accepted",
        "applied",
        "rejected",
        "rounds",
        "mean score",
        "flags",
    )
    rows = [head]
    for i, s in enumerate(ranked, 1):
        r = s.row()
        mean = "-" if r["mean_score"] == "" else f"{r['mean_score']:.4g}"
        rows.append(
            (
                str(i),
                s.contributor,
                f"{s.reward:.4f}",
                str(s.accepted),
                str(s.applied),
                str(s.rejected),
                str(len(s.rounds)),
                mean,
                r["flags"] or "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join(
        "  ".join(
            c.ljust(w) if i == 1 or i == 8 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    )
