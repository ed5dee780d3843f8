"""Payout: a period's metered revenue, split among the host, token holders and the contributors.

The served model was trained by a contributor run (`near_jax.contrib`); its ledger records
every contributor's reward, round by round. A payout statement splits the revenue the usage
ledger metered over a period [start, end) (integer micro-units):

    host_amount     = revenue * host_ppm // 1_000_000        (the serving host)
    holders_amount  = revenue * holders_ppm // 1_000_000     (token holders)
    contributors    the rest, in proportion to each contributor's total reward in the run's
                    ledger, which must pass its audit (`contrib.audit.audit`), else
                    PayoutError: nobody is paid from a ledger that does not check out

Shares are in parts per million (host_ppm + holders_ppm <= 1_000_000). A contributor's
reward is the correctly rounded sum (math.fsum) of its entries' rewards, written into the
statement as a float; the split uses those floats as exact fractions, so anyone can redo it
from the statement alone. Amounts are floors of the exact quotas plus one micro-unit each for
the largest remainders (ties by name), so sum(amounts) + host_amount + holders_amount ==
revenue exactly, and what the floors of the host's and holders' shares leave goes to the
contributors. Contributors whose reward is 0 get nothing and are not listed; a ledger in
which nobody earned anything is refused (PayoutError) rather than paying nobody.

Statement (JSON; `to_csv` gives one row per payee)
--------------------------------------------------
    {"format": 1, "run", "period": [start, end], "revenue", "requests", "usage_head" (the
     usage ledger's head hash for the period, "" when it had no requests), "host",
     "host_ppm", "holders_ppm", "host_amount", "holders_amount",
     "contributors": [{"contributor", "key_id", "reward", "amount"}, ...] (largest reward
     first, then by name), "ledger": {"rounds" (rounds audited: 0..rounds-1 closed),
     "entries", "head" (the last entry's hash), "aggregator_key_id"}, "created",
     "signing_key", "signature"}

signature: ed25519 by `identity` over STATEMENT_DOMAIN + canonical JSON (`protocol.dumps`)
of every field but "signature".
"""

from __future__ import annotations

import csv
import io
import math
import re
import time
from fractions import Fraction
from typing import Any

from near_jax._io import one_line, short_repr
from near_jax.contrib import audit
from near_jax.contrib import identity as idlib
from near_jax.diloco import protocol
from near_jax.diloco.store import ObjectStore

FORMAT = 1
PPM = 1_000_000
STATEMENT_DOMAIN = b"near_jax/serve/payout/v1\n"
HOLDERS = "holders"
CSV_FIELDS = ("role", "payee", "key_id", "reward", "amount")

_HEX64 = re.compile(r"[0-9a-f]{64}")


class PayoutError(Exception):
    """A payout that must not be made (a ledger failing its audit, nobody to pay); one line."""


# ---------------------------------------------------------------------------------- split


def split(amount: int, weights: dict[str, float]) -> dict[str, int]:
    """`amount` (int >= 0) split in proportion to `weights` (finite floats > 0, taken as
    exact fractions): floors of the quotas, then one more to the largest remainders (ties
    by name); the parts sum to `amount` exactly."""
    exact = {name: Fraction(w) for name, w in weights.items()}
    total = sum(exact.values(), Fraction(0))
    if not exact or total <= 0:
        raise PayoutError("nothing to split over: no positive weight")
    quotas = {name: amount * w / total for name, w in exact.items()}
    parts = {name: q.numerator // q.denominator for name, q in quotas.items()}
    left = amount - sum(parts.values())
    for name in sorted(quotas, key=lambda n: (-(quotas[n] - parts[n]), n))[:left]:
        parts[name] += 1
    return parts


def contributor_rewards(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """[{contributor, key_id, reward}] of every contributor with a positive total reward in
    `entries` (math.fsum of its entries' rewards; key_id: its last non-empty one), largest
    reward first, then by name."""
    rewards: dict[str, list[float]] = {}
    key_ids: dict[str, str] = {}
    for e in entries:
        name = str(e["contributor"])
        rewards.setdefault(name, []).append(float(e["reward"]))
        key_ids[name] = e["key_id"] or key_ids.get(name, "")
    totals = {name: math.fsum(r) for name, r in rewards.items()}
    paid = sorted((n for n, r in totals.items() if r > 0), key=lambda n: (-totals[n], n))
    return [{"contributor": n, "key_id": key_ids[n], "reward": totals[n]} for n in paid]


# ------------------------------------------------------------------------------ statement


def statement(
    store: ObjectStore,
    run: str,
    *,
    period: tuple[float, float],
    revenue: int,
    requests: int,
    usage_head: str,
    host: str,
    host_ppm: int,
    holders_ppm: int,
    identity: idlib.Identity,
    created: float | None = None,
    ledger_path: str | None = None,
) -> dict[str, Any]:
    """The signed payout statement of `revenue` (micro-units) over `period` for contributor
    run `run` (see the module docstring; `ledger_path`: audit a local ledger file instead of
    the store's copy). ValueError on a bad argument, PayoutError when the run's ledger fails
    its audit or no contributor earned a reward."""
    start, end = _period(period)
    _count("revenue", revenue)
    _count("requests", requests)
    if not isinstance(usage_head, str) or not (usage_head == "" or _HEX64.fullmatch(usage_head)):
        raise ValueError(
            f"usage_head must be 64 lowercase hex characters or '', got {short_repr(usage_head)}"
        )
    if not isinstance(host, str) or not host.strip():
        raise ValueError(f"host must be a non-empty name, got {short_repr(host)}")
    _shares(host_ppm, holders_ppm)

    result = audit.audit(store, run, ledger_path=ledger_path)
    if result.problems:
        raise PayoutError(
            f"the ledger of run {run!r} fails its audit ({len(result.problems)} problem(s), "
            f"first: {one_line(result.problems[0], 200)}); refusing to pay from it"
        )
    entries = result.entries or []
    payees = contributor_rewards(entries)
    if not payees:
        raise PayoutError(
            f"no contributor of run {run!r} has a reward in its ledger ({len(entries)} "
            "entries); refusing to pay nobody"
        )
    host_amount = revenue * host_ppm // PPM
    holders_amount = revenue * holders_ppm // PPM
    amounts = split(
        revenue - host_amount - holders_amount, {p["contributor"]: p["reward"] for p in payees}
    )
    out: dict[str, Any] = {
        "format": FORMAT,
        "run": run,
        "period": [start, end],
        "revenue": revenue,
        "requests": requests,
        "usage_head": usage_head,
        "host": host,
        "host_ppm": host_ppm,
        "holders_ppm": holders_ppm,
        "host_amount": host_amount,
        "holders_amount": holders_amount,
        "contributors": [{**p, "amount": amounts[p["contributor"]]} for p in payees],
        "ledger": {
            "rounds": result.latest,
            "entries": len(entries),
            "head": result.summary["head"],
            "aggregator_key_id": result.summary["aggregator_key_id"],
        },
        "created": time.time() if created is None else float(created),
        "signing_key": identity.public_hex,
    }
    out["signature"] = identity.sign(statement_bytes(out))
    return out


def statement_bytes(stmt: dict[str, Any]) -> bytes:
    """What a statement's signature covers: STATEMENT_DOMAIN + canonical JSON without
    "signature"."""
    return STATEMENT_DOMAIN + protocol.dumps({k: v for k, v in stmt.items() if k != "signature"})


def _period(period: Any) -> tuple[float, float]:
    try:
        start, end = (float(t) for t in period)
    except (TypeError, ValueError):
        raise ValueError(
            f"period must be (start, end) in seconds, got {short_repr(period)}"
        ) from None
    if not (math.isfinite(start) and math.isfinite(end) and start < end):
        raise ValueError(f"period must be finite with start < end, got [{start}, {end})")
    return start, end


def _count(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(
            f"{name} must be an int >= 0 (micro-units / a count), got {short_repr(value)}"
        )


def _shares(host_ppm: Any, holders_ppm: Any) -> None:
    for name, v in (("host_ppm", host_ppm), ("holders_ppm", holders_ppm)):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= PPM:
            raise ValueError(
                f"{name} must be an int in [0, {PPM}] (parts per million), got {short_repr(v)}"
            )
    if host_ppm + holders_ppm > PPM:
        raise ValueError(
            f"host_ppm + holders_ppm must be at most {PPM}, got {host_ppm} + {holders_ppm}"
        )


# ------------------------------------------------------------------------------- checking


def verify_statement(
    stmt: Any,
    *,
    signing_key: str | None = None,
    store: ObjectStore | None = None,
    ledger_path: str | None = None,
) -> list[str]:
    """Problems of payout statement `stmt` (untrusted), [] when it checks out: signed by
    its signing_key (by `signing_key` when given), shares and sums exact, amounts the split
    of its rewards. With `store`, the run's ledger (or `ledger_path`) must pass its audit
    and give the statement's rewards up to its recorded head. Never raises (but a failing
    store raises StoreError)."""
    if not isinstance(stmt, dict):
        return [f"the statement must be a JSON object, got {type(stmt).__name__}"]
    problems = []
    key = stmt.get("signing_key")
    if signing_key is not None and key != signing_key:
        problems.append(f"signed by key {short_repr(key, 24)}, not {short_repr(signing_key, 24)}")
    try:
        signed = statement_bytes(stmt)
    except (TypeError, ValueError, RecursionError):
        signed = None
    if not idlib.verify(key, signed, stmt.get("signature")):
        problems.append("the statement's signature does not verify under its signing_key")
    if stmt.get("format") != FORMAT:
        problems.append(f"format is {short_repr(stmt.get('format'))}; allowed: {FORMAT}")
    problems += _field_problems(stmt)
    try:
        _count("revenue", stmt.get("revenue"))
        _count("requests", stmt.get("requests"))
        _shares(stmt.get("host_ppm"), stmt.get("holders_ppm"))
        payees = _payees(stmt.get("contributors"))
    except ValueError as e:
        return [*problems, str(e)]
    revenue = stmt["revenue"]
    for role, ppm in (("host", "host_ppm"), ("holders", "holders_ppm")):
        if stmt.get(f"{role}_amount") != revenue * stmt[ppm] // PPM:
            problems.append(
                f"{role}_amount is {short_repr(stmt.get(f'{role}_amount'))}, not revenue * "
                f"{ppm} // {PPM} = {revenue * stmt[ppm] // PPM}"
            )
    if problems:
        return problems
    total = sum(p["amount"] for p in payees) + stmt["host_amount"] + stmt["holders_amount"]
    if total != revenue:
        problems.append(f"the amounts sum to {total}, not the revenue {revenue}")
    pool = revenue - stmt["host_amount"] - stmt["holders_amount"]
    want = split(pool, {p["contributor"]: p["reward"] for p in payees})
    for p in payees:
        if p["amount"] != want[p["contributor"]]:
            problems.append(
                f"{p['contributor']!r} is paid {p['amount']}, its share of the rewards is "
                f"{want[p['contributor']]}"
            )
    if store is not None:
        problems += _ledger_problems(stmt, store, ledger_path)
    return problems


def _number(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def _field_problems(stmt: dict[str, Any]) -> list[str]:
    """Problems of the fields that the sums do not involve."""
    out = []
    for name in ("run", "host"):
        if not isinstance(stmt.get(name), str) or not stmt[name]:
            out.append(f"{name} must be a non-empty string, got {short_repr(stmt.get(name))}")
    period = stmt.get("period")
    if not (
        isinstance(period, list)
        and len(period) == 2
        and all(_number(t) for t in period)
        and period[0] < period[1]
    ):
        out.append(f"period must be [start, end] with start < end, got {short_repr(period)}")
    head = stmt.get("usage_head")
    if not isinstance(head, str) or not (head == "" or _HEX64.fullmatch(head)):
        out.append(f"usage_head must be 64 lowercase hex characters or '', got {short_repr(head)}")
    if not _number(stmt.get("created")):
        out.append(f"created must be a time in seconds, got {short_repr(stmt.get('created'))}")
    book = stmt.get("ledger")
    if not (
        isinstance(book, dict)
        and all(isinstance(book.get(k), int) for k in ("rounds", "entries"))
        and all(isinstance(book.get(k), str) for k in ("head", "aggregator_key_id"))
    ):
        out.append(
            "ledger must be {rounds: int, entries: int, head: str, aggregator_key_id: str}, "
            f"got {short_repr(book)}"
        )
    return out


def _payees(contributors: Any) -> list[dict[str, Any]]:
    if not isinstance(contributors, list) or not contributors:
        raise ValueError("contributors must be a non-empty list")
    seen = set()
    for p in contributors:
        ok = (
            isinstance(p, dict)
            and isinstance(p.get("contributor"), str)
            and isinstance(p.get("key_id"), str)
            and isinstance(p.get("reward"), float)
            and math.isfinite(p["reward"])
            and p["reward"] > 0
            and isinstance(p.get("amount"), int)
            and not isinstance(p.get("amount"), bool)
            and p["amount"] >= 0
        )
        if not ok:
            raise ValueError(
                "each contributor must be {contributor: str, key_id: str, reward: float > 0, "
                f"amount: int >= 0}}, got {short_repr(p)}"
            )
        if p["contributor"] in seen:
            raise ValueError(f"contributor {p['contributor']!r} is listed twice")
        seen.add(p["contributor"])
    return contributors


def _ledger_problems(
    stmt: dict[str, Any], store: ObjectStore, ledger_path: str | None
) -> list[str]:
    """The statement's rewards against the run's audited ledger up to its recorded head."""
    run = stmt.get("run")
    if not isinstance(run, str):
        return [f"run must be a string, got {short_repr(run)}"]
    result = audit.audit(store, run, ledger_path=ledger_path)
    if result.problems:
        return [
            f"the ledger of run {run!r} fails its audit: {one_line(p, 200)}"
            for p in result.problems
        ]
    entries = result.entries or []
    head = stmt.get("ledger", {}).get("head") if isinstance(stmt.get("ledger"), dict) else None
    upto = next((i for i, e in enumerate(entries) if e["entry_hash"] == head), None)
    if upto is None:
        return [
            f"the ledger of run {run!r} has no entry with the statement's head "
            f"{short_repr(head, 24)}"
        ]
    want = contributor_rewards(entries[: upto + 1])
    got = [{k: p[k] for k in ("contributor", "key_id", "reward")} for p in stmt["contributors"]]
    if got != want:
        return ["the statement's contributors and rewards are not the ledger's up to its head"]
    return []


# -------------------------------------------------------------------------------------- csv


def to_csv(stmt: dict[str, Any]) -> str:
    """The statement's payees as CSV: header role,payee,key_id,reward,amount, then the host,
    the holders and each contributor (amounts in micro-units)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    writer.writerow(("host", stmt["host"], "", "", stmt["host_amount"]))
    writer.writerow(("holders", HOLDERS, "", "", stmt["holders_amount"]))
    for p in stmt["contributors"]:
        writer.writerow(
            ("contributor", p["contributor"], p["key_id"], repr(p["reward"]), p["amount"])
        )
    return out.getvalue()
