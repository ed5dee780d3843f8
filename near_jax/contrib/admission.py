"""Who takes part in a contributor round, in what order, and what the ledger says of each.

arrival_order  each contribution's place in the round's commitment order (`commits`): who
               committed to a payload first is the original of a copy, whatever order the
               aggregator happened to list them in (which restarts with it)
over_cap       an open run admits at most contrib.new_keys_per_round contributors it has
               never accepted per round (in commitment order): a sybil flood of fresh keys
               cannot crowd the round, set its median norm or close it by quorum
entry          a contribution's ledger entry, with how it was judged (its detail)
late_entry     the entry of a push to a round that had closed: rejected as late
"""

from __future__ import annotations

from near_jax.contrib import commits, judging, ratings
from near_jax.contrib.checks import Candidate, Checker
from near_jax.diloco import protocol
from near_jax.diloco.store import ObjectStore


def arrival_order(
    store: ObjectStore, run: str, r: int, candidates: list[Candidate], checker: Checker
) -> dict[int, int]:
    """id(candidate) -> its commitment rank (ties: no commitment, the original unknown)."""
    keys = {}
    for c in candidates:
        public = checker.public_key(c.contributor) if c.key_id else None
        if public:
            keys[c.contributor] = public
    found = commits.read_commits(store, run, r, keys, limit=max(256, 4 * len(candidates)))
    ranks = commits.arrivals(found, candidates)
    return {id(c): rank for c, rank in zip(candidates, ranks, strict=True)}


def over_cap(
    candidates: list[Candidate], arrival: dict[int, int], known: set[str], cap: int
) -> list[Candidate]:
    """The valid contributions of new contributors (not in `known`) past the first `cap`
    of them in commitment order; none when cap is 0 (no cap: an allowlisted run, whose keys
    the previous rung vetted, or a run that set none)."""
    if cap <= 0:
        return []
    new = [c for c in candidates if c.valid and c.contributor not in known]
    return sorted(new, key=lambda c: (arrival[id(c)], c.island))[cap:]


def entry(
    c: Candidate, r: int, judged: judging.Verdict | None, rating: ratings.Rating | None
) -> dict:
    """`c`'s ledger entry of round r, with how it was judged (if it got that far; else its
    unchanged rating)."""
    out = c.entry(r)
    detail = judged.detail() if judged else judging.unjudged_detail(bool(c.key_id), rating)
    out["detail"] = protocol.dumps(detail).decode()
    return out


def late_entry(item: dict, r: int) -> dict:
    """The ledger entry (in round r) of a push to round item["round"] that arrived after it
    closed: rejected as late — not cheating: no key id, nothing read."""
    return {
        "round": r,
        "contributor": item["island"],
        "key_id": "",
        "payload_sha256": "",
        "statement": "",
        "signature": "",
        "score": None,
        "accepted": False,
        "applied": False,
        "reason": f"late: pushed to round {item['round']} after it closed",
        "reward": 0.0,
        "detail": protocol.dumps(judging.unjudged_detail(False, None)).decode(),
    }
