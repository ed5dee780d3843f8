"""Auditing a contributor run from its store alone: ledger, signatures, decisions, seeds, rewards.

`verify(store, run)` trusts nothing but the run's manifest (its aggregator key and first
seed commitment) and the registry's self-signed entries, and checks

  ledger     the hash chain of the store's ledger copy (or a local file)
  signatures every accepted entry carries a statement that its registered contributor
             signed, naming the entry's run, round, contributor and payload; no entry was
             rejected as a "bad signature" that in fact verifies
  decisions  each closed round's decision lists exactly the ledger's entries of that round,
             field by field: the decisions are the external anchor that exposes a truncated
             or rewritten tail, which leaves a valid (shorter) chain
  seeds      each round's revealed seed is signed by the aggregator key and matches the
             commitment published one round earlier
  rewards    a round pays out at most one unit, and nothing to rejected entries

The aggregator records a round in the ledger (and its store mirror) before it moves
`latest`, so every round below `latest` is in the mirror even while the run is live.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import defaultdict
from typing import Any

from near_jax.contrib import identity, ledger
from near_jax.diloco import rounds
from near_jax.diloco.rounds import ProtocolError
from near_jax.diloco.store import CorruptObject, ObjectStore

REWARD_TOLERANCE = 1e-9


def read_ledger(
    store: ObjectStore, run: str, ledger_path: str | None = None
) -> tuple[list[dict[str, Any]] | None, list[str]]:
    """(entries, problems) of the run's ledger: the store's copy, or the local file
    `ledger_path`. entries is None when there is nothing readable; problems holds the
    chain's problems, one line each. Never modifies `ledger_path`."""
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="near_jax-audit-") as tmp:
        copy = os.path.join(tmp, "ledger.sqlite")
        if ledger_path is not None:
            if not os.path.isfile(ledger_path):
                return None, [f"no ledger file at {ledger_path}"]
            # Work on a copy: opening the file itself could roll back a journal or change
            # its journal mode, and an audit must leave the evidence as it found it.
            try:
                shutil.copyfile(ledger_path, copy)
                if os.path.exists(ledger_path + "-journal"):
                    shutil.copyfile(ledger_path + "-journal", copy + "-journal")
            except OSError as e:
                return None, [f"cannot read {ledger_path}: {e.strerror or e}"]
        else:
            try:
                if not ledger.download(store, run, copy):
                    return None, [f"no ledger in the store (no {ledger.store_key(run)})"]
            except ledger.LedgerError as e:
                return None, [f"ledger: {e}"]
        problems += [f"ledger: {p}" for p in ledger.verify_chain(copy, run)]
        try:
            with ledger.Ledger.open(copy, run) as book:
                entries = book.entries()
        except Exception as e:  # noqa: BLE001 - a damaged file is a finding, not a crash
            problems.append(f"ledger: cannot read its entries: {_one_line(e)}")
            return None, problems
    return entries, problems


def verify(
    store: ObjectStore, run: str, *, ledger_path: str | None = None
) -> tuple[list[str], dict[str, Any]]:
    """(problems, summary) of an audit of contributor run `run` (see the module docstring);
    problems are one line each, [] when everything checks out. summary: rounds, entries,
    contributors, accepted, rejected and head (the ledger's last entry hash)."""
    summary: dict[str, Any] = {"rounds": 0, "entries": 0, "contributors": 0, "accepted": 0,
                               "rejected": 0, "head": ""}  # fmt: skip
    try:
        manifest = rounds.read_json(store, rounds.manifest_key(run))
    except (CorruptObject, ProtocolError) as e:
        return [f"the run manifest is unreadable: {_one_line(e)}"], summary
    if manifest is None:
        return [f"run {run!r} has no manifest {rounds.manifest_key(run)} (unknown run)"], summary
    contrib = manifest.get("contrib")
    if not isinstance(contrib, dict):
        why = f"run {run!r} has no contrib section in its manifest (not a contributor run)"
        return [why], summary

    entries, problems = read_ledger(store, run, ledger_path)
    registry = identity.registry(store, run)
    problems += [f"registry: {p}" for p in identity.registry_problems(store, run)]
    if entries is not None:
        for e in entries:
            problems += _signature_problems(e, registry, run)

    latest = 0
    try:
        info = rounds.read_latest(store, run)
    except (CorruptObject, ProtocolError) as e:
        info = None
        problems.append(f"the latest version is unreadable: {_one_line(e)}")
    else:
        if info is None:
            problems.append(f"run {run!r} has no {rounds.latest_key(run)}")
    if info is not None:
        version = info.get("version")
        if isinstance(version, int) and not isinstance(version, bool) and version >= 0:
            latest = version
        else:
            problems.append(f"{rounds.latest_key(run)} has version {version!r}")
    problems += _decision_problems(store, run, contrib, latest, entries)
    if entries is not None:
        problems += _reward_problems(entries)
        accepted = sum(bool(e["accepted"]) for e in entries)
        head = entries[-1]["entry_hash"] if entries else ledger.genesis_hash(run)
        summary.update(
            entries=len(entries),
            contributors=len({str(e["contributor"]) for e in entries}),
            accepted=accepted,
            rejected=len(entries) - accepted,
            head=head,
        )
    summary["rounds"] = latest
    return problems, summary


# ------------------------------------------------------------------------------ signatures


def signature_problem(entry: dict[str, Any], registry: dict[str, str], run: str) -> str:
    """'' if the entry's statement names it (run, round, contributor, payload) and its
    registered contributor signed it; otherwise why not, one phrase."""
    text = entry.get("statement")
    if not isinstance(text, str) or not text:
        return "it has no signed statement"
    try:
        fields = json.loads(text)
    except (TypeError, ValueError):
        return "its statement is not JSON"
    if not isinstance(fields, dict):
        return "its statement is not a JSON object"
    expected = {"run": run, "round": entry.get("round"), "contributor": entry.get("contributor"),
                "payload_sha256": entry.get("payload_sha256")}  # fmt: skip
    for name, value in expected.items():
        if fields.get(name) != value:
            return f"its statement names {name} {_short(fields.get(name))}, not {_short(value)}"
    public = registry.get(entry.get("contributor"))  # type: ignore[arg-type]
    if public is None:
        return f"contributor {_short(entry.get('contributor'))} is not registered"
    if not identity.verify_statement(public, fields, entry.get("signature")):  # type: ignore
        return f"its signature does not verify under {entry['contributor']!r}'s registered key"
    return ""


def _signature_problems(entry: dict[str, Any], registry: dict[str, str], run: str) -> list[str]:
    where = (f"ledger entry {entry['seq']} (round {entry['round']}, "
             f"{_short(entry['contributor'])})")  # fmt: skip
    why = signature_problem(entry, registry, run)
    if entry["accepted"]:
        if why:
            return [f"{where}: accepted, but {why}"]
        registered = identity.key_id(registry[entry["contributor"]])
        if entry["key_id"] != registered:
            return [f"{where}: key id {_short(entry['key_id'])}, the registered key's is "
                    f"{registered}"]  # fmt: skip
        return []
    reason = entry["reason"] if isinstance(entry["reason"], str) else ""
    if reason.startswith("bad signature") and not why:
        return [f"{where}: rejected as a bad signature, but it verifies"]
    return []  # other rejections may carry any signature, or none


# ------------------------------------------------------------------------------- decisions


def _decision_problems(
    store: ObjectStore,
    run: str,
    contrib: dict[str, Any],
    latest: int,
    entries: list[dict[str, Any]] | None,
) -> list[str]:
    problems: list[str] = []
    by_round: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for e in entries or []:
        by_round[e["round"]].append(e)
    aggregator_key = contrib.get("aggregator_key")
    commitment = contrib.get("seed_commitment")
    if not isinstance(commitment, str):
        problems.append("the manifest has no seed_commitment for round 0")
        commitment = None
    for r in range(latest):
        try:
            decision = rounds.read_json(store, rounds.decision_key(run, r))
        except (CorruptObject, ProtocolError) as e:
            decision, why = None, f"round {r}: the decision is unreadable: {_one_line(e)}"
        else:
            why = f"round {r}: no decision {rounds.decision_key(run, r)}, yet it is closed"
        section = decision.get("contrib") if decision is not None else None
        if decision is not None and not isinstance(section, dict):
            why = f"round {r}: the decision has no contrib section"
        if not isinstance(section, dict):
            problems.append(why)
            commitment = None  # the chain of commitments is broken from here on
            continue
        if commitment is not None:
            bad = _check_seed(aggregator_key, run, r, section.get("seed_signature"), commitment)
            if bad:
                problems.append(bad)
        nxt = section.get("next_seed_commitment")
        commitment = nxt if isinstance(nxt, str) else None
        if commitment is None:
            problems.append(f"round {r}: the decision has no next_seed_commitment")
        if entries is not None:
            problems += _compare_round(r, section.get("entries"), by_round.get(r, []))
    if entries is not None:
        extra = [e for e in entries if not isinstance(e["round"], int) or e["round"] >= latest]
        if extra:
            rounds_ = sorted({str(e["round"]) for e in extra})
            problems.append(
                f"the ledger has {len(extra)} entries of round(s) {', '.join(rounds_)}, at or "
                f"after version {latest}: no closed round lists them"
            )
    return problems


def _check_seed(public: Any, run: str, r: int, signature: Any, commitment: str) -> str:
    from near_jax.contrib import validator  # jax and the aggregator: only when auditing

    if not isinstance(public, str) or not isinstance(signature, str):
        return f"round {r}: the seed signature or the aggregator key is missing"
    return validator.check_seed(public, run, r, signature, commitment)


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
        except ValueError as e:
            problems.append(f"round {r}: the decision's entry {i} is malformed: {_one_line(e)}")
            continue
        # type() too: True == 1 and 1 == 1.0, yet the chain hashes them differently
        diff = [f for f in ledger.ENTRY_FIELDS
                if want[f] != row[f] or type(want[f]) is not type(row[f])]  # fmt: skip
        if diff:
            f = diff[0]
            problems.append(
                f"round {r}: ledger entry {row['seq']} ({_short(row['contributor'])}) differs "
                f"from the decision in {', '.join(diff)} ({f}: ledger {_short(row[f])}, "
                f"decision {_short(want[f])})"
            )
    return problems


# --------------------------------------------------------------------------------- rewards


def _reward_problems(entries: list[dict[str, Any]]) -> list[str]:
    problems = []
    totals: dict[Any, float] = defaultdict(float)
    for e in entries:
        reward = e["reward"]
        if isinstance(reward, bool) or not isinstance(reward, int | float):
            continue  # the chain check names mistyped values
        totals[e["round"]] += reward
        if not e["accepted"] and reward != 0:
            problems.append(
                f"ledger entry {e['seq']} (round {e['round']}, {_short(e['contributor'])}): "
                f"rejected, yet rewarded {reward!r}"
            )
    for r, total in sorted(totals.items(), key=lambda kv: str(kv[0])):
        if total > 1 + REWARD_TOLERANCE:
            problems.append(f"round {r}: rewards sum to {total!r}, more than the round's one unit")
    return problems


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__
