"""One round's exchange with the run, as an island sees it: push Δ, wait, learn, follow.

    comm = Exchange(store, run, island, plan, hosts, waiter, (lr, mu), cache, signing)
    result = comm.round(held, delta, spec, error_feedback, extra)   # -> RoundResult

`round` touches only the store (and, on a multi-host island, host 0's broadcasts), never the
devices' params, so a one-process island can run it in a background thread while it trains
on (`--overlap`); the loop (`loop.py`) decides what to do with the result.
"""

from __future__ import annotations

import dataclasses

from near_jax.diloco import protocol
from near_jax.diloco.island.follow import Waiter, catch_up, newer, now, tolerant
from near_jax.diloco.island.hosts import Hosts
from near_jax.diloco.store import ObjectStore


@dataclasses.dataclass
class RoundResult:
    """What one round's exchange ended with."""

    held: protocol.Version | None  # the version the island follows next (None: run ended)
    end_now: bool  # the run finished at the round's base version: nothing more to apply
    end: int  # the run's final version once it is finished, else -1
    full: bool  # the version came by a full pull rather than updates
    pushed_bytes: int  # what this host wrote (0 when the round closed before the push)
    wait_s: float  # waiting for the aggregator's next version after the push
    accepted: bool
    late: bool
    accepted_own: bool  # our stored push was applied: its error feedback is the new one
    error_feedback: protocol.Shards | None
    outcome: str
    note: str
    scored: dict


class Exchange:
    """An island's side of the protocol for one round at a time (see the module doc)."""

    def __init__(
        self,
        store: ObjectStore,
        run: str,
        island: str,
        plan: protocol.ShardPlan,
        hosts: Hosts,
        waiter: Waiter,
        outer: tuple[float, float],
        cache: protocol.PullCache,
        signing: tuple,
    ):
        self.store, self.run, self.island, self.plan, self.hosts = store, run, island, plan, hosts
        self.waiter, self.cache, self.signing = waiter, cache, signing
        self.lr, self.mu = outer
        self.lead = hosts.index == 0

    def finished_version(self) -> int:
        """The run's final version if it is finished, else -1 (host 0's reading)."""
        if not self.lead:
            return -1
        store, run, island = self.store, self.run, self.island
        finished = tolerant(island, lambda: protocol.read_json(store, protocol.finished_key(run)))
        return finished["version"] if finished is not None else -1

    def round(
        self,
        held: protocol.Version,
        delta: protocol.Shards,
        spec: str,
        error_feedback: protocol.Shards | None,
        extra: dict,
        fragment: tuple[int, ...] | None = None,
    ) -> RoundResult:
        """Pushes Δ on base `held` (unless its round closed; `fragment`: the shards the
        round syncs, all by default), waits for the next version, reads the decision, and
        follows to the newest version."""
        store, run, island, hosts = self.store, self.run, self.island, self.hosts
        r = held.version
        decided = self.lead and tolerant(
            island, lambda: store.exists(protocol.decision_key(run, r))
        )
        pushed_bytes, written, new_ef, note = 0, False, None, ""
        if hosts.agree(bool(decided)):
            note = "round closed before the push (late; not sent)"
        else:
            written, pushed_bytes, new_ef, note = _push(
                store,
                (run, island, held, self.plan, hosts),
                delta,
                spec,
                error_feedback,
                self.signing,
                fragment,
                **extra,
            )
        t1 = now()
        latest = self.waiter.until(f"version {r + 1}", lambda: newer(store, run, r, island))
        target = hosts.agree(latest["version"])
        wait_s = now() - t1
        if target <= r:  # the run finished at version r meanwhile
            return RoundResult(
                held=None,
                end_now=True,
                end=r,
                full=False,
                pushed_bytes=pushed_bytes,
                wait_s=wait_s,
                accepted=False,
                late=False,
                accepted_own=False,
                error_feedback=None,
                outcome="",
                note=note,
                scored={},
            )
        key = protocol.decision_key(run, r)
        decision = tolerant(island, lambda: protocol.read_json(store, key)) or {}
        accepted, late, outcome, scored = _outcome(decision, island, written)
        # Host 0's reading of the decision for all: every host's residual moves together.
        accepted_own = bool(hosts.agree(accepted and written))
        held, full = catch_up(
            store,
            run,
            island,
            held,
            target,
            self.plan,
            self.lr,
            self.mu,
            shards=hosts.held,
            cache=self.cache,
        )
        return RoundResult(
            held=held,
            end_now=False,
            end=hosts.agree(self.finished_version()),
            full=full,
            pushed_bytes=pushed_bytes,
            wait_s=wait_s,
            accepted=accepted,
            late=late,
            accepted_own=accepted_own,
            error_feedback=new_ef,
            outcome=outcome,
            note=note,
            scored=scored,
        )


def _outcome(decision: dict, island: str, written: bool) -> tuple[bool, bool, str, dict]:
    """(accepted, late, the log's outcome text, score and reward if scored) of this
    island's push in a round's decision ({} while the decision is unreadable)."""
    accepted = any(e["island"] == island for e in decision.get("accepted", []))
    rejected = [e["reason"] for e in decision.get("rejected", []) if e["island"] == island]
    late = not accepted and not rejected  # not in the decision: it came too late
    outcome = "accepted" if accepted else f"rejected: {rejected[0]}" if rejected else "late"
    if not written and (accepted or rejected):  # the verdict is on the slot's object
        outcome = f"this push was NOT stored; the object already in our slot was {outcome}"
    mine = [
        e
        for e in decision.get("contrib", {}).get("entries", [])
        if e["contributor"] == island and e["key_id"]
    ]  # signed by us
    scored = {}
    if mine and mine[0]["score"] is not None:
        outcome += f" (score {mine[0]['score']:.4g}, reward {mine[0]['reward']:.3f})"
        scored = {"score": mine[0]["score"], "reward": mine[0]["reward"]}
    return accepted, late, outcome, scored


def _push(
    store: ObjectStore,
    where: tuple,
    delta: protocol.Shards,
    spec: str,
    error_feedback: protocol.Shards | None,
    signing: tuple,
    fragment: tuple[int, ...] | None,
    **extra,
) -> tuple[bool, int, protocol.Shards | None, str]:
    """Every host pushes its shards, host 0 the manifest once all are in; (written, bytes
    this host wrote, new error feedback of its shards, a note for the log). `where` is
    (run, island, base version, plan, hosts), `signing` (signer, slot_problem)."""
    run, island, held, plan, hosts = where
    signer, slot_problem = signing
    lead, r = hosts.index == 0, held.version
    key = protocol.contrib_key(run, r, island)
    taken = hosts.agree(lead and store.exists(key))
    written, manifest_bytes, note = False, 0, ""
    entries, shard_bytes, new_ef = {}, 0, None
    if not taken:  # else pushed before a restart: the stored shards stay as it names them
        body = None
        if signer is not None:  # signed (and committed to) before any shard is visible
            hashed, _, _ = protocol.push_shards(
                store, run, r, island, plan, delta, spec, error_feedback, write=False
            )
            hashed = hosts.gather_entries(hashed)
            if lead:
                body = protocol.contribution_body(
                    run, island, held, plan, spec, hashed, signer, shards=fragment, **extra
                )
            hosts.agree(1)  # nobody writes a shard before the lead has committed
        entries, shard_bytes, new_ef = protocol.push_shards(
            store, run, r, island, plan, delta, spec, error_feedback
        )
        entries = hosts.gather_entries(entries)
        if lead:
            if body is None:
                body = protocol.contribution_body(
                    run, island, held, plan, spec, entries, shards=fragment, **extra
                )
            elif entries != hashed:
                raise protocol.ProtocolError(f"{island}: its shards encoded differently twice")
            written, manifest_bytes = protocol.put_contribution(store, run, island, held, body)
        written = bool(hosts.agree(written))
    if not written:
        note = (
            "our slot already held a contribution (pushed before a restart, or by another "
            "island under this name)"
        )
        if lead and signer is not None and slot_problem is not None:
            expect = {"run": run, "round": r, "base_sha256": held.params_sha256}
            problem = slot_problem(store, key, signer, expect)
            if problem:
                note = (
                    f"WARNING: our slot for round {r} already holds an object and "
                    f"{problem}: someone else wrote under our name"
                )
    return written, (shard_bytes + manifest_bytes) if written else 0, new_ef, note
