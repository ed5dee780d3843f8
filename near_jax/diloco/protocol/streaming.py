"""Closing a round shard by shard: bounded memory, and splittable over workers.

For each shard s, across the applied contributions in island order: read the shard, check
its hash, decode, combine (the mean as a running float32 sum — the same operations as
`versions.average`, so the same bits; a robust rule stacks the n shards, O(n × shard)),
encode the update shard with the server's error feedback, take the outer step on θ_s and
m_s (read from the base version), and write θ_s', m_s', e_s' and Û_s under the round's
output prefix. Peak memory is a few shards (n shards for robust rules), never the model.

Outputs go to `out_prefix(run, r, proposal)`, where the proposal id hashes the applied set
and the rule: aggregators that race, restart or decide again with another set, and the K
workers of `--shards=i/K`, write disjoint or identical bytes, never conflicting ones. The
manifest is written after every shard; the decision (the commit point) after the manifest.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import numpy as np

from near_jax.diloco import robust
from near_jax.diloco.codec.compress import CompressionSpec, PayloadError, decode, encode
from near_jax.diloco.protocol.contributions import Verdict, read_delta_shard
from near_jax.diloco.protocol.keys import ProtocolError, out_prefix
from near_jax.diloco.protocol.manifests import (
    PARTS,
    VersionManifest,
    decode_shard,
    read_shard,
    root,
    shard_limit,
)
from near_jax.diloco.protocol.objects import dumps, sha256, tree_bytes
from near_jax.diloco.protocol.shards import ShardPlan
from near_jax.diloco.protocol.versions import Version, outer_update, write_manifest
from near_jax.diloco.store import ObjectStore

OUTPUTS = (*PARTS, "update")


def proposal_id(accepted: list[Verdict], rule: str | None) -> str:
    """16 hex digits naming an applied set (keys and object hashes, in order) and rule."""
    body = dumps({"accepted": [[v.key, v.sha256] for v in accepted], "aggregation": rule})
    return sha256(body)[:16]


def _streams(rule: robust.Rule | None) -> bool:
    # The mean (and top_g, whose selection happened before) add up one contribution at a time.
    return rule is None or rule.name in ("mean", "top_g")


def base_shard(store: ObjectStore, plan: ShardPlan, base: Version, part: str, s: int) -> list:
    """Shard `s` of a part of the base version, from memory if held, else from the store."""
    held = getattr(base, part, None) if part != "server_ef" else None
    if held and s in held:
        return held[s]
    key = base.manifest.key(part, s)
    try:
        body = read_shard(store, key, base.manifest.hashes(part)[s], shard_limit(plan, s))
        return decode_shard(body, plan, s, key, fp32=True)
    except (ProtocolError, PayloadError) as e:
        raise BaseDamaged(f"version {base.version}: {e}") from None


class BaseDamaged(ProtocolError):
    """A shard of the published base version does not read back as its manifest says."""


def derive_shard(
    store: ObjectStore,
    run: str,
    plan: ShardPlan,
    base: Version,
    accepted: list[Verdict],
    s: int,
    spec: CompressionSpec | str,
    lr: float,
    mu: float,
    rule: robust.Rule | None,
    prefix: str,
    write: bool = True,
) -> dict[str, str]:
    """The outputs of shard `s` (written under `prefix` when `write`); their sha256 by part.
    ShardDefect if one of the contributions' shard is missing, changed or invalid."""
    r = base.version
    if _streams(rule):  # in place: peak ~8 shards (encode's temporaries), whatever n is
        total = None
        for verdict in accepted:
            pieces = read_delta_shard(store, run, r, plan, verdict, s)
            if total is None:  # freshly decoded: ours to add into
                total = pieces
            else:
                for a, b in zip(total, pieces, strict=True):
                    np.add(a, b, out=a)
            del pieces
        n = np.float32(len(accepted))
        combined = [np.divide(x, n, out=x) for x in total]
        del total
    else:
        stack = [read_delta_shard(store, run, r, plan, v, s) for v in accepted]
        combined = robust.combine(rule, stack)
        del stack
    out = {}

    def emit(part: str, body: bytes) -> None:
        if write:
            store.put(f"{prefix}{part}/{s:06d}", body)
        out[part] = sha256(body)

    error_feedback = base_shard(store, plan, base, "server_ef", s)
    payload, new_ef = encode(combined, spec, error_feedback=error_feedback)
    del combined, error_feedback
    emit("server_ef", tree_bytes(new_ef))
    del new_ef
    emit("update", payload.to_bytes())
    update = decode(payload, like=plan.shard_like(s))
    del payload
    params = base_shard(store, plan, base, "params", s)
    momentum = base_shard(store, plan, base, "momentum", s)
    new_params, new_momentum = outer_update(params, momentum, update, lr, mu)
    del params, momentum, update
    emit("params", tree_bytes(new_params))
    del new_params
    emit("momentum", tree_bytes(new_momentum))
    return out


@dataclasses.dataclass
class Derived:
    """A round's outputs: version r + 1 and its update's root (None: nothing applied)."""

    version: Version
    update_sha256: str | None


def derive(
    store: ObjectStore,
    run: str,
    plan: ShardPlan,
    base: Version,
    accepted: list[Verdict],
    spec: CompressionSpec | str,
    lr: float,
    mu: float,
    rule: robust.Rule | None = None,
    *,
    write: bool = True,
    progress: Callable[[int, int], None] | None = None,
    shards: Iterable[int] | None = None,
) -> Derived:
    """Version base+1 from the applied contributions (in order), shard by shard (`shards`:
    the round's fragment; all by default, the others carried over from base); writes every
    output and then the manifest (unless `write` is False: hashes only). No applied
    contribution: version base+1 = base (the same manifest; nothing is written)."""
    if not accepted:
        same = dataclasses.replace(base, version=base.version + 1)
        return Derived(same, None)
    wanted = range(plan.num_shards) if shards is None else shards
    prefix, results = derive_slice(
        store, run, plan, base, accepted, wanted, spec, lr, mu, rule, write=write, progress=progress
    )
    return finish(store, plan, base, prefix, results, write, shards)


def derive_slice(
    store: ObjectStore,
    run: str,
    plan: ShardPlan,
    base: Version,
    accepted: list[Verdict],
    shards: Iterable[int],
    spec: CompressionSpec | str,
    lr: float,
    mu: float,
    rule: robust.Rule | None = None,
    *,
    write: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[str, dict[int, dict[str, str]]]:
    """The given shards of a round (all of them for `derive`; one worker's share with
    `--shards=i/K`): (output prefix, {shard: hashes})."""
    prefix = out_prefix(run, base.version, proposal_id(accepted, _rule_text(rule)))
    wanted = list(shards)
    results = {}
    for done, s in enumerate(wanted, 1):
        results[s] = derive_shard(
            store, run, plan, base, accepted, s, spec, lr, mu, rule, prefix, write
        )
        if progress is not None:
            progress(done, len(wanted))
    return prefix, results


def finish(
    store: ObjectStore,
    plan: ShardPlan,
    base: Version,
    prefix: str,
    results: dict[int, dict[str, str]],
    write: bool = True,
    shards: Iterable[int] | None = None,
) -> Derived:
    """Version base+1 from the output hashes of every shard the round derived (`shards`;
    all by default): writes (when `write`) its manifest. Shards a fragmented round left
    alone keep base's objects (the manifest's origin names where)."""
    every = range(plan.num_shards)
    wanted = set(every if shards is None else shards)
    missing = sorted(wanted - set(results))
    if missing:
        raise ValueError(f"shards {missing[:8]} of round {base.version} have no result")
    if wanted == set(every):
        hashes = {part: tuple(results[s][part] for s in every) for part in OUTPUTS}
        manifest = VersionManifest(prefix, plan.plan_id(), **hashes)
    else:
        old = base.manifest
        hashes = {
            part: tuple(results[s][part] if s in wanted else old.hashes(part)[s] for s in every)
            for part in PARTS
        }
        hashes["update"] = tuple(results[s]["update"] if s in wanted else None for s in every)
        origin = tuple(prefix if s in wanted else old.shard_prefix(s) for s in every)
        manifest = VersionManifest(prefix, plan.plan_id(), **hashes, origin=origin)
    key = prefix + "manifest"
    sha = write_manifest(store, key, manifest) if write else sha256(manifest.to_bytes())
    return Derived(Version(base.version + 1, manifest, key, sha), root(hashes["update"]))


def _rule_text(rule: robust.Rule | None) -> str | None:
    return None if rule is None else str(rule)
