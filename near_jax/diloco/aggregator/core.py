"""`Aggregator`: creates a run in the store and closes its rounds, one version at a time.

Each round: collect and check contributions until the quorum or the deadline, decide (the
mean of the valid ones), commit the decision (put_if_absent: the commit point), write the
derived objects, move `latest` (`near_jax.diloco.protocol` has the whole protocol). It needs
no JAX model (tests drive it with numpy trees). Contributor runs subclass it
(`near_jax.contrib.validator.ContribAggregator`) and fill the hooks: check, decide,
authentic, recorded, manifest_fields, close.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from near_jax.diloco import protocol, quarantine, robust
from near_jax.diloco.aggregator.workers import gather, my_shards, write_proposal
from near_jax.diloco.codec.compress import PayloadError
from near_jax.diloco.protocol import ProtocolError, Verdict, Version
from near_jax.diloco.store import CorruptObject, ObjectStore

now = time.perf_counter


class Aggregator:
    """Closes the rounds of one run in a store; no JAX model needed (tests drive it)."""

    signs_decisions = False  # contrib: its decisions carry its signature (see `authentic`)

    def __init__(
        self,
        store: ObjectStore,
        run: str,
        like: Any,
        *,
        spec: str,
        lr: float,
        momentum: float,
        quorum: int,
        round_timeout: float,
        poll_seconds: float = 0.25,
        keep_versions: int = 0,
        shard_bytes: int = protocol.DEFAULT_SHARD_BYTES,
        split_axes: dict[str, int] | None = None,
        workers: int = 1,
        fragments: int = 1,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        log: Callable[[str], None] = lambda message: None,
    ):
        for name, value in (("outer lr", lr), ("outer momentum", momentum)):
            if not math.isfinite(value):  # caught before anything is written to the store
                raise ValueError(f"the {name} is {value}; it must be finite")
        self.store, self.run, self.like, self.log = store, run, like, log
        self.spec, self.lr, self.momentum = spec, lr, momentum
        self.quorum, self.round_timeout = quorum, round_timeout
        self.poll_seconds, self.keep_versions = poll_seconds, keep_versions
        self.clock, self.sleep = clock, sleep
        self.state: Version | None = None
        # The run's shard plan: this one for a run it creates, run.json's once it exists.
        self.plan = protocol.plan_shards(like, shard_bytes, split_axes)
        self.workers = workers  # K of `--shards=0/K`: K − 1 ShardWorkers derive the rest
        # Streaming DiLoCo: round r syncs fragment r mod F of the shards (run.json's F wins).
        self.fragments = fragments
        self.opened_at = 0.0
        self._decisions: dict[int, dict] = {}
        self.poll_index = 0  # listings of the store so far (contrib: who arrived first)

    # ----------------------------------------------------------------------- run lifecycle

    def create(self, params0: Any, manifest: dict) -> bool:
        """Creates the run at version 0 unless it exists; True if this call created it.

        Each version-0 object is first-writer-wins and run.json records the hashes of what
        is stored, so racing or restarted aggregators agree even if their inits differ.
        """
        store, run = self.store, self.run
        fixed = {
            **manifest,
            "format": protocol.FORMAT,
            "run": run,
            "compression": self.spec,
            "outer_lr": self.lr,
            "outer_momentum": self.momentum,
            "shards": self.plan.describe(),
            "fragments": self.fragments,
        }
        self.plan.fragment(self.fragments, 0)  # ValueError: more fragments than shards
        try:  # all of the manifest must be storable before its first object is written
            protocol.dumps(fixed)
        except (TypeError, ValueError) as e:
            raise ValueError(f"run {run!r} cannot be created: its manifest {e}") from None
        existing = protocol.read_json(store, protocol.manifest_key(run))
        if existing is None:
            hashes = protocol.write_version0(store, run, self.plan, params0)
            manifest = {**fixed, "version0": hashes, "created_at": self.clock()}
            created = store.put_if_absent(protocol.manifest_key(run), protocol.dumps(manifest))
        else:
            created = False
        self._adopt_plan()
        if self._latest() is None:
            quarantine.recover_latest(store, run, self.plan, self.clock())
        return created

    def load(self) -> Version:
        """Loads the newest published version (params, momentum, error feedback); a `latest`
        this aggregator did not write is moved aside and rebuilt (`quarantine.py`)."""
        if protocol.read_json(self.store, protocol.manifest_key(self.run)) is None:
            raise ProtocolError(f"run {self.run!r} has no {protocol.manifest_key(self.run)}")
        self._adopt_plan()
        latest = self._latest()
        if latest is None:
            quarantine.recover_latest(self.store, self.run, self.plan, self.clock())
            latest = self._latest()
        try:
            self.state = protocol.load_version(self.store, self.run, latest["version"], self.plan)
            problem = quarantine.version_problem(self.store, self.plan, self.state, read=False)
        except (ProtocolError, CorruptObject) as e:
            problem = str(e)
        if problem:  # the version `latest` names does not verify: rebuild it
            self.log(f"warning: version {latest['version']} does not verify ({problem[:200]})")
            quarantine.move_aside(self.store, self.run, protocol.latest_key(self.run), self.clock())
            self.state = quarantine.recover_latest(self.store, self.run, self.plan, self.clock())
            latest = self._latest()
        self.opened_at = float(latest["published_at"])
        return self.state

    def params(self) -> Any:
        """The current version's params as a full float32 tree (read shard by shard; the
        only thing that holds the whole model: evaluation, `--eval_batches`)."""
        pulled = protocol.pull_version(self.store, self.run, self.state.version, self.plan)
        return pulled.tree(self.plan)

    def _adopt_plan(self) -> None:
        """Takes the shard plan and fragments run.json records (they win over this
        aggregator's flags)."""
        manifest = protocol.read_json(self.store, protocol.manifest_key(self.run))
        self.plan = protocol.run_plan(manifest, self.like)
        self.fragments = manifest.get("fragments", 1)
        protocol.run_fragment(self.plan, self.fragments, 0)  # ProtocolError if unusable

    def fragment(self, r: int) -> tuple[int, ...]:
        """The shards round r syncs (all of them unless the run streams fragments)."""
        return self.plan.fragment(self.fragments, r)

    def _latest(self) -> dict | None:
        return quarantine.read_own(
            self.store,
            self.run,
            protocol.latest_key(self.run),
            quarantine.latest_problem,
            self.log,
            self.clock(),
        )

    def manifest_fields(self) -> dict:
        """Fields this aggregator adds to a new run's manifest (a hook: contrib's policy)."""
        return {}

    def close(self) -> None:
        """Releases what the aggregator holds once its loop ends (a hook: contrib's ledger)."""

    def finish(self) -> None:
        """Marks the run finished at the current version (islands then exit)."""
        body = {"version": self.state.version, **self.state.hashes(), "finished_at": self.clock()}
        self.store.put_if_absent(protocol.finished_key(self.run), protocol.dumps(body))

    # ------------------------------------------------------------------------------ rounds

    def run_round(self) -> dict[str, Any]:
        """Closes round r = the current version (or finishes a committed one); publishes
        version r + 1 and returns the round's stats. A shard of version r that no longer
        reads back as published (damaged in the store) makes it rebuild `latest` from the
        newest version that does, and go on from there (replays rewrite what was lost)."""
        try:
            return self._run_round()
        except protocol.BaseDamaged as e:
            self.log(f"warning: {e}; rebuilding {protocol.latest_key(self.run)}")
            quarantine.move_aside(self.store, self.run, protocol.latest_key(self.run), self.clock())
            self.state = quarantine.recover_latest(self.store, self.run, self.plan, self.clock())
            return self._run_round()

    def _run_round(self) -> dict[str, Any]:
        store, run, base = self.store, self.run, self.state
        r = base.version
        read0, written0 = store.bytes_read, store.bytes_written
        t0 = now()  # committed before a restart, or by a racing aggregator: replay it
        committed = self._committed(base)
        replayed = committed is not None
        if committed is None:
            verdicts, reason = self._collect(base)
            late = self._late(r)
            t0 = now()
            committed = self.decide(base, verdicts, late, reason)
            for _ in range(3):  # a failed put: a racing aggregator won, or a planted object
                if store.put_if_absent(protocol.decision_key(run, r), protocol.dumps(committed[1])):
                    break
                t0 = now()
                if (theirs := self._committed(base)) is not None:
                    committed, replayed = theirs, True
                    break
            else:
                raise ProtocolError(f"{protocol.decision_key(run, r)} keeps being overwritten")
        derived, decision = committed
        new = derived.version
        outer_s = now() - t0
        self.recorded(decision)  # before `latest` moves: no reader sees an unrecorded round
        self._publish(r, new)
        self._decisions[r] = decision
        self._collect_garbage(new.version)
        self.state, opened = new, self.opened_at
        self.opened_at = self.clock()
        return {
            "round": r,
            "version": new.version,
            "accepted": len(decision["accepted"]),
            "rejected": len(decision["rejected"]),
            "late": len(decision["late"]),
            "closed_by_quorum": int(decision["reason"] == "quorum"),
            "reason": decision["reason"],
            "round_s": decision["closed_at"] - opened,
            "outer_step_s": outer_s,
            "bytes_read": store.bytes_read - read0,
            "bytes_written": store.bytes_written - written0,
            "replayed": int(replayed),
            "decision": decision,
        }

    def authentic(self, decision: dict, base: Version) -> str:
        """Why `decision` is not one this aggregator wrote for round base.version ("" if it
        may be): a hook, contrib also checks its signature."""
        return quarantine.decision_problem(decision, self.run, base)

    def _committed(self, base: Version) -> tuple[protocol.Derived, dict] | None:
        """(version r + 1 and its update, decision) replayed from round r's committed decision; None
        if there is none. An object in the slot this aggregator did not write is moved
        aside (`quarantine.py`): the round is then decided (again)."""
        key = protocol.decision_key(self.run, base.version)
        decision = quarantine.read_own(
            self.store, self.run, key, lambda d: self.authentic(d, base), self.log, self.clock()
        )
        if decision is None:
            return None
        try:
            derived = protocol.replay_decision(
                self.store,
                self.run,
                self.plan,
                base,
                decision,
                self.spec,
                self.lr,
                self.momentum,
                shards=self.fragment(base.version),
            )
        except protocol.BaseDamaged:
            raise  # the store lost part of version r: not the decision's fault
        except (ProtocolError, PayloadError) as e:
            if self.signs_decisions:  # signed by us: a real inconsistency, not a forgery
                raise
            aside = quarantine.move_aside(self.store, self.run, key, self.clock())
            self.log(
                f"warning: {key} does not replay ({e}); moved it to {aside}, deciding "
                f"round {base.version} again"
            )
            return None
        return derived, decision

    def check(self, base: Version, key: str) -> Verdict:
        """Reads and validates one contribution to round base.version (a hook: contrib adds
        signatures, registration, replay and attestation checks)."""
        fragment = self.fragment(base.version)
        return protocol.check_contribution(self.store, self.run, base, self.plan, key, fragment)

    def quorum_met(self, base: Version, verdicts: list[Verdict]) -> bool:
        """Whether the round may close before its deadline: `quorum` valid contributions
        (a hook: contrib counts only those that pass screening)."""
        return sum(v.valid for v in verdicts) >= self.quorum

    def decide(
        self, base: Version, verdicts: list[Verdict], late: list[dict], reason: str
    ) -> tuple[protocol.Derived, dict]:
        """(version r + 1 and its update, decision) from the round's verdicts: here the
        mean of every valid contribution (a hook: contrib screens, scores and aggregates
        robustly). Must be a pure function of what it records in the decision."""
        derived = self.derive(base, verdicts)
        decision = protocol.make_decision(
            self.run, base, derived, verdicts, late, reason, self.clock()
        )
        return derived, decision

    def derive(
        self, base: Version, verdicts: list[Verdict], rule: robust.Rule | None = None
    ) -> protocol.Derived:
        """Streams the valid verdicts' shards into version r + 1 (`protocol.derive`); a
        contribution with a bad shard is rejected (its verdict says why) and the rest
        derived again."""
        while True:
            accepted = sorted((v for v in verdicts if v.valid), key=lambda v: v.island)
            try:
                if self.workers > 1 and accepted:
                    return self._derive_over_workers(base, accepted, rule)
                return protocol.derive(
                    self.store,
                    self.run,
                    self.plan,
                    base,
                    accepted,
                    self.spec,
                    self.lr,
                    self.momentum,
                    rule,
                    shards=self.fragment(base.version),
                )
            except protocol.ShardDefect as e:
                bad = next(v for v in accepted if v.island == e.island)
                bad.reason, bad.manifest = e.reason, None
                self.log(f"warning: round {base.version}: {e.island}'s {e.reason}; rejected")

    def _derive_over_workers(
        self, base: Version, accepted: list[Verdict], rule: robust.Rule | None
    ) -> protocol.Derived:
        """Proposes the set, derives this coordinator's shards, gathers the workers'
        (`workers.py`) and writes the manifest; ShardDefect if anyone found a bad shard."""
        store, run, r, count = self.store, self.run, base.version, self.workers
        proposal = write_proposal(store, run, base, accepted, None if rule is None else str(rule))
        fragment = self.fragment(r)
        mine = my_shards(self.plan, 0, count, fragment)
        prefix, results = protocol.derive_slice(
            store, run, self.plan, base, accepted, mine, self.spec, self.lr, self.momentum, rule
        )
        waited = [0]

        def wait(what: str) -> None:
            if waited[0] % max(1, round(30 / self.poll_seconds)) == 0:
                self.log(f"waiting for {what}")
            waited[0] += 1
            self.sleep(self.poll_seconds)

        theirs, defect = gather(store, run, r, proposal, count, wait)
        if defect is not None:
            raise defect
        return protocol.finish(
            store, self.plan, base, prefix, {**results, **theirs}, shards=fragment
        )

    def recorded(self, decision: dict) -> None:
        """Called once round `decision` is committed, before its version is published, also
        when a restart finishes it (a hook: contrib appends it to the ledger; idempotent)."""

    def _publish(self, r: int, new: Version) -> None:
        """Moves `latest` (a separate method so tests can crash here), then deletes the
        outputs of sets round r did not apply (an earlier try, a racing aggregator)."""
        protocol.advance_latest(self.store, self.run, new, self.clock())
        keep = new.manifest.prefix
        for key in self.store.list(protocol.outs_prefix(self.run, r)):
            if not key.startswith(keep):
                self.store.delete(key)

    def _collect(self, base: Version) -> tuple[list[Verdict], str]:
        """Reads and validates contributions until the quorum or the deadline."""
        deadline = self.opened_at + self.round_timeout
        verdicts: dict[str, Verdict] = {}
        while True:
            self.poll_index += 1
            for key in protocol.contrib_keys(self.store, self.run, base.version):
                if key not in verdicts:  # insertion order = arrival order (copy detection)
                    verdicts[key] = self.check(base, key)
            if self.quorum_met(base, list(verdicts.values())):
                return list(verdicts.values()), "quorum"
            left = deadline - self.clock()
            if left <= 0:
                return list(verdicts.values()), "deadline"
            self.sleep(min(self.poll_seconds, left))

    def _decision(self, r: int) -> dict:
        if r not in self._decisions:
            key = protocol.decision_key(self.run, r)
            try:
                decision = protocol.read_json(self.store, key)
            except (ProtocolError, CorruptObject) as e:  # damaged after it was published
                self.log(f"warning: {key} is unreadable ({e}); its pushes may be listed late")
                decision = {"accepted": [], "rejected": [], "late": []}
            if decision is None:
                raise ProtocolError(f"round {r} is closed but has no decision")
            self._decisions[r] = decision
        return self._decisions[r]

    def _late(self, r: int) -> list[dict]:
        """Pushes to the previous LATE_WINDOW rounds that no decision has seen yet."""
        lo = max(0, r - protocol.LATE_WINDOW)
        known = set()
        for earlier in range(lo, r):
            d = self._decision(earlier)
            known |= {e["key"] for e in d["accepted"] + d["rejected"] + d["late"]}
        late = []
        for earlier in range(lo, r):
            for key in protocol.contrib_keys(self.store, self.run, earlier):
                if key not in known:
                    late.append({"island": key.rsplit("/", 1)[-1], "round": earlier, "key": key})
        for old in [k for k in self._decisions if k < lo]:
            del self._decisions[old]
        return late

    def _collect_garbage(self, version: int) -> None:
        """Deletes the shards of version − keep_versions (updates, manifests and decisions
        stay) unless the next version shares them (a round that applied nothing)."""
        old = version - self.keep_versions
        if self.keep_versions <= 0 or old < 0:
            return
        try:
            older = protocol.load_version(self.store, self.run, old, self.plan)
            newer = protocol.load_version(self.store, self.run, old + 1, self.plan)
        except (ProtocolError, CorruptObject) as e:  # already collected, or damaged
            self.log(f"warning: cannot collect version {old}: {e}")
            return
        if older.manifest_key == newer.manifest_key:
            return
        for part in protocol.PARTS:
            for s in range(self.plan.num_shards):
                key = older.manifest.key(part, s)
                if key != newer.manifest.key(part, s):  # else carried over: still in use
                    self.store.delete(key)
