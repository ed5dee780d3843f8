"""The audit's checks of a run's records: entry signatures, decisions and seeds, rewards.

Each function returns problems, one line each ([] when all is well); `near_jax.contrib.audit`
gathers the inputs (manifest, `latest`, ledger, registry) and explains what is checked and
why. A damaged or absurd store object is a problem, never an exception.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

from near_jax._io import one_line, short_repr
from near_jax.contrib import identity, ledger, ratings, signing
from near_jax.diloco import protocol
from near_jax.diloco.protocol import ProtocolError
from near_jax.diloco.store import CorruptObject, ObjectStore

REWARD_TOLERANCE = 1e-9
UNREADABLE = (CorruptObject, ProtocolError, RecursionError)  # what a damaged object raises


# ------------------------------------------------------------------------------ signatures


def signature_problem(entry: dict[str, Any], registry: dict[str, str], run: str) -> str:
    """'' if the entry's statement names it (run, round, contributor, payload) and its
    registered contributor signed it; otherwise why not, one phrase."""
    text = entry.get("statement")
    if not isinstance(text, str) or not text:
        return "it has no signed statement"
    try:
        fields = json.loads(text)
    except (TypeError, ValueError, RecursionError):
        return "its statement is not JSON"
    if not isinstance(fields, dict):
        return "its statement is not a JSON object"
    expected = {
        "run": run,
        "round": entry.get("round"),
        "contributor": entry.get("contributor"),
        "payload_sha256": entry.get("payload_sha256"),
    }
    for name, value in expected.items():
        if fields.get(name) != value:
            got, want = short_repr(fields.get(name)), short_repr(value)
            return f"its statement names {name} {got}, not {want}"
    public = registry.get(entry.get("contributor"))  # type: ignore[arg-type]
    if public is None:
        return f"contributor {short_repr(entry.get('contributor'))} is not registered"
    if not identity.verify_statement(public, fields, entry.get("signature")):  # type: ignore
        return f"its signature does not verify under {entry['contributor']!r}'s registered key"
    return ""


def signature_problems(entry: dict[str, Any], registry: dict[str, str], run: str) -> list[str]:
    """Problems of a ledger entry's signature: accepted or carrying a key id, yet not signed
    by its contributor's registered key of that id; or rejected as a bad signature that verifies."""
    where = (
        f"ledger entry {entry['seq']} (round {entry['round']}, {short_repr(entry['contributor'])})"
    )
    why = signature_problem(entry, registry, run)
    problems = []
    if entry["accepted"] or entry["key_id"]:
        # accepted, or rejected with a key id: either says the contributor signed it
        what = "accepted" if entry["accepted"] else f"signed (key id {short_repr(entry['key_id'])})"
        if why:
            problems.append(f"{where}: {what}, but {why}")
        else:
            registered = identity.key_id(registry[entry["contributor"]])
            if entry["key_id"] != registered:
                problems.append(
                    f"{where}: key id {short_repr(entry['key_id'])}, the registered "
                    f"key's is {registered}"
                )
    reason = entry["reason"] if isinstance(entry["reason"], str) else ""
    if not entry["accepted"] and reason.startswith("bad signature") and not why:
        problems.append(f"{where}: rejected as a bad signature, but it verifies")
    return problems  # other unsigned rejections may carry any signature, or none


# ------------------------------------------------------------------------------- decisions


def decision_problems(
    store: ObjectStore,
    run: str,
    contrib: dict[str, Any],
    aggregator_key: str | None,
    latest: int,
    entries: list[dict[str, Any]] | None,
) -> list[str]:
    """Problems of the decisions of rounds 0..latest (round `latest`'s is optional) and of
    their agreement with the ledger's entries."""
    problems: list[str] = []
    by_round: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for e in entries or []:
        by_round[e["round"]].append(e)
    commitment = contrib.get("seed_commitment")
    if not isinstance(commitment, str):
        problems.append("the manifest has no seed_commitment for round 0")
        commitment = None
    for r in range(latest + 1):
        rows = by_round.pop(r, [])
        try:
            decision = protocol.read_json(store, protocol.decision_key(run, r))
        except UNREADABLE as e:
            problems.append(f"round {r}: the decision is unreadable: {one_line(e)}")
            commitment = None  # the chain of commitments is broken from here on
            continue
        if decision is None:
            if r < latest:
                problems.append(
                    f"round {r}: no decision {protocol.decision_key(run, r)}, yet it is closed"
                )
            elif rows:
                problems.append(
                    f"round {r}: the ledger has {len(rows)} entries of round {r}, which has no "
                    f"decision (the latest version is {latest})"
                )
            commitment = None
            continue
        if aggregator_key is not None and not _signed(aggregator_key, decision):
            problems.append(f"round {r}: the decision is not signed by the run's aggregator key")
        if decision.get("round") != r:
            problems.append(
                f"round {r}: the decision names round {short_repr(decision.get('round'))}"
            )
        section = decision.get("contrib")
        if not isinstance(section, dict):
            problems.append(f"round {r}: the decision has no contrib section")
            commitment = None
            continue
        if commitment is not None and aggregator_key is not None:
            signature = section.get("seed_signature")
            if not isinstance(signature, str):
                problems.append(f"round {r}: the decision has no seed_signature")
            else:
                bad = signing.check_seed(aggregator_key, run, r, signature, commitment)
                if bad:
                    problems.append(bad)
        nxt = section.get("next_seed_commitment")
        commitment = nxt if isinstance(nxt, str) else None
        if commitment is None:
            problems.append(f"round {r}: the decision has no next_seed_commitment")
        # round `latest` may be committed but not recorded yet: then its rows are absent
        if entries is not None and (r < latest or rows):
            problems += _compare_round(r, section.get("entries"), rows)
    if entries is not None and by_round:  # rows of no round 0..latest
        extra = [e for rows in by_round.values() for e in rows]
        rounds_ = sorted({str(e["round"]) for e in extra})
        problems.append(
            f"the ledger has {len(extra)} entries of round(s) {', '.join(rounds_)}, past the "
            f"latest version {latest}: no decision lists them"
        )
    return problems


def _signed(aggregator_key: str, decision: dict[str, Any]) -> bool:
    try:
        return signing.check_decision(aggregator_key, decision)
    except (TypeError, ValueError, RecursionError):  # e.g. NaN or absurd nesting
        return False


def _compare_round(r: int, listed: Any, rows: list[dict[str, Any]]) -> list[str]:
    if not isinstance(listed, list):
        return [f"round {r}: the decision's contrib section has no entries list"]
    if len(listed) != len(rows):
        return [
            f"round {r}: the decision lists {len(listed)} contributions, the ledger {len(rows)}"
        ]
    problems = []
    for i, (want, row) in enumerate(zip(listed, rows, strict=True)):
        try:
            want = ledger.normalize_entry(want, r)
        except (TypeError, ValueError, RecursionError) as e:
            problems.append(f"round {r}: the decision's entry {i} is malformed: {one_line(e)}")
            continue
        # type() too: True == 1 and 1 == 1.0, yet the chain hashes them differently
        diff = [
            f for f in ledger.ENTRY_FIELDS if want[f] != row[f] or type(want[f]) is not type(row[f])
        ]
        if diff:
            f = diff[0]
            problems.append(
                f"round {r}: ledger entry {row['seq']} ({short_repr(row['contributor'])}) differs "
                f"from the decision in {', '.join(diff)} ({f}: ledger {short_repr(row[f])}, "
                f"decision {short_repr(want[f])})"
            )
    return problems


# --------------------------------------------------------------------------------- rewards


def reward_problems(entries: list[dict[str, Any]]) -> list[str]:
    """Problems of the rewards: a rejected entry paid, a round paying over one unit, or
    ratings and rewards other than the recorded performances and scores give (replayed
    round by round: `ratings.check_rounds`; even the aggregator cannot pay a friend more)."""
    problems = []
    totals: dict[Any, float] = defaultdict(float)
    for e in entries:
        reward = e["reward"]
        if isinstance(reward, bool) or not isinstance(reward, int | float):
            continue  # the chain check names mistyped values
        totals[e["round"]] += reward
        if not e["accepted"] and reward != 0:
            problems.append(
                f"ledger entry {e['seq']} (round {e['round']}, {short_repr(e['contributor'])}): "
                f"rejected, yet rewarded {reward!r}"
            )
    for r, total in sorted(totals.items(), key=lambda kv: str(kv[0])):
        if total > 1 + REWARD_TOLERANCE:
            problems.append(f"round {r}: rewards sum to {total!r}, more than the round's one unit")
    return problems + ratings.check_rounds(entries)
