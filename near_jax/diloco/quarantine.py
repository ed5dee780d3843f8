"""Objects the aggregator did not write, found in slots only it writes: moved aside, redone.

Anyone who can write to the store can plant an object at `rounds/r/decision` or `latest`.
The aggregator reads those slots through `read_own`: an object that is torn, unparsable,
not shaped like what it writes (`decision_problem`, `latest_problem`) or, in a run with an
aggregator key, not signed by it, is moved to `RUN/quarantine/…` (its raw bytes kept as
evidence, see `move_aside`) with a warning naming both keys, and the slot counts as empty:
the round is decided again, `latest` is rebuilt from the newest version that verifies
(`recover_latest`). The protocol docstring (`near_jax.diloco.protocol`) has the whole picture.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from near_jax.diloco import protocol
from near_jax.diloco.protocol import ProtocolError, Version
from near_jax.diloco.store import MAX_OBJECT_BYTES, CorruptObject, ObjectStore, UnsafePath

MAX_EVIDENCE_BYTES = 1 << 20  # what of a quarantined object is kept


def quarantine_key(run: str, key: str, now: float) -> str:
    """Where the object at `key` goes: RUN/quarantine/<key with '/' → '.'>.<milliseconds>."""
    return f"{run}/quarantine/{key[len(run) + 1 :].replace('/', '.')}.{int(now * 1000)}"


def move_aside(store: ObjectStore, run: str, key: str, now: float) -> str:
    """Moves the object at `key` to its quarantine key: its first MAX_EVIDENCE_BYTES raw
    stored bytes become the body of an intact object there; `key` is deleted only if it
    still holds what was read (a genuine object written meanwhile stays). A link is
    removed, not followed. Returns the quarantine key ("" if `key` was already gone)."""
    dest = quarantine_key(run, key, now)
    try:
        got = store.read_prefix(key, MAX_EVIDENCE_BYTES)
    except UnsafePath as e:
        store.put(dest, f"not moved: {e.reason}".encode())
        store.delete(key)
        return dest
    if got is None:
        return ""
    raw, _, generation = got
    store.put(dest, raw)
    store.delete(key, if_equal=generation)
    return dest


def read_own(
    store: ObjectStore,
    run: str,
    key: str,
    problem: Callable[[dict], str],
    log: Callable[[str], None],
    now: float,
) -> dict | None:
    """The JSON object at `key` if it is one the aggregator wrote (`problem(obj)` == ""),
    else None: missing, or moved aside with a warning."""
    try:
        obj = protocol.read_json(store, key, max_bytes=MAX_OBJECT_BYTES)
        why = "" if obj is None else problem(obj)
    except (CorruptObject, ProtocolError) as e:
        obj, why = None, str(e)
    if not why:
        return obj
    aside = move_aside(store, run, key, now)
    log(
        f"warning: {key} is not an object this aggregator wrote ({why[:200]}); "
        f"moved it to {aside or '(it vanished)'} and treat the slot as empty"
    )
    return None


def _is(value: Any, kind: type | tuple[type, ...]) -> bool:
    return isinstance(value, kind) and not isinstance(value, bool)


def decision_problem(decision: dict, run: str, base: Version) -> str:
    """Why `decision` cannot be round base.version's decision as the aggregator writes it
    ("" if it can): the fields `protocol.make_decision` writes, of the right types, naming
    this run, round and base, with contribution keys of this round."""
    r = base.version
    want = {"format": protocol.FORMAT, "run": run, "round": r, "base_sha256": base.params_sha256}
    for name, value in want.items():
        if decision.get(name) != value:
            return f"{name} is {json.dumps(decision.get(name))[:40]}, expected {value!r}"
    for name in ("accepted", "rejected", "late"):
        entries = decision.get(name)
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            return f"{name} is not a list of entries"
    for e in decision["accepted"]:
        island, sha = e.get("island"), e.get("sha256")
        if not _is(island, str) or e.get("key") != protocol.contrib_key(run, r, island):
            return "an accepted entry names no contribution of this round"
        if not _is(sha, str):
            return "an accepted entry has no sha256"
    result = decision.get("result")
    if not isinstance(result, dict) or result.get("version") != r + 1:
        return f"its result is not version {r + 1}"
    if not all(_is(result.get(k), str) for k in ("params_sha256", "momentum_sha256")):
        return "its result has no hashes"
    if not _is(decision.get("reason"), str) or not _is(decision.get("closed_at"), (int, float)):
        return "it has no reason or closing time"
    if decision.get("update_sha256") is not None and not _is(decision["update_sha256"], str):
        return "its update_sha256 is not a hash"
    return ""


def latest_problem(latest: dict) -> str:
    """Why `latest` is not shaped like the aggregator's ("" if it is)."""
    version = latest.get("version")
    if not _is(version, int) or version < 0:
        return "it names no version"
    if not all(_is(latest.get(k), str) for k in ("params_sha256", "momentum_sha256")):
        return "it has no hashes"
    if not _is(latest.get("published_at"), (int, float)):
        return "it has no publication time"
    return ""


def version_problem(
    store: ObjectStore, plan: protocol.ShardPlan, version: Version, read: bool = True
) -> str:
    """Why a version's stored shards do not verify against its manifest ("" if they all
    do): each is read, one at a time, and hashed — or, with read=False, only checked to
    exist (a restart must not read the whole model; reads check hashes as they go)."""
    for part in protocol.PARTS:
        for s, sha in enumerate(version.manifest.hashes(part)):
            key = version.manifest.key(part, s)
            if not read:
                if not store.exists(key):
                    return f"{key} is missing"
                continue
            try:
                protocol.read_shard(
                    store, version.manifest.key(part, s), sha, protocol.shard_limit(plan, s)
                )
            except ProtocolError as e:
                return str(e)
    return ""


def recover_latest(store: ObjectStore, run: str, plan: protocol.ShardPlan, now: float) -> Version:
    """Rebuilds a missing `latest`: the newest version whose objects verify against the
    decision that produced it (found by probing decisions), else version 0; moves `latest`
    to it. A committed round after it is finished by replaying its decision, as usual."""
    newest = 0  # the newest round with a decision: probe doubling, then bisect
    step = 1
    while store.exists(protocol.decision_key(run, newest + step - 1)):
        newest, step = newest + step, step * 2
    while step > 1:
        step //= 2
        if store.exists(protocol.decision_key(run, newest + step - 1)):
            newest += step
    for version in range(newest, -1, -1):  # decision newest-1 → version newest, ...
        try:
            held = protocol.load_version(store, run, version, plan)
        except (ProtocolError, CorruptObject, KeyError, TypeError, AttributeError):
            continue
        if version_problem(store, plan, held):
            continue
        protocol.advance_latest(store, run, held, now)
        return held
    raise ProtocolError(f"run {run!r}: no stored version verifies, not even version 0")
