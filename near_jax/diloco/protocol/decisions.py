"""Decisions: closing a round, replaying it, following it, and checking a whole run."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from near_jax.diloco import robust
from near_jax.diloco.codec.compress import CompressionSpec, Payload, PayloadError, decode, encode
from near_jax.diloco.protocol.contributions import Verdict, unpack_contribution
from near_jax.diloco.protocol.keys import (
    FORMAT,
    ProtocolError,
    decision_key,
    manifest_key,
    update_key,
)
from near_jax.diloco.protocol.objects import (
    get_tree_object,
    num_elements,
    read_json,
    sha256,
    tree_from_bytes_any,
)
from near_jax.diloco.protocol.versions import (
    Version,
    average,
    make_version,
    outer_update,
    pull_version,
    read_latest,
    write_version,
)
from near_jax.diloco.store import CorruptObject, ObjectStore


def derive(
    base: Version,
    payloads: list[Payload],
    spec: CompressionSpec | str,
    lr: float,
    mu: float,
    like: Any,
    combine: Callable[[list[Any]], Any] = average,
) -> tuple[Version, bytes | None]:
    """Version base+1 and the update's stored bytes from the applied payloads (in order),
    combined by `combine` (the mean; contrib passes its robust rules).

    No payloads: version base+1 = base (params, momentum and error feedback unchanged).
    """
    if not payloads:
        same = dataclasses.replace(base, version=base.version + 1)
        return same, None
    mean = combine([decode(p, like=like) for p in payloads])
    update_payload, server_ef = encode(mean, spec, error_feedback=base.server_ef)
    update = decode(update_payload, like=like)
    params, momentum = outer_update(base.params, base.momentum, update, lr, mu)
    new = make_version(base.version + 1, params, momentum, server_ef)
    return new, update_payload.to_bytes()


def combiner(decision: dict) -> Callable[[list[Any]], Any]:
    """How decision's applied contributions are combined: the mean, or the robust rule it
    names in "aggregation" (contributor runs; `near_jax.diloco.robust`)."""
    rule = decision.get("aggregation")
    if rule is None:
        return average
    try:
        parsed = robust.Rule.parse(rule)
    except ValueError as e:
        raise ProtocolError(f"round {decision.get('round')}: {e}") from None
    return lambda deltas: robust.combine(parsed, deltas)


def make_decision(
    run: str,
    base: Version,
    new: Version,
    verdicts: list[Verdict],
    late: list[dict],
    reason: str,
    update: bytes | None,
    now: float,
    **extra: Any,
) -> dict:
    """The decision object of round base.version (see the module docstring); `extra` adds
    fields (contrib: the aggregation rule, scores, the revealed seed)."""
    accepted = sorted((v for v in verdicts if v.valid), key=lambda v: v.island)
    rejected = sorted((v for v in verdicts if not v.valid), key=lambda v: v.island)
    return {
        **extra,
        "format": FORMAT,
        "run": run,
        "round": base.version,
        "base_sha256": base.params_sha256,
        "reason": reason,
        "closed_at": now,
        "accepted": [{"island": v.island, "key": v.key, "sha256": v.sha256} for v in accepted],
        "rejected": [{"island": v.island, "key": v.key, "reason": v.reason} for v in rejected],
        "late": late,
        "update_sha256": sha256(update) if update is not None else None,
        "result": {"version": new.version, **new.hashes()},
    }


def replay_decision(
    store: ObjectStore, run: str, base: Version, decision: dict, spec, lr, mu, like
) -> tuple[Version, bytes | None]:
    """Recomputes version r+1 from a recorded decision and checks it against its hashes."""
    r = base.version
    if decision.get("round") != r or decision.get("base_sha256") != base.params_sha256:
        raise ProtocolError(f"decision of round {r} does not start from version {r}")
    payloads = []
    for entry in decision["accepted"]:
        body = get_tree_object(store, entry["key"], like)
        if body is None or sha256(body) != entry["sha256"]:
            raise ProtocolError(f"{entry['key']}, applied in round {r}, is missing or changed")
        payloads.append(unpack_contribution(body, num_elements(like))[1])
    new, update = derive(base, payloads, spec, lr, mu, like, combiner(decision))
    if new.hashes() != {k: v for k, v in decision["result"].items() if k != "version"}:
        raise ProtocolError(f"recomputing round {r} does not reproduce its recorded result")
    return new, update


def write_derived(
    store: ObjectStore, run: str, rnd: int, new: Version, update: bytes | None
) -> None:
    """Writes the objects derived from decision `rnd` (idempotent: deterministic bytes); the
    aggregator then moves `latest` (`advance_latest`), last."""
    if update is not None:
        store.put(update_key(run, rnd), update)
    write_version(store, run, new)


def apply_update(
    store: ObjectStore, run: str, held: Version, spec, lr: float, mu: float, like: Any
) -> Version:
    """Version held+1 from held and the published update of round held.version; checks the
    result against the decision's hashes (ProtocolError on any mismatch)."""
    r = held.version
    decision = read_json(store, decision_key(run, r))
    if decision is None:
        raise ProtocolError(f"round {r} has no decision yet")
    if decision.get("base_sha256") != held.params_sha256:
        raise ProtocolError(f"round {r} was decided on another base")
    result = decision["result"]
    if decision["update_sha256"] is None:
        new = dataclasses.replace(held, version=r + 1)
    else:
        body = get_tree_object(store, update_key(run, r), like)
        if body is None or sha256(body) != decision["update_sha256"]:
            raise ProtocolError(f"{update_key(run, r)} is missing or does not match")
        update = tree_from_bytes_any(body, like, update_key(run, r))
        params, momentum = outer_update(held.params, held.momentum, update, lr, mu)
        new = make_version(r + 1, params, momentum)
    if (new.params_sha256, new.momentum_sha256) != (
        result["params_sha256"],
        result["momentum_sha256"],
    ):
        raise ProtocolError(f"applying update {r} locally does not give version {r + 1}'s hash")
    return new


def verify_run(store: ObjectStore, run: str, like: Any) -> list[str]:
    """Replays the whole run from version 0: every stored version must equal the previous one
    plus its decision, applied once. Returns the problems found ([] = consistent)."""
    manifest = read_json(store, manifest_key(run))
    if manifest is None:
        return [f"no {manifest_key(run)}"]
    spec, lr, mu = manifest["compression"], manifest["outer_lr"], manifest["outer_momentum"]
    latest = read_latest(store, run) or {"version": 0}
    problems: list[str] = []
    held = pull_version(store, run, 0, like, with_server_ef=True)
    for r in range(latest["version"]):
        decision = read_json(store, decision_key(run, r))
        if decision is None:
            return problems + [f"round {r} has no decision but latest is {latest['version']}"]
        try:
            new, update = replay_decision(store, run, held, decision, spec, lr, mu, like)
            stored = pull_version(store, run, r + 1, like, with_server_ef=True)
        except (ProtocolError, CorruptObject, PayloadError) as e:
            return problems + [f"round {r}: {e}"]
        if stored.hashes() != new.hashes():
            problems.append(f"version {r + 1} differs from replaying decision {r}")
        if update is not None and get_tree_object(store, update_key(run, r), like) != update:
            problems.append(f"{update_key(run, r)} differs from its replay")
        held = new
    if latest and latest.get("params_sha256", held.params_sha256) != held.params_sha256:
        problems.append("latest's hash differs from the replayed version")
    return problems
