"""Auditing a contributor run from its store alone: ledger, signatures, decisions, seeds, rewards.

`verify(store, run)` (or `audit`, which also hands back the entries) trusts nothing but the
run's manifest (its aggregator key — compare its key id with the one the run's operator
published out of band — and first seed commitment) and the registry's self-signed
entries, and checks

  decisions  every decision is signed by the aggregator key (`signing.check_decision`),
             is filed under its own round, and lists exactly the ledger's entries of that
             round, field by field: the signed decisions are the external anchor that
             exposes a truncated, rewritten or forged ledger, even one with a valid chain
  ledger     the hash chain of the store's ledger copy (segments reaching the index that
             the aggregator key signed; `ledger_mirror`), or of a local file `ledger_path`
  signatures every entry that is accepted or carries a key id (the aggregator's word that
             the contributor signed that round's statement, which is what can disqualify)
             carries a statement naming the entry's run, round, contributor and payload,
             signed by the contributor's registered key of that id; no entry was rejected
             as a "bad signature" that in fact verifies
  seeds      each round's revealed seed is signed by the aggregator key and matches the
             commitment published one round earlier
  rewards    a round pays out at most one unit, and nothing to rejected entries; the
             ratings replay round by round from the recorded performances, and each
             round's rewards are the shares those ratings and scores give (`ratings`)
  registry   an entry that fails validation is a warning (anybody can write junk under an
             unused name), but a problem under a name that signed ledger entries (a key
             that signed work became unreadable)

Rounds and the race with a live run: the aggregator records round r in the ledger (and
uploads its segment and the index) before it moves `latest` to r + 1, so `audit` reads
`latest` first and the ledger second: every round below `latest` is then closed, must have its
decision and must be in the ledger. Round `latest` itself may already be in the ledger
(committed and recorded, not yet published — or the aggregator was killed in between):
fine when its decision exists, is signed and matches; ledger rows of round `latest`
without such a decision, or of later rounds, are problems. (Ledger rows past `latest`
make `audit` read `latest` once more, in case the run moved on meanwhile.)

Messages name what the user gave (`--ledger` as passed, or the store's key), never a
temporary copy. A damaged or absurd store object (torn, not JSON, nested too deeply) is a
problem, never an exception; only a failing store itself raises StoreError.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from typing import Any

from near_jax._io import one_line, short_repr
from near_jax.contrib import audit_checks, identity, ledger, ledger_mirror, ledger_verify, registry
from near_jax.contrib.audit_checks import UNREADABLE
from near_jax.diloco import protocol
from near_jax.diloco.store import ObjectStore


@dataclasses.dataclass
class Audit:
    """The outcome of `audit`: problems (the run does not check out), warnings (worth a
    look, harmless), the summary, the ledger's entries (None when unreadable), the latest
    published version (rounds 0..latest-1 are closed) and the valid registry entries."""

    problems: list[str]
    warnings: list[str]
    summary: dict[str, Any]
    entries: list[dict[str, Any]] | None = None
    latest: int = 0
    registry: dict[str, str] = dataclasses.field(default_factory=dict)


def read_ledger(
    store: ObjectStore,
    run: str,
    ledger_path: str | None = None,
    aggregator_public: str | None = None,
) -> tuple[list[dict[str, Any]] | None, list[str]]:
    """(entries, problems) of the run's ledger: the store's copy (its index checked against
    `aggregator_public`, None: the run manifest's key), or the local file `ledger_path`.
    entries is None when there is nothing readable; problems holds the chain's problems,
    one line each, naming `ledger_path` (or the store's key), never the temporary copy that
    is read. Never modifies `ledger_path`."""
    label = ledger_path if ledger_path is not None else ledger_mirror.index_key(run)
    with tempfile.TemporaryDirectory(prefix="near_jax-audit-") as tmp:
        copy = os.path.join(tmp, "ledger.sqlite")

        def named(text: str) -> str:
            return f"ledger: {text.replace(copy, label)}"

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
                if not ledger_mirror.download(store, run, copy, aggregator_public):
                    return None, [f"no ledger in the store (no {ledger_mirror.index_key(run)})"]
            except ledger.LedgerError as e:
                return None, [named(str(e))]
        problems = [named(p) for p in ledger_verify.verify_chain(copy, run)]
        try:
            with ledger.Ledger.open(copy, run) as book:
                entries = book.entries()
        except Exception as e:  # noqa: BLE001 - a damaged file is a finding, not a crash
            problems.append(named(f"cannot read its entries: {one_line(e)}"))
            return None, problems
    return entries, problems


def verify(
    store: ObjectStore, run: str, *, ledger_path: str | None = None
) -> tuple[list[str], dict[str, Any]]:
    """(problems, summary) of an audit of contributor run `run` (see the module docstring);
    problems are one line each, [] when everything checks out. summary: aggregator_key_id,
    rounds (closed), entries, contributors, accepted, rejected, head (the ledger's last
    entry hash) and warnings (one line each; they do not fail the audit)."""
    result = audit(store, run, ledger_path=ledger_path)
    return result.problems, result.summary


def audit(store: ObjectStore, run: str, *, ledger_path: str | None = None) -> Audit:
    """The audit of contributor run `run` (see `verify` and the module docstring)."""
    summary: dict[str, Any] = {
        "aggregator_key_id": "",
        "rounds": 0,
        "entries": 0,
        "contributors": 0,
        "accepted": 0,
        "rejected": 0,
        "head": "",
        "warnings": [],
    }
    out = Audit([], summary["warnings"], summary)
    problems = out.problems
    try:
        manifest = protocol.read_json(store, protocol.manifest_key(run))
    except UNREADABLE as e:
        problems.append(
            f"the run manifest {protocol.manifest_key(run)} is unreadable: {one_line(e)}"
        )
        return out
    if manifest is None:
        problems.append(f"run {run!r} has no manifest {protocol.manifest_key(run)} (unknown run)")
        return out
    contrib = manifest.get("contrib")
    if not isinstance(contrib, dict):
        problems.append(
            f"run {run!r} has no contrib section in its manifest (not a contributor run)"
        )
        return out
    try:
        aggregator_key: str | None = identity.check_public_hex(contrib.get("aggregator_key"))
        summary["aggregator_key_id"] = identity.key_id(aggregator_key)
    except (identity.IdentityError, RecursionError) as e:
        aggregator_key = None
        problems.append(f"the manifest's aggregator_key is unusable: {one_line(e)}")

    # `latest` before the ledger: every round below it is then recorded (module docstring)
    latest, why = _read_latest(store, run)
    if why:
        problems.append(why)
    if ledger_path is None and aggregator_key is None:  # the store's copy is unverifiable
        entries, ledger_problems = None, []
    else:
        entries, ledger_problems = read_ledger(store, run, ledger_path, aggregator_key)
    problems += ledger_problems
    if entries and not why and max(_round_of(e) for e in entries) > latest:
        again, _ = _read_latest(store, run)  # the run may have moved on meanwhile, but
        # the ledger snapshot only holds the rounds up to its last one
        latest = max(latest, min(again, max(_round_of(e) for e in entries) + 1))

    registered, invalid = _registry(store, run)
    signers = {e["contributor"] for e in entries or [] if e["key_id"]}
    for name, message in invalid:
        if name in signers:
            problems.append(f"{message}; yet {name!r} signed entries in the ledger")
        else:
            out.warnings.append(message)
    for e in entries or []:
        problems += audit_checks.signature_problems(e, registered, run)
    problems += audit_checks.decision_problems(store, run, contrib, aggregator_key, latest, entries)
    if entries is not None:
        problems += audit_checks.reward_problems(entries)
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
    out.entries, out.latest, out.registry = entries, latest, registered
    return out


def _read_latest(store: ObjectStore, run: str) -> tuple[int, str]:
    """(latest version, '') or (0, why it is unusable)."""
    try:
        info = protocol.read_latest(store, run)
    except UNREADABLE as e:
        return 0, f"{protocol.latest_key(run)} is unreadable: {one_line(e)}"
    if info is None:
        return 0, f"run {run!r} has no {protocol.latest_key(run)}"
    version = info.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        return 0, f"{protocol.latest_key(run)} has version {short_repr(version)}"
    return version, ""


def _round_of(entry: dict[str, Any]) -> int:
    r = entry["round"]
    return r if isinstance(r, int) else -1


def _registry(store: ObjectStore, run: str) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """(name -> public key of every valid registry entry, [(name, why) of invalid ones])."""
    prefix = registry.registry_prefix(run)
    valid: dict[str, str] = {}
    invalid: list[tuple[str, str]] = []
    for key in store.list(prefix):
        name = key[len(prefix) :]
        try:
            protocol.check_name("contributor", name)
        except ValueError as e:
            invalid.append((name, f"registry entry {short_repr(key)}: {one_line(e)}"))
            continue
        try:
            public = registry.lookup(store, run, name)
        except identity.IdentityError as e:
            invalid.append((name, one_line(e)))
            continue
        except RecursionError:
            invalid.append((name, f"registry entry {key} is nested too deeply"))
            continue
        if public is not None:  # None: deleted since the listing
            valid[name] = public
    return valid, invalid
