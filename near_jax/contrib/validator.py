"""The aggregator's validator role: rounds of DiLoCo whose contributors don't trust each other.

`ContribAggregator` is the islands' `diloco.aggregator.Aggregator` with three hooks filled:

check (each contribution as it arrives; `checks` lists what a contribution must pass, and a
    failed check is a rejection with its reason)

decide (once the round closes)
    screen     free-riders (zero updates), norm outliers, stale copies of the previous
               round's applied contributions, near-duplicates of an earlier arrival (the
               order the aggregator first listed them in; one poll lists by name, so a
               copier must land in a later poll than its original, which it has to read
               first — poll often: `--poll_seconds`)
    score      each survivor by the eval-loss improvement of θ_r − Δ_i (Δ_i applied alone,
               rescaled to the round's median norm so inflating a Δ cannot buy reward)
               on validation batches drawn from this round's seed, which nobody knows
               before the aggregator reveals it in the decision (`signing`); with
               screening, a Δ scoring below `contrib.min_score` is not applied
    aggregate  the run's robust rule (trimmed mean, coordinate median, top-G by score or
               the plain mean) over the survivors it selects
    reward     each accepted contribution's share of the round: score⁺ / Σ score⁺

recorded (after the decision, the commit point, is written; before `latest` moves)
    appends the round's entries to the hash-chained SQLite ledger and mirrors it into the
    store (`recorder`). Only entries whose statement the contributor signed for this round
    carry a key id: nothing unsigned is held against a contributor's name.

Memory: no whole contribution is ever held. `decide` streams the shards (`streamed`): one
pass builds the Gram matrix of the valid contributions and the history (norms and cosines
add up over shards), then each survivor's θ_r − k_i·Δ_i is built from its shards, scored
and dropped: O((N + H) × shard) plus θ_r and one moved copy, for N contributions and H
history trees. Every read checks the shard against its signed hash; a shard that changed
after its check (found while scoring or deriving) rejects its contribution, and the round
is selected again without it, so no entry is accepted or rewarded that was not applied.

`build` makes the aggregator of a contributor run from its config or manifest (`policy`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from near_jax._io import one_line
from near_jax.config import ConfigError
from near_jax.contrib import attest, identity, ledger, screening, streamed
from near_jax.contrib.allowlist import Admissions
from near_jax.contrib.checks import Candidate, Checker
from near_jax.contrib.policy import (
    CodeList,
    Policy,
    allowed_code_key,
    extra_allowed_code,
    recipe_sha256,
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
from near_jax.diloco import protocol, robust
from near_jax.diloco.aggregator import Aggregator, fixed_eval
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
        log: Callable[[str], None] = lambda message: None,
        allowlist: dict | None = None,
        **kwargs: Any,
    ):
        super().__init__(store, run, like, **kwargs)
        self.log, self.allowlist, self.code = log, allowlist, CodeList()  # code: newest seen
        self.key, self.policy, self.loss_fn = aggregator_key, policy, loss_fn
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
        """Screens, scores, selects and aggregates the round (see the module docstring),
        streaming the shards: their Gram matrix once, then one contribution at a time."""
        r, policy = base.version, self.policy
        history = self._refresh_history(base) if policy.screen else []
        candidates = [c for c in verdicts if isinstance(c, Candidate)]  # arrival order
        valid = [c for c in candidates if c.valid]
        gram = streamed.gram(self.store, self.run, self.plan, r, valid, history)
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
                base_loss, applied = self._select(base, pool, gram, seed, theta)
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
            for c in pool:
                c.reason, c.manifest = "", manifests[id(c)]
                c.score, c.accepted, c.reward = None, False, 0.0
        entries = [c.entry(r) for c in sorted(candidates, key=lambda c: c.island)]
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
        self, base: Version, pool: list[Candidate], gram: streamed.Gram, seed: int, theta: list
    ) -> tuple[float | None, list[Candidate]]:
        """Screens `pool` (from its Gram matrix), scores the survivors one at a time, selects
        and rewards them; (base loss, the contributions to apply, in island order).
        ShardDefect if a shard no longer reads back as checked."""
        r, policy = base.version, self.policy
        sub = gram.sub(pool)
        if policy.screen and pool:
            details = screening.screen_gram(
                sub,
                [c.contributor for c in pool],
                [h.label for h in gram.history],
                max_norm_ratio=policy.max_norm_ratio,
                zero_norm_ratio=policy.zero_norm_ratio,
                duplicate_cosine=policy.duplicate_cosine,
                arrival=[c.arrival for c in pool],
            )
            for c, d in zip(pool, details, strict=True):
                if d.reason:
                    c.reason, c.manifest = d.reason, None
        norms = screening.gram_norms(sub)
        passed = [c for c in pool if c.valid]
        base_loss, scores = None, []
        if passed:
            if not theta:
                theta.append(
                    protocol.pull_version(self.store, self.run, r, self.plan).tree(self.plan)
                )
            # Rescaled to the round's median norm: inflating a Δ cannot buy score or reward.
            scales = screening.median_scales([norms[i] for i, c in enumerate(pool) if c.valid])
            base_loss, scores = screening.score_moved(
                lambda params: self.loss_fn(params, seed),
                theta[0],
                streamed.moved_trees(self.store, self.run, self.plan, r, theta[0], passed, scales),
            )
            if not math.isfinite(base_loss):
                base_loss = None  # JSON has no nan; every score is -inf, nothing is applied
        for c, score in zip(passed, scores, strict=True):
            if not math.isfinite(score):
                c.reason, c.manifest = "harmful: the eval loss is not finite with this Δ", None
            elif policy.screen and score < policy.min_score:  # it does not help: not applied
                c.score, c.manifest = float(score), None
                c.reason = (
                    f"no improvement: score {score:.4g} < contrib.min_score={policy.min_score:g}"
                )
        kept = [i for i, c in enumerate(passed) if c.valid]
        passed, scores = [passed[i] for i in kept], [scores[i] for i in kept]
        chosen = set(robust.select(policy.rule, scores))
        shares = screening.reward_shares(scores, [True] * len(passed))
        ranked = sorted(range(len(passed)), key=lambda i: (-scores[i], i))
        for i, c in enumerate(passed):
            c.score, c.accepted, c.reward = float(scores[i]), True, float(shares[i])
            if i not in chosen:
                rank, g = ranked.index(i) + 1, policy.rule.top_g
                c.reason = f"accepted, not applied: rank {rank} by score, {policy.rule} applies {g}"
                c.manifest = None
        return base_loss, sorted((c for c in passed if c.valid), key=lambda c: c.island)

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
        """Appends the round to the ledger (once) and mirrors the ledger into the store."""
        self.recorder.record(decision)
        self.recorder.upload()


# ---------------------------------------------------------------------------------- CLI


def scoring_loss(trainer, num_batches: int, source: str = "") -> Callable[[Any, int], float]:
    """loss_fn(params, seed) for scoring: the trainer's eval loss on `num_batches` val
    batches drawn from `seed` (drawn once per seed: a round scores everything on them) —
    of the run's val split, or of a private `source` (see `fixed_eval`)."""
    cache: dict[int, Callable[[Any], float]] = {}

    def loss(params: Any, seed: int) -> float:
        if seed not in cache:
            cache.clear()
            cache[seed] = fixed_eval(trainer, num_batches, val_seed=seed, source=source)
        return cache[seed](params)

    return loss


def build(
    cfg,
    trainer,
    store,
    run: str,
    manifest: dict | None,
    *,
    key_path: str,
    ledger_path: str,
    score_source: str = "",
    allowlist: dict | None = None,
    **kwargs: Any,
) -> ContribAggregator:
    """The aggregator of a contributor run (the policy from the manifest once the run
    exists, else from `cfg.contrib`); ValueError (one line) for an unusable key or
    scoring source."""
    if not key_path:
        raise ValueError(
            "a contributor run needs the aggregator's key: --key=PATH (make one with "
            "python -m near_jax.contrib keygen --out=PATH)"
        )
    try:
        key = identity.load(key_path)
    except identity.IdentityError as e:
        raise ValueError(str(e)) from None
    if manifest is not None:
        policy = Policy.from_json(manifest["contrib"]["policy"])
        allowlist = manifest["contrib"].get("allowlist")  # fixed when the run was created
    else:
        policy = Policy.from_config(cfg.contrib, attest.code_sha256(), recipe_sha256(cfg))
    loss = scoring_loss(trainer, policy.score_batches, score_source)
    if score_source:  # fail now, with the source named, not in the first round
        try:
            loss(jax.device_get(trainer.init(jax.random.key(0)).params), 0)
        except (ConfigError, ValueError, OSError) as e:
            raise ValueError(f"--score_source={score_source}: {one_line(e)}") from None
    return ContribAggregator(
        store,
        run,
        trainer.abstract_state.params,
        aggregator_key=key,
        policy=policy,
        loss_fn=loss,
        ledger_path=ledger_path,
        allowlist=allowlist,
        **kwargs,
    )
