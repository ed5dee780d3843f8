"""Closing a round over K aggregator workers (`--shards=i/K`): each streams its own shards.

The coordinator (i = 0, the `Aggregator` that writes decisions) checks the contributions
and picks the applied set as usual, then publishes it as a proposal

    rounds/r/proposals/P     {round, base_sha256, accepted: [{island, key, sha256}], aggregation}

(P = `protocol.proposal_id` of the set). Worker i (1 ≤ i < K, a separate process or
machine: `ShardWorker`) derives the shards s with s mod K == i of every proposal of the
current round and writes their outputs under `rounds/r/out/P/`, then a result

    rounds/r/out/P/worker-i-of-K   {shards: {s: {part: sha256}}} or {defect: {island, reason}}

The coordinator derives its own shards (s mod K == 0), waits for every worker's result,
writes the manifest and commits the decision: the single commit point, as with K = 1. The
outputs are the same bytes whatever K is (each shard is computed the same way). A killed
worker leaves no result and simply derives its slice again when restarted; a contribution
whose shard a worker finds bad is rejected by the coordinator, which proposes again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from typing import Any

from near_jax.diloco import protocol, robust
from near_jax.diloco.protocol import ProtocolError, ShardDefect, Verdict, Version
from near_jax.diloco.store import CorruptObject, ObjectStore


def parse_shards(text: str) -> tuple[int, int]:
    """ "i/K" → (i, K) with 0 ≤ i < K; ValueError (one line) otherwise."""
    index, sep, count = str(text).partition("/")
    if not (sep and index.isdigit() and count.isdigit()) or not 0 <= int(index) < int(count):
        raise ValueError(f"--shards={text!r} is not i/K with 0 <= i < K (e.g. 0/1, 1/4)")
    return int(index), int(count)


def proposal_key(run: str, rnd: int, proposal: str) -> str:
    return f"{run}/rounds/{rnd:08d}/proposals/{proposal}"


def proposals_prefix(run: str, rnd: int) -> str:
    return f"{run}/rounds/{rnd:08d}/proposals/"


def result_key(run: str, rnd: int, proposal: str, index: int, count: int) -> str:
    return f"{protocol.out_prefix(run, rnd, proposal)}worker-{index}-of-{count}"


def my_shards(
    plan: protocol.ShardPlan, index: int, count: int, fragment: Iterable[int] | None = None
) -> list[int]:
    """Worker `index` of `count`'s shards of a round that syncs `fragment` (all shards by
    default): every count-th of them."""
    shards = range(plan.num_shards) if fragment is None else fragment
    return [s for i, s in enumerate(shards) if i % count == index]


def write_proposal(
    store: ObjectStore, run: str, base: Version, accepted: list[Verdict], rule: str | None
) -> str:
    """Publishes the applied set of round base.version for the workers; returns its id."""
    proposal = protocol.proposal_id(accepted, rule)
    body = {
        "round": base.version,
        "base_sha256": base.params_sha256,
        "accepted": [{"island": v.island, "key": v.key, "sha256": v.sha256} for v in accepted],
        "aggregation": rule,
    }
    store.put(proposal_key(run, base.version, proposal), protocol.dumps(body))
    return proposal


def read_result(store: ObjectStore, key: str) -> dict | None:
    """A worker's result (None while there is none, or while it is unreadable)."""
    try:
        return protocol.read_json(store, key)
    except (ProtocolError, CorruptObject):
        return None


def result_body(results: dict[int, dict[str, str]] | None, defect: ShardDefect | None) -> bytes:
    if defect is not None:
        return protocol.dumps({"defect": {"island": defect.island, "reason": defect.reason}})
    return protocol.dumps({"shards": {str(s): hashes for s, hashes in results.items()}})


def gather(
    store: ObjectStore,
    run: str,
    rnd: int,
    proposal: str,
    count: int,
    wait: Callable[[str], None],
) -> tuple[dict[int, dict[str, str]], ShardDefect | None]:
    """Every worker's shard hashes (or the first defect one found), waiting for them."""
    merged: dict[int, dict[str, str]] = {}
    for index in range(1, count):
        key = result_key(run, rnd, proposal, index, count)
        while (result := read_result(store, key)) is None:
            wait(f"worker {index}/{count}'s result for round {rnd}")
        if "defect" in result:
            defect = result["defect"]
            return merged, ShardDefect(str(defect.get("island")), str(defect.get("reason")))
        merged.update({int(s): hashes for s, hashes in result["shards"].items()})
    return merged, None


class ShardWorker:
    """Worker i of K: derives its shards of every proposal of the current round."""

    def __init__(
        self,
        store: ObjectStore,
        run: str,
        like: Any,
        index: int,
        count: int,
        *,
        poll_seconds: float = 0.25,
        sleep: Callable[[float], None] = time.sleep,
        log: Callable[[str], None] = lambda message: None,
    ):
        if not 1 <= index < count:
            raise ValueError(f"worker {index}/{count}: workers are 1..K-1 (0 is the coordinator)")
        self.store, self.run, self.like = store, run, like
        self.index, self.count = index, count
        self.poll_seconds, self.sleep, self.log = poll_seconds, sleep, log
        manifest = protocol.read_json(store, protocol.manifest_key(run))
        if manifest is None:
            raise ProtocolError(f"run {run!r} has no {protocol.manifest_key(run)}")
        self.plan = protocol.run_plan(manifest, like)
        self.spec, self.lr = manifest["compression"], manifest["outer_lr"]
        self.momentum = manifest["outer_momentum"]
        self.fragments = manifest.get("fragments", 1)
        self.done = 0  # proposals derived by this worker

    def poll_once(self) -> bool:
        """Derives every open proposal of the current round; False once the run is over."""
        store, run = self.store, self.run
        latest = protocol.read_latest(store, run)
        if latest is None:
            return True
        if store.exists(protocol.finished_key(run)):
            return False
        r = latest["version"]
        for key in store.list(proposals_prefix(run, r)):
            proposal = key.rsplit("/", 1)[-1]
            out = result_key(run, r, proposal, self.index, self.count)
            if store.exists(out) or store.exists(protocol.decision_key(run, r)):
                continue
            self._derive(r, proposal, key, out)
        return True

    def serve(self) -> None:
        """Polls until the run is finished."""
        while self.poll_once():
            self.sleep(self.poll_seconds)

    def _derive(self, r: int, proposal: str, key: str, out: str) -> None:
        body = json.loads(self.store.get(key))
        base = protocol.load_version(self.store, self.run, r, self.plan)
        if body.get("base_sha256") != base.params_sha256:
            return  # a proposal on another base: not this round's
        verdicts = protocol.recorded_verdicts(self.store, self.plan, body, r)
        rule = body.get("aggregation")
        parsed = None if rule is None else robust.Rule.parse(rule)
        fragment = protocol.run_fragment(self.plan, self.fragments, r)
        shards = my_shards(self.plan, self.index, self.count, fragment)
        try:
            _, results = protocol.derive_slice(
                self.store,
                self.run,
                self.plan,
                base,
                verdicts,
                shards,
                self.spec,
                self.lr,
                self.momentum,
                parsed,
            )
            self.store.put(out, result_body(results, None))
        except ShardDefect as e:
            self.store.put(out, result_body(None, e))
        self.done += 1
        self.log(f"round {r}: derived {len(shards)} shards of proposal {proposal}")
