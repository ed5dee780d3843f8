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

from near_jax.diloco import protocol, quarantine
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
        }
        try:  # all of the manifest must be storable before its first object is written
            protocol.dumps(fixed)
        except (TypeError, ValueError) as e:
            raise ValueError(f"run {run!r} cannot be created: its manifest {e}") from None
        if protocol.read_json(store, protocol.manifest_key(run)) is None:
            zeros = protocol.zeros_like(params0)
            trees = {"params": protocol.as_float32(params0), "momentum": zeros, "server_ef": zeros}
            hashes = {}
            for part, tree in trees.items():
                key = protocol.version_key(run, 0, part)
                store.put_if_absent(key, protocol.tree_bytes(tree))
                hashes[f"{part}_sha256"] = protocol.sha256(store.get(key))
            manifest = {**fixed, "version0": hashes, "created_at": self.clock()}
            created = store.put_if_absent(protocol.manifest_key(run), protocol.dumps(manifest))
        else:
            created = False
        if self._latest() is None:
            quarantine.recover_latest(store, run, self.like, self.clock())
        return created

    def load(self) -> Version:
        """Loads the newest published version (params, momentum, error feedback); a `latest`
        this aggregator did not write is moved aside and rebuilt (`quarantine.py`)."""
        latest = self._latest()
        if latest is None:
            if protocol.read_json(self.store, protocol.manifest_key(self.run)) is None:
                raise ProtocolError(f"run {self.run!r} has no {protocol.latest_key(self.run)}")
            quarantine.recover_latest(self.store, self.run, self.like, self.clock())
            latest = self._latest()
        try:
            self.state = protocol.pull_version(
                self.store, self.run, latest["version"], self.like, with_server_ef=True
            )
        except ProtocolError:  # the version `latest` names does not verify: rebuild it
            quarantine.move_aside(self.store, self.run, protocol.latest_key(self.run), self.clock())
            self.state = quarantine.recover_latest(self.store, self.run, self.like, self.clock())
            latest = self._latest()
        self.opened_at = float(latest["published_at"])
        return self.state

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
        version r + 1 and returns the round's stats."""
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
            committed = new, update, decision = self.decide(base, verdicts, late, reason)
            for _ in range(3):  # a failed put: a racing aggregator won, or a planted object
                if store.put_if_absent(protocol.decision_key(run, r), protocol.dumps(decision)):
                    break
                t0 = now()
                if (theirs := self._committed(base)) is not None:
                    committed, replayed = theirs, True
                    break
            else:
                raise ProtocolError(f"{protocol.decision_key(run, r)} keeps being overwritten")
        new, update, decision = committed
        outer_s = now() - t0
        self.recorded(decision)  # before `latest` moves: no reader sees an unrecorded round
        self._publish(r, new, update)
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

    def _committed(self, base: Version) -> tuple[Version, bytes | None, dict] | None:
        """(version r + 1, update, decision) replayed from round r's committed decision; None
        if there is none. An object in the slot this aggregator did not write is moved
        aside (`quarantine.py`): the round is then decided (again)."""
        key = protocol.decision_key(self.run, base.version)
        decision = quarantine.read_own(
            self.store, self.run, key, lambda d: self.authentic(d, base), self.log, self.clock()
        )
        if decision is None:
            return None
        try:
            new, update = protocol.replay_decision(
                self.store, self.run, base, decision, self.spec, self.lr, self.momentum, self.like
            )
        except (ProtocolError, PayloadError) as e:
            if self.signs_decisions:  # signed by us: a real inconsistency, not a forgery
                raise
            aside = quarantine.move_aside(self.store, self.run, key, self.clock())
            self.log(
                f"warning: {key} does not replay ({e}); moved it to {aside}, deciding "
                f"round {base.version} again"
            )
            return None
        return new, update, decision

    def check(self, base: Version, key: str) -> Verdict:
        """Reads and validates one contribution to round base.version (a hook: contrib adds
        signatures, registration, replay and attestation checks)."""
        return protocol.check_contribution(self.store, self.run, base, key, self.like)

    def decide(
        self, base: Version, verdicts: list[Verdict], late: list[dict], reason: str
    ) -> tuple[Version, bytes | None, dict]:
        """(version r + 1, update bytes, decision) from the round's verdicts: here the mean
        of every valid contribution (a hook: contrib screens, scores and aggregates
        robustly). Must be a pure function of what it records in the decision."""
        accepted = sorted((v for v in verdicts if v.valid), key=lambda v: v.island)
        new, update = protocol.derive(
            base, [v.payload for v in accepted], self.spec, self.lr, self.momentum, self.like
        )
        decision = protocol.make_decision(
            self.run, base, new, verdicts, late, reason, update, self.clock()
        )
        return new, update, decision

    def recorded(self, decision: dict) -> None:
        """Called once round `decision` is committed, before its version is published, also
        when a restart finishes it (a hook: contrib appends it to the ledger; idempotent)."""

    def _publish(self, r: int, new: Version, update: bytes | None) -> None:
        """Derived objects, then `latest` (a separate method so tests can crash here)."""
        protocol.write_derived(self.store, self.run, r, new, update)
        protocol.advance_latest(self.store, self.run, new, self.clock())

    def _collect(self, base: Version) -> tuple[list[Verdict], str]:
        """Reads and validates contributions until the quorum or the deadline."""
        deadline = self.opened_at + self.round_timeout
        verdicts: dict[str, Verdict] = {}
        while True:
            self.poll_index += 1
            for key in protocol.contrib_keys(self.store, self.run, base.version):
                if key not in verdicts:  # insertion order = arrival order (copy detection)
                    verdicts[key] = self.check(base, key)
            if sum(v.valid for v in verdicts.values()) >= self.quorum:
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
        """Deletes the full objects of version − keep_versions (updates/decisions stay)."""
        old = version - self.keep_versions
        if self.keep_versions > 0 and old >= 0:
            for part in ("params", "momentum", "server_ef"):
                self.store.delete(protocol.version_key(self.run, old, part))
