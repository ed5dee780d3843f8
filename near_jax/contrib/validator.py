"""The aggregator's validator role: rounds of DiLoCo whose contributors don't trust each other.

`ContribAggregator` is the islands' `diloco.aggregator.Aggregator` with its hooks filled:

check (each contribution as it arrives; `checks` lists what a contribution must pass, and a
    failed check is a rejection with its reason)
quorum_met (while collecting): only contributions that pass screening count, and an open
    run admits at most contrib.new_keys_per_round new contributors a round (`admission`)
decide (once the round closes)
    admit      the new-key cap, in the order contributors committed to their payloads
               (`commits`, `admission`)
    screen     free-riders (zero updates), norm outliers, stale copies of the previous
               round's applied contributions, copies within the round (cosine, cosine
               after removing the round's common update, top-k index overlap); the
               original of a copy is whoever committed first (`screening`)
    judge      validate a sample (or all): score on validation batches drawn from this
               round's seed, which nobody knows before the decision reveals it
               (`signing`), check the assigned data, rate, reward (`judging`, `ratings`)
    aggregate  the run's robust rule (trimmed mean, coordinate median, top-G by score or
               the plain mean) over the survivors it selects
recorded (after the decision, the commit point, is written; before `latest` moves)
    appends the round's entries (late pushes included) to the hash-chained SQLite ledger
    and puts the round's segment into the store (`recorder`, `ledger_mirror`). Only
    entries whose statement the contributor signed for this round carry a key id:
    nothing unsigned is held against a contributor's name.

Memory: no whole contribution is ever held. `decide` streams the shards (`streamed`): one
pass builds the Gram matrix of the valid contributions and the history (norms and cosines
add up over shards), then each validated survivor's θ_r − k_i·Δ_i is built from its shards,
evaluated and dropped: O((N + H) × shard) plus θ_r and one moved copy, for N contributions
and H history trees. Every read checks the shard against its signed hash; a shard that
changed after its check (found while scoring or deriving) rejects its contribution, and the
round is selected again without it, so no entry is accepted or rewarded that was not applied.

`building.build` makes one from a run's config or manifest (`policy`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from near_jax.contrib import (
    admission,
    attest,
    identity,
    judging,
    ledger,
    ratings,
    screening,
    streamed,
)
from near_jax.contrib.allowlist import Admissions
from near_jax.contrib.checks import Candidate, Checker
from near_jax.contrib.policy import (
    CodeList,
    Policy,
    allowed_code_key,
    extra_allowed_code,
    signed_allowed_code,
)
from near_jax.contrib.recorder import Recorder
from near_jax.contrib.signing import (
    check_decision,
    decision_bytes,
    seed_commitment,
    seed_from_signature,
    seed_signature,
)
from near_jax.diloco import assignment, protocol, robust
from near_jax.diloco.aggregator import Aggregator
from near_jax.diloco.protocol import ProtocolError, Verdict, Version


def _at_median_norm(deltas: list[Any]) -> list[Any]:
    """Each whole Δ larger than the round's median norm scaled down to it (the whole-tree
    form of what `decide` does shard by shard: `screening.median_scales`)."""
    scales = screening.median_scales(screening.norms(deltas))
    return [
        delta if k is None else jax.tree.map(lambda d, k=k: d * np.float32(k), delta)
        for delta, k in zip(deltas, scales, strict=True)
    ]


class ContribAggregator(Aggregator):
    """An Aggregator that verifies, screens, scores, aggregates robustly and keeps a ledger.

    `loss_fn(params, seed)` is the mean validation loss of host params on
    `policy.score_batches` batches drawn from `seed`. `ledger_path` is the local SQLite
    file (the store holds the mirror that `verify` reads).
    """

    def __init__(
        self,
        store,
        run: str,
        like: Any,
        *,
        aggregator_key: identity.Identity,
        policy: Policy,
        loss_fn: Callable[[Any, int], float],
        ledger_path: str,
        train_loss_fn: Callable[[Any, int, int], float] | None = None,
        log: Callable[[str], None] = lambda message: None,
        allowlist: dict | None = None,
        **kwargs: Any,
    ):
        super().__init__(store, run, like, **kwargs)
        if policy.assigned_data and train_loss_fn is None:
            raise ValueError(
                "the policy checks assigned data (contrib.assigned_data): pass train_loss_fn"
            )
        self.log, self.allowlist, self.code = log, allowlist, CodeList()  # code: newest seen
        self.key, self.policy, self.loss_fn = aggregator_key, policy, loss_fn
        self.train_loss_fn, self.inner_steps = train_loss_fn, 1  # H: run.json's, at load
        self.ratings: dict[str, ratings.Rating] = {}  # each contributor's, after its last round
        self.known: set[str] = set()  # contributors accepted in some round (not new)
        self._judged: dict[int, judging.Verdict] = {}
        self._quorum: tuple[tuple[str, ...], int] = ((), 0)  # (valid keys, how many screened)
        self.recorder = Recorder(  # logs through self.log, which a caller may replace
            store, run, ledger_path, aggregator_key, lambda m: self.log(m)
        )
        self.checker = Checker(
            store,
            run,
            like,
            plan=self.plan,
            verifier=self._verifier(self.code),
            payload_seen=self.recorder.payload_seen,
            admissions=None
            if allowlist is None
            else Admissions(store, run, self.key.public_hex, allowlist),
        )
        self._history: list[streamed.Source] = []  # last round's applied Δs and update
        self._history_round = -1

    signs_decisions = True

    def authentic(self, decision: dict, base: Version) -> str:
        """A decision in the slot that this aggregator's key did not sign is not its own."""
        problem = super().authentic(decision, base)
        if not problem and not check_decision(self.key.public_hex, decision):
            problem = "not signed by this aggregator's key"
        return problem

    def manifest_fields(self) -> dict:
        """What `create` records about contributions (the policy, key, round 0's seed)."""
        return {
            "contrib": {
                "policy": self.policy.to_json(),
                "aggregator_key": self.key.public_hex,
                "seed_commitment": seed_commitment(seed_signature(self.key, self.run, 0)),
                **({} if self.allowlist is None else {"allowlist": self.allowlist}),
            }
        }

    def _verifier(self, code: CodeList) -> attest.Verifier:
        return attest.load_verifier(
            self.policy.attestation,
            allowed_code=code.allowed(self.policy.allowed_code),
            config_sha256=self.policy.config_sha256,
        )

    def allow_code(self, hashes: list[str]) -> list[str]:
        """Adds code hashes the run accepts from now on (a new near_jax release mid-run) to
        the signed list in the store; returns the whole extra list."""
        return sorted(self._change_code(lambda code: code.allowing(hashes)).hashes)

    def revoke_code(self, hashes: list[str]) -> list[str]:
        """Revokes code hashes (the manifest's too) from now on in the signed list;
        returns every revoked hash."""
        return sorted(self._change_code(lambda code: code.revoking(hashes)).revoked)

    def _change_code(self, change: Callable[[CodeList], CodeList]) -> CodeList:
        """Signs and stores the next code list (after the newest seen: never rolled back)."""
        code = change(self._refresh_code())
        h, r = sorted(code.hashes), sorted(code.revoked)
        body = signed_allowed_code(self.key, self.run, h, seq=code.seq, revoked=r)
        self.store.put(allowed_code_key(self.run), protocol.dumps(body))
        return self._use_code(code)

    def _refresh_code(self) -> CodeList:
        """Reads the signed code list; a forged, vanished or older one leaves ours in force."""
        code, problem = extra_allowed_code(
            self.store, self.run, self.key.public_hex, min_seq=self.code.seq, known=self.code
        )
        if problem:
            self.log(f"warning: {problem}; the code list of seq {code.seq} stays in force")
        return self._use_code(code)

    def _use_code(self, code: CodeList) -> CodeList:
        self.code, self.checker.revoked = code, code.revoked
        self.checker.verifier = self._verifier(code)
        return code

    # ----------------------------------------------------------------------- lifecycle

    def load(self) -> Version:
        """Loads the newest version, then brings the ledger up to it (see `recorder`)."""
        state = super().load()
        self.checker.plan = self.plan  # run.json's
        manifest = protocol.read_json(self.store, protocol.manifest_key(self.run)) or {}
        theirs = manifest.get("contrib", {}).get("aggregator_key")
        if theirs != self.key.public_hex:
            raise ProtocolError(
                f"run {self.run!r} was created with aggregator key "
                f"{str(theirs)[:16]}…, this key is {self.key.public_hex[:16]}…"
            )
        self._refresh_code()
        self.recorder.open(state.version)
        self.inner_steps = max(1, int(manifest.get("inner_steps", 1)))
        entries = self.recorder.book.entries()
        self.ratings = ratings.latest(entries)
        self.known = {e["contributor"] for e in entries if e["accepted"]}
        return state

    def close(self) -> None:
        self.recorder.close()

    def check(self, base: Version, key: str) -> Candidate:
        """Reads and verifies one contribution (`checks`); never raises on what it contains."""
        return self.checker.check(base, key, arrival=self.poll_index)

    # -------------------------------------------------------------------------- decide

    def decide(
        self, base: Version, verdicts: list[Verdict], late: list[dict], reason: str
    ) -> tuple[protocol.Derived, dict]:
        """Screens, validates, selects and aggregates the round (see the module docstring),
        streaming the shards: their Gram matrix once, then one contribution at a time."""
        r, policy = base.version, self.policy
        history = self._refresh_history(base) if policy.screen else []
        candidates = [c for c in verdicts if isinstance(c, Candidate)]
        arrival = self._arrivals(r, candidates)
        cap = policy.new_keys_per_round
        for c in self._over_cap(candidates, arrival):
            c.reason, c.manifest = (
                (
                    f"deferred: round {r} already admits {cap} new contributors "
                    "(contrib.new_keys_per_round); push again next round"
                ),
                None,
            )
        valid = [c for c in candidates if c.valid]
        gram = streamed.gram(
            self.store, self.run, self.plan, r, valid, history, indicators=self._sparse()
        )
        signature = seed_signature(self.key, self.run, r)
        seed = seed_from_signature(signature)
        for c in valid:
            if not c.valid:  # a shard changed after its check, found by the Gram pass
                self.log(f"warning: round {r}: {c.island}'s {c.reason}; rejected")
        pool = list(gram.candidates)  # valid, every shard read back as checked
        manifests = {id(c): c.manifest for c in pool}
        theta: list[Any] = []  # θ_r, read once (only if something is scored)
        while True:
            try:
                base_loss, applied = self._select(base, pool, gram, seed, theta, arrival)
                derived = self.derive(base, applied, policy.rule)
            except protocol.ShardDefect as e:  # a shard changed after its check (scoring)
                bad = [c for c in pool if c.island == e.island]
                if not bad:
                    raise  # not one of this round's contributions: a bug, not a verdict
                for c in bad:
                    c.reason = e.reason
            else:  # `derive` rejected (and left out) a contribution whose shard changed
                bad = [c for c in applied if not c.valid]
                if not bad:
                    break
            # Decide again without it: scores, rewards and the selection included it.
            gone = {id(c) for c in bad}
            pool = [c for c in pool if id(c) not in gone]
            for c in bad:
                self.log(f"warning: round {r}: {c.island}'s {c.reason}; deciding again")
                c.manifest, c.score, c.accepted, c.reward = None, None, False, 0.0
                self._judged.pop(id(c), None)
            for c in pool:
                c.reason, c.manifest = "", manifests[id(c)]
                c.score, c.accepted, c.reward = None, False, 0.0
        entries = [self._entry(c, r) for c in sorted(candidates, key=lambda c: c.island)]
        entries += [admission.late_entry(item, r) for item in late]
        extra = {
            "aggregation": str(policy.rule),
            "contrib": {
                "seed_signature": signature,
                "next_seed_commitment": seed_commitment(seed_signature(self.key, self.run, r + 1)),
                "base_loss": base_loss,
                "entries": entries,
            },
        }
        decision = protocol.make_decision(
            self.run, base, derived, verdicts, late, reason, self.clock(), **extra
        )
        for entry in entries:  # an entry the ledger refuses must stop us before the commit
            ledger.normalize_entry(entry, r)
        decision["signature"] = self.key.sign(decision_bytes(decision))
        # What the next round screens against: where these Δs' shards are, not the Δs.
        self._history = [
            streamed.Source(
                f"{c.contributor}@{r}", r, Verdict(c.key, c.island, c.sha256, c.manifest)
            )
            for c in applied
        ]
        self._history_round = r
        return derived, decision

    def _select(
        self,
        base: Version,
        pool: list[Candidate],
        gram: streamed.Gram,
        seed: int,
        theta: list,
        arrival: dict[int, int],
    ) -> tuple[float | None, list[Candidate]]:
        """Screens `pool` (from its Gram matrix), judges the survivors (`judging`: validates
        a sample, one contribution at a time), selects and rewards them; (base loss, the
        contributions to apply, in island order). ShardDefect if a shard no longer reads
        back as checked."""
        r, policy = base.version, self.policy
        if policy.screen and pool:
            for c, d in zip(pool, self._screen(pool, gram, arrival), strict=True):
                if d.reason:
                    c.reason, c.manifest = d.reason, None
        norms = screening.gram_norms(gram.sub(pool))
        kept = [i for i, c in enumerate(pool) if c.valid]
        passed = [pool[i] for i in kept]

        def theta_r() -> Any:
            if not theta:
                pulled = protocol.pull_version(self.store, self.run, r, self.plan)
                theta.append(pulled.tree(self.plan))
            return theta[0]

        def moved(indices: list[int], scales: list[float | None]):
            chosen = [passed[i] for i in indices]
            return streamed.moved_trees(
                self.store, self.run, self.plan, r, theta_r(), chosen, scales
            )

        base_loss, judged = judging.judge(
            policy,
            judging.Evaluators(self.loss_fn, self.train_loss_fn, self.inner_steps),
            [c.contributor for c in passed],
            [norms[i] for i in kept],
            seed,
            theta_r,
            moved,
            self.ratings,
            self._assigned_seeds(r, passed),
            total=lambda: (
                streamed.total(self.store, self.run, self.plan, r, theta_r(), passed),
                len(passed),
            ),
        )
        self._judged = {id(c): v for c, v in zip(passed, judged, strict=True)}
        for c, v in zip(passed, judged, strict=True):
            c.score = v.score
            if v.failed:
                c.reason, c.manifest = v.reason, None
        accepted = [(c, v) for c, v in zip(passed, judged, strict=True) if not v.failed]
        scores = [v.score for _, v in accepted]
        chosen = set(robust.select(policy.rule, scores))
        ranked = sorted(range(len(accepted)), key=lambda i: (-(scores[i] or 0.0), i))
        for i, (c, v) in enumerate(accepted):
            c.accepted, c.reward = True, v.reward
            if i not in chosen:
                rank, g = ranked.index(i) + 1, policy.rule.top_g
                c.reason = f"accepted, not applied: rank {rank} by score, {policy.rule} applies {g}"
                c.manifest = None
        return base_loss, sorted((c for c, _ in accepted if c.valid), key=lambda c: c.island)

    def _screen(
        self, pool: list[Candidate], gram: streamed.Gram, arrival: dict[int, int]
    ) -> list[screening.Screen]:
        """The screening verdicts of `pool` (some of gram's candidates), original by commitment."""
        policy = self.policy
        return screening.screen_gram(
            gram.sub(pool),
            [c.contributor for c in pool],
            [h.label for h in gram.history],
            max_norm_ratio=policy.max_norm_ratio,
            zero_norm_ratio=policy.zero_norm_ratio,
            duplicate_cosine=policy.duplicate_cosine,
            arrival=[arrival[id(c)] for c in pool],
            centered_cosine=policy.centered_cosine,
            overlap=None if gram.overlap is None else gram.sub_overlap(pool),
            copy_overlap=policy.copy_overlap,
        )

    def _sparse(self) -> bool:
        """Whether contributions are top-k sparse (then index-set overlaps find copies)."""
        return (
            self.policy.screen and self.policy.copy_overlap > 0 and streamed.sparse_spec(self.spec)
        )

    def _arrivals(self, r: int, candidates: list[Candidate]) -> dict[int, int]:
        return admission.arrival_order(self.store, self.run, r, candidates, self.checker)

    def _over_cap(self, candidates: list[Candidate], arrival: dict[int, int]) -> list[Candidate]:
        cap = 0 if self.allowlist is not None else self.policy.new_keys_per_round
        return admission.over_cap(candidates, arrival, self.known, cap)

    def _assigned_seeds(self, r: int, passed: list[Candidate]) -> dict[str, int]:
        """Each contributor's round-r assignment (the stream seed its key gives)."""
        out = {}
        for c in passed:
            public = self.checker.public_key(c.contributor)
            if public:
                out[c.contributor] = assignment.assigned_seed(self.run, r, public)
        return out

    def _entry(self, c: Candidate, r: int) -> dict:
        return admission.entry(c, r, self._judged.get(id(c)), self.ratings.get(c.contributor))

    def quorum_met(self, base: Version, verdicts: list[Verdict]) -> bool:
        """Whether enough contributions arrived to close the round: only those that pass
        screening count (a sybil's copies do not), and in an open run at most
        contrib.new_keys_per_round new contributors."""
        valid = [v for v in verdicts if isinstance(v, Candidate) and v.valid]
        if len(valid) < self.quorum:
            return False
        keys = tuple(sorted(c.key for c in valid))
        if keys != self._quorum[0]:  # screened again only when something new arrived
            self._quorum = (keys, self._count_screened(base, valid))
        return self._quorum[1] >= self.quorum

    def _count_screened(self, base: Version, valid: list[Candidate]) -> int:
        arrival = self._arrivals(base.version, valid)
        over = {id(c) for c in self._over_cap(valid, arrival)}
        admitted = [c for c in valid if id(c) not in over]
        if not self.policy.screen or not admitted:
            return len(admitted)
        history = self._refresh_history(base)
        gram = streamed.gram(
            self.store,
            self.run,
            self.plan,
            base.version,
            admitted,
            history,
            indicators=self._sparse(),
        )
        pool = list(gram.candidates)
        return sum(d.passed for d in self._screen(pool, gram, arrival))

    def _refresh_history(self, base: Version) -> list[streamed.Source]:
        """What a stale copy would copy, for screening: the previous round's applied Δs and
        its published update (re-pushing the update costs nothing), as Sources: where
        their shards are, read while screening. After a restart the applied set is read
        from the previous decision; an unreadable object only drops out of the history."""
        r = base.version
        if r == 0:
            return []
        if self._history_round != r - 1:  # after a restart: from the previous decision
            self._history = streamed.applied_sources(self.store, self.run, self.plan, r - 1)
            self._history_round = r - 1
        label = f"the published update of round {r - 1}"
        if base.manifest.update is not None and all(h.label != label for h in self._history):
            self._history.append(streamed.Source(label, r - 1, update=base.manifest))
        return list(self._history)

    # ------------------------------------------------------------------------ recorded

    def recorded(self, decision: dict) -> None:
        """Appends the round to the ledger (once), mirrors it into the store, and takes the
        round's ratings and newly accepted contributors."""
        self.recorder.record(decision)
        self.recorder.upload()
        entries = decision.get("contrib", {}).get("entries", [])
        self.ratings.update(ratings.latest(entries))
        self.known |= {e["contributor"] for e in entries if e["accepted"]}
