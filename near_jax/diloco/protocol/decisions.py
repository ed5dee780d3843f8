"""Decisions: recording a round, replaying it, following it, and checking a whole run."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from near_jax.diloco import robust
from near_jax.diloco.codec.compress import PayloadError, decode
from near_jax.diloco.codec.payload import Payload
from near_jax.diloco.protocol.contributions import (
    ShardDefect,
    Verdict,
    contribution_limit,
    split_contribution,
)
from near_jax.diloco.protocol.keys import FORMAT, ProtocolError, decision_key, manifest_key
from near_jax.diloco.protocol.manifests import ContribManifest, read_shard, shard_limit
from near_jax.diloco.protocol.objects import read_json, sha256, tree_bytes
from near_jax.diloco.protocol.shards import ShardPlan, from_record
from near_jax.diloco.protocol.streaming import Derived, derive
from near_jax.diloco.protocol.versions import (
    PullCache,
    Version,
    fetch_shard,
    load_version,
    outer_update,
    read_latest,
)
from near_jax.diloco.store import CorruptObject, ObjectStore


def run_plan(manifest: dict, like: Any) -> ShardPlan:
    """The shard plan run.json records (ProtocolError if it is missing or malformed)."""
    try:
        return from_record(like, manifest["shards"])
    except (KeyError, TypeError, ValueError) as e:
        raise ProtocolError(f"the run's shard plan is unusable: {e}") from None


def run_fragment(plan: ShardPlan, fragments: Any, r: int) -> tuple[int, ...]:
    """The shards round r of a run with `fragments` (run.json's; 1 when absent) syncs;
    ProtocolError if the run's record is unusable."""
    if type(fragments) is not int:
        raise ProtocolError(f"the run's fragments {fragments!r:.40} is not an integer")
    try:
        return plan.fragment(fragments, r)
    except ValueError as e:
        raise ProtocolError(f"the run's fragments: {e}") from None


def combiner(decision: dict) -> robust.Rule | None:
    """How decision's applied contributions are combined: None for the mean, or the robust
    rule it names in "aggregation" (contributor runs; `near_jax.diloco.robust`)."""
    rule = decision.get("aggregation")
    if rule is None:
        return None
    try:
        return robust.Rule.parse(rule)
    except ValueError as e:
        raise ProtocolError(f"round {decision.get('round')}: {e}") from None


def make_decision(
    run: str,
    base: Version,
    derived: Derived,
    verdicts: list[Verdict],
    late: list[dict],
    reason: str,
    now: float,
    **extra: Any,
) -> dict:
    """The decision object of round base.version (see the package docstring); `extra` adds
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
        "update_sha256": derived.update_sha256,
        "result": {"version": derived.version.version, **derived.version.hashes()},
    }


def recorded_verdicts(store: ObjectStore, plan: ShardPlan, decision: dict, r: int) -> list[Verdict]:
    """The accepted contributions a decision names, re-read and checked against its hashes."""
    verdicts = []
    for entry in decision["accepted"]:
        key = entry["key"]
        try:
            body = store.get(key, max_bytes=contribution_limit(plan))
        except CorruptObject:
            body = None
        if body is None or sha256(body) != entry["sha256"]:
            raise ProtocolError(f"{key}, applied in round {r}, is missing or changed")
        try:
            tag, data = split_contribution(body)
            manifest = ContribManifest.from_bytes(data, plan)
        except PayloadError as e:
            raise ProtocolError(f"{key}, applied in round {r}: {e}") from None
        verdicts.append(Verdict(key, entry["island"], entry["sha256"], manifest, tag=tag))
    return verdicts


def replay_decision(
    store: ObjectStore,
    run: str,
    plan: ShardPlan,
    base: Version,
    decision: dict,
    spec,
    lr: float,
    mu: float,
    write: bool = True,
    shards: Iterable[int] | None = None,
) -> Derived:
    """Recomputes version r+1 from a recorded decision (rewriting its outputs when `write`)
    and checks it against the decision's hashes; `shards`: the round's fragment (all by
    default)."""
    r = base.version
    if decision.get("round") != r or decision.get("base_sha256") != base.params_sha256:
        raise ProtocolError(f"decision of round {r} does not start from version {r}")
    accepted = recorded_verdicts(store, plan, decision, r)
    try:
        derived = derive(
            store,
            run,
            plan,
            base,
            accepted,
            spec,
            lr,
            mu,
            combiner(decision),
            write=write,
            shards=shards,
        )
    except ShardDefect as e:
        raise ProtocolError(
            f"round {r}: a shard of {e.island}'s contribution: {e.reason}"
        ) from None
    want = {k: v for k, v in decision["result"].items() if k != "version"}
    if derived.version.hashes() != want or derived.update_sha256 != decision["update_sha256"]:
        raise ProtocolError(f"recomputing round {r} does not reproduce its recorded result")
    return derived


def apply_update(
    store: ObjectStore,
    run: str,
    plan: ShardPlan,
    held: Version,
    lr: float,
    mu: float,
    cache: PullCache | None = None,
) -> Version:
    """Version held+1 from held (the shards it holds) and the published update of round
    held.version, shard by shard; checks each new shard against version held+1's manifest
    (ProtocolError on any mismatch)."""
    r = held.version
    decision = read_json(store, decision_key(run, r))
    if decision is None:
        raise ProtocolError(f"round {r} has no decision yet")
    if decision.get("base_sha256") != held.params_sha256:
        raise ProtocolError(f"round {r} was decided on another base")
    new = load_version(store, run, r + 1, plan, decision["result"])
    if decision["update_sha256"] is None:
        return dataclasses.replace(new, params=held.params, momentum=held.momentum)
    manifest = new.manifest
    if manifest.update is None:
        raise ProtocolError(f"{new.manifest_key} lists no update for round {r}")
    for s in sorted(held.params):
        if manifest.update[s] is None:  # not in the round's fragment: carried over as it was
            for part in ("params", "momentum"):
                if sha256(tree_bytes(getattr(held, part)[s])) != manifest.hashes(part)[s]:
                    raise ProtocolError(
                        f"version {r + 1} changes shard {s}'s {part} without an update"
                    )
            new.params[s], new.momentum[s] = held.params[s], held.momentum[s]
            continue
        key = manifest.key("update", s)
        body = fetch_shard(store, key, manifest.update[s], shard_limit(plan, s), cache)
        try:
            payload = Payload.from_bytes(body, max_elements=plan.shard_elements(s))
            update = decode(payload, like=plan.shard_like(s))
        except PayloadError as e:
            raise ProtocolError(f"{key}: {e}") from None
        params, momentum = outer_update(held.params[s], held.momentum[s], update, lr, mu)
        for part, tree in (("params", params), ("momentum", momentum)):
            if sha256(tree_bytes(tree)) != manifest.hashes(part)[s]:
                raise ProtocolError(
                    f"applying update {r} to shard {s} locally does not give version "
                    f"{r + 1}'s {part}"
                )
        new.params[s], new.momentum[s] = params, momentum
    if cache is not None:
        cache.clear()
    return new


def verify_run(store: ObjectStore, run: str, like: Any) -> list[str]:
    """Replays the whole run from version 0: every stored version must equal the previous one
    plus its decision, applied once. Returns the problems found ([] = consistent)."""
    manifest = read_json(store, manifest_key(run))
    if manifest is None:
        return [f"no {manifest_key(run)}"]
    spec, lr, mu = manifest["compression"], manifest["outer_lr"], manifest["outer_momentum"]
    fragments = manifest.get("fragments", 1)
    try:
        plan = run_plan(manifest, like)
        held = load_version(store, run, 0, plan)
    except ProtocolError as e:
        return [str(e)]
    latest = read_latest(store, run) or {"version": 0}
    problems: list[str] = []
    for r in range(latest["version"]):
        decision = read_json(store, decision_key(run, r))
        if decision is None:
            return problems + [f"round {r} has no decision but latest is {latest['version']}"]
        try:
            fragment = run_fragment(plan, fragments, r)
            derived = replay_decision(
                store, run, plan, held, decision, spec, lr, mu, write=False, shards=fragment
            )
            new = derived.version
            problems += _stored_differs(store, plan, new, r)
        except (ProtocolError, CorruptObject, PayloadError) as e:
            return problems + [f"round {r}: {e}"]
        held = new
    if latest and latest.get("params_sha256", held.params_sha256) != held.params_sha256:
        problems.append("latest's hash differs from the replayed version")
    return problems


def _stored_differs(store: ObjectStore, plan: ShardPlan, new: Version, r: int) -> list[str]:
    """Problems with the stored objects of version r + 1 (each read and hashed)."""
    problems = []
    parts = ("params", "momentum", "server_ef") + (("update",) if new.manifest.update else ())
    for part in parts:
        for s, want in enumerate(new.manifest.hashes(part)):
            if want is None:  # an update that left this shard alone
                continue
            key = new.manifest.key(part, s)
            try:
                read_shard(store, key, want, shard_limit(plan, s))
            except ProtocolError as e:
                problems.append(f"version {r + 1}: {e}")
    return problems
