"""The aggregator's validator role: rounds of DiLoCo whose contributors don't trust each other.

`ContribAggregator` is the islands' `diloco.aggregator.Aggregator` with three hooks filled:

check (each contribution as it arrives; a failed check is a rejection with its reason)
    malformed: corrupt or truncated object, oversized, unknown tag fields, bad payload
    replayed:  signed for an earlier (closed) round, or a payload already in the ledger
    unsigned / unregistered contributor / bad signature (ed25519 over the statement: run,
               round, contributor, base hash, payload hash, code hash, config hash)
    wrong base: trained from another version than the round's
    attestation: the run's verifier refused the signed code hash or the attestation blob
    invalid:   payload shaped unlike the params, or NaN/Inf

decide (once the round closes)
    screen     free-riders (zero updates), norm outliers, stale copies of the previous
               round's applied contributions, near-duplicates of an earlier arrival (the
               order the aggregator first listed them in; one poll lists by name, so a
               copier must land in a later poll than its original, which it has to read
               first — poll often: `--poll_seconds`)
    score      each survivor by the eval-loss improvement of θ_r − Δ_i (Δ_i applied alone)
               on validation batches drawn from this round's seed, which nobody knows
               before the aggregator reveals it in the decision
    aggregate  the run's robust rule (trimmed mean, coordinate median, top-G by score or
               the plain mean) over the survivors it selects
    reward     each accepted contribution's share of the round: score⁺ / Σ score⁺

recorded (after the decision, the commit point, is published)
    appends the round's entries to the hash-chained SQLite ledger, then mirrors the ledger
    into the store (`RUN/ledger.sqlite`). The entries are part of the decision, so the
    ledger is a pure function of the decisions: a restarted aggregator re-appends a round
    it had committed but not recorded, and `verify` checks ledger against decisions.

Seeds: the seed of round r is derived from the aggregator's ed25519 signature over
(run, r) — deterministic, so a restart recomputes it — and sha256 of that signature is
published one round ahead (round 0's in the run's manifest, round r + 1's in decision r),
so the aggregator cannot pick a seed after seeing the contributions, and anyone can check
the reveal against the commitment and the aggregator's public key.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from near_jax.contrib import attest, identity, ledger, robust, screening
from near_jax.diloco import rounds
from near_jax.diloco.aggregator import Aggregator
from near_jax.diloco.compress import Payload, PayloadError, decode
from near_jax.diloco.rounds import ProtocolError, Verdict, Version
from near_jax.diloco.store import CorruptObject

TAG_FIELDS = frozenset(
    {"format", "run", "round", "island", "base_sha256", "spec", "inner_loss", "inner_steps",
     "contributor", "payload_sha256", "code_sha256", "config_sha256", "signature",
     "attestation"}
)  # fmt: skip
_SEED_DOMAIN = b"near_jax/seed/v1\n"


# ------------------------------------------------------------------------------- policy


@dataclasses.dataclass(frozen=True)
class Policy:
    """How a run treats contributions; fixed in its manifest when the run is created."""

    rule: robust.Rule = robust.Rule("trimmed_mean")
    screen: bool = True
    max_norm_ratio: float = 3.0
    zero_norm_ratio: float = 1e-3
    duplicate_cosine: float = 0.99
    score_batches: int = 2
    attestation: str = "code_hash"
    allowed_code: tuple[str, ...] = ()
    config_sha256: str = ""

    @classmethod
    def from_config(cls, contrib_cfg, code_sha256: str, config_sha256: str) -> Policy:
        """The policy of a config's `contrib` section; the creator's code hash is allowed."""
        extra = [h.strip() for h in contrib_cfg.allowed_code.split(",") if h.strip()]
        return cls(
            rule=robust.Rule.from_config(contrib_cfg),
            screen=bool(contrib_cfg.screen),
            max_norm_ratio=float(contrib_cfg.max_norm_ratio),
            zero_norm_ratio=float(contrib_cfg.zero_norm_ratio),
            duplicate_cosine=float(contrib_cfg.duplicate_cosine),
            score_batches=int(contrib_cfg.score_batches),
            attestation=contrib_cfg.attestation,
            allowed_code=tuple(sorted({code_sha256, *extra})),
            config_sha256=config_sha256,
        )

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["rule"], out["allowed_code"] = str(self.rule), list(self.allowed_code)
        return out

    @classmethod
    def from_json(cls, obj: dict) -> Policy:
        obj = dict(obj)
        obj["rule"] = robust.Rule.parse(obj["rule"])
        obj["allowed_code"] = tuple(obj["allowed_code"])
        return cls(**obj)


# -------------------------------------------------------------------------------- seeds


def seed_signature(aggregator: identity.Identity, run: str, rnd: int) -> str:
    """The aggregator's (deterministic) ed25519 signature that round `rnd`'s seed comes from."""
    return aggregator.sign(_SEED_DOMAIN + rounds.dumps({"run": run, "round": rnd}))


def seed_commitment(signature_hex: str) -> str:
    """What is published before the round: sha256 of the signature (hides the seed)."""
    return hashlib.sha256(b"commit:" + bytes.fromhex(signature_hex)).hexdigest()


def seed_from_signature(signature_hex: str) -> int:
    """The 31-bit validation seed of a revealed signature."""
    digest = hashlib.sha256(b"seed:" + bytes.fromhex(signature_hex)).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def check_seed(public_hex: str, run: str, rnd: int, signature_hex: str, commitment: str) -> str:
    """'' if round `rnd`'s revealed seed signature is genuine and matches its commitment."""
    message = _SEED_DOMAIN + rounds.dumps({"run": run, "round": rnd})
    if not identity.verify(public_hex, message, signature_hex):
        return f"round {rnd}: the seed is not signed by the run's aggregator key"
    if seed_commitment(signature_hex) != commitment:
        return f"round {rnd}: the revealed seed does not match its commitment"
    return ""


# --------------------------------------------------------------------------- candidates


@dataclasses.dataclass
class Candidate(Verdict):
    """A contribution as the validator sees it (a diloco Verdict plus who signed what)."""

    contributor: str = ""
    key_id: str = ""
    payload_sha256: str = ""
    statement: str = ""  # canonical JSON of the signed fields ("" when unsigned/unparsed)
    signature: str = ""
    delta: Any = None  # decoded Δ, while it is a candidate
    score: float | None = None
    accepted: bool = False
    reward: float = 0.0

    def entry(self, rnd: int) -> dict:
        """This contribution's ledger entry."""
        return {"round": rnd, "contributor": self.contributor or self.island,
                "key_id": self.key_id, "payload_sha256": self.payload_sha256,
                "statement": self.statement, "signature": self.signature,
                "score": self.score, "accepted": self.accepted, "applied": self.valid,
                "reason": self.reason, "reward": self.reward}  # fmt: skip


# ------------------------------------------------------------------------ the aggregator


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
        **kwargs: Any,
    ):
        super().__init__(store, run, like, **kwargs)
        self.key, self.policy, self.loss_fn = aggregator_key, policy, loss_fn
        self.ledger_path = ledger_path
        self.verifier = attest.load_verifier(
            policy.attestation, allowed_code=frozenset(policy.allowed_code),
            config_sha256=policy.config_sha256,
        )  # fmt: skip
        self.ledger: ledger.Ledger | None = None
        self.max_body = 2 * 4 * rounds.num_elements(like) + (1 << 20)  # fp32 + headroom
        self._keys: dict[str, str] = {}
        self._history: list[tuple[str, Any]] = []  # (contributor@round, Δ) of last round
        self._history_round = -1
        self._arrivals = 0

    def manifest_fields(self) -> dict:
        """What `create` records about contributions (the policy, key, round 0's seed)."""
        return {"contrib": {"policy": self.policy.to_json(),
                            "aggregator_key": self.key.public_hex,
                            "seed_commitment": seed_commitment(
                                seed_signature(self.key, self.run, 0))}}  # fmt: skip

    # ----------------------------------------------------------------------- lifecycle

    def load(self) -> Version:
        """Loads the newest version, then brings the ledger up to it (see the docstring)."""
        state = super().load()
        manifest = rounds.read_json(self.store, rounds.manifest_key(self.run)) or {}
        theirs = manifest.get("contrib", {}).get("aggregator_key")
        if theirs != self.key.public_hex:
            raise ProtocolError(
                f"run {self.run!r} was created with aggregator key "
                f"{str(theirs)[:16]}…, this key is {self.key.public_hex[:16]}…"
            )
        self._open_ledger()
        for rnd in range((self.ledger.last_round() or -1) + 1, state.version):
            decision = rounds.read_json(self.store, rounds.decision_key(self.run, rnd))
            if decision is None:
                raise ProtocolError(f"round {rnd} is published but has no decision")
            self._record(decision)
        ledger.upload(self.store, self.run, self.ledger_path)
        return state

    def _open_ledger(self) -> None:
        """The local ledger, replaced by the store's mirror when that one is further on."""
        if self.ledger is not None:
            self.ledger.close()
        os.makedirs(os.path.dirname(os.path.abspath(self.ledger_path)), exist_ok=True)
        mirror = self.ledger_path + ".mirror"
        try:
            downloaded = ledger.download(self.store, self.run, mirror)
        except ledger.LedgerError as e:
            raise ProtocolError(str(e)) from None
        if downloaded:
            if ledger.verify_chain(mirror, self.run):
                raise ProtocolError(f"the store's ledger of run {self.run!r} does not verify")
            if _last_round(mirror) > _last_round(self.ledger_path):
                os.replace(mirror, self.ledger_path)
        if os.path.exists(mirror):
            os.remove(mirror)
        if os.path.exists(self.ledger_path):
            problems = ledger.verify_chain(self.ledger_path, self.run)
            if problems:
                raise ProtocolError(f"ledger {self.ledger_path} is broken: {problems[0]}")
        self.ledger = ledger.Ledger.open(self.ledger_path, self.run)

    def close(self) -> None:
        if self.ledger is not None:
            self.ledger.close()
            self.ledger = None

    # --------------------------------------------------------------------------- check

    def check(self, base: Version, key: str) -> Candidate:
        """Reads and verifies one contribution; never raises on what it contains."""
        c = Candidate(key, key.rsplit("/", 1)[-1])
        self._arrivals += 1
        c.reason = self._verify(base, c)
        if c.reason:
            c.payload = c.delta = None
        return c

    def _verify(self, base: Version, c: Candidate) -> str:
        r = base.version
        try:
            body = self.store.get(c.key)
        except CorruptObject as e:
            return f"malformed: corrupt object ({e.reason})"
        if body is None:
            return "malformed: vanished before it could be read"
        c.sha256 = rounds.sha256(body)
        if len(body) > self.max_body:
            return f"malformed: oversized ({len(body)} bytes, limit {self.max_body})"
        try:
            tag, data = rounds.split_contribution(body)
        except PayloadError as e:
            return f"malformed: {_short(e)}"
        unknown = sorted(set(tag) - TAG_FIELDS)
        if unknown:
            return f"malformed: unknown tag fields {', '.join(map(repr, unknown))[:200]}"
        c.contributor = tag.get("contributor") if isinstance(tag.get("contributor"), str) else ""
        c.payload_sha256 = hashlib.sha256(data).hexdigest()
        if tag.get("run") != self.run:
            return f"malformed: tag run={tag.get('run')!r:.80}, this run is {self.run!r}"
        if isinstance(tag.get("round"), int) and tag["round"] < r:
            return f"replayed: signed for round {tag['round']}, which is closed (now {r})"
        if tag.get("round") != r:
            return f"malformed: tag round={tag.get('round')!r:.40}, the key says {r}"
        if tag.get("island") != c.island or (c.contributor and c.contributor != c.island):
            return f"malformed: tag names {c.contributor or tag.get('island')!r:.80}, the key " \
                   f"says {c.island!r}"  # fmt: skip
        try:  # the structure only: a truncated or misshapen payload is named as such
            payload = Payload.from_bytes(data, max_elements=rounds.num_elements(self.like))
        except PayloadError as e:
            return f"malformed payload: {_short(e)}"
        if "signature" not in tag or not c.contributor:
            return "unsigned: no contributor signature"
        public = self._public_key(c.contributor)
        if public is None:
            return f"unregistered contributor {c.contributor!r}"
        c.key_id = hashlib.sha256(bytes.fromhex(public)).hexdigest()[:16]
        fields = {k: tag.get(k) for k in identity.STATEMENT_FIELDS}
        fields["payload_sha256"] = c.payload_sha256  # what the payload is, not what it claims
        c.signature = str(tag["signature"])[:256]
        try:
            c.statement = identity.statement_bytes(fields).split(b"\n", 1)[1].decode()
        except identity.IdentityError as e:
            return f"malformed: {_short(e)}"
        if not identity.verify_statement(public, fields, c.signature):
            return f"bad signature (key id {c.key_id})"
        if tag["base_sha256"] != base.params_sha256:
            return (f"wrong base: trained from {tag['base_sha256'][:12]}, round {r} starts "
                    f"from {base.params_sha256[:12]}")  # fmt: skip
        seen = self.ledger.payload_seen(c.payload_sha256) if self.ledger else None
        if seen is not None:
            return f"replayed: payload already seen from {seen[1]!r} in round {seen[0]}"
        try:
            blob = base64.b64decode(tag.get("attestation", ""), validate=True)
        except (binascii.Error, TypeError, ValueError):
            return "malformed: attestation is not base64"
        claim = attest.Claim(**fields)
        refused = attest.check(self.verifier, claim, blob)
        if refused:
            return f"attestation: {_short(refused)}"
        try:
            with np.errstate(over="ignore", invalid="ignore"):
                delta = decode(payload, like=self.like)
        except PayloadError as e:
            return f"invalid: {_short(e)}"
        for path, leaf in jax.tree_util.tree_flatten_with_path(delta)[0]:
            if not np.isfinite(leaf).all():
                return f"invalid: non-finite values in {jax.tree_util.keystr(path)}"
        c.payload, c.delta = payload, delta
        return ""

    def _public_key(self, name: str) -> str | None:
        if name not in self._keys:
            try:
                public = identity.lookup(self.store, self.run, name)
            except (identity.IdentityError, ValueError):
                return None
            if public is None:
                return None  # not cached: it may register later
            self._keys[name] = public
        return self._keys[name]

    # -------------------------------------------------------------------------- decide

    def decide(
        self, base: Version, verdicts: list[Verdict], late: list[dict], reason: str
    ) -> tuple[Version, bytes | None, dict]:
        """Screens, scores, selects and aggregates the round (see the module docstring)."""
        r, policy = base.version, self.policy
        self._refresh_history(r)
        candidates = [c for c in verdicts if isinstance(c, Candidate)]  # arrival order
        valid = [c for c in candidates if c.valid]
        if policy.screen and valid:
            reasons = screening.screen(
                [c.delta for c in valid], [c.contributor for c in valid],
                history=self._history, max_norm_ratio=policy.max_norm_ratio,
                zero_norm_ratio=policy.zero_norm_ratio, duplicate_cosine=policy.duplicate_cosine,
            )  # fmt: skip
            for c, why in zip(valid, reasons, strict=True):
                if why:
                    c.reason, c.payload = why, None
        passed = [c for c in valid if c.valid]
        signature = seed_signature(self.key, self.run, r)
        seed = seed_from_signature(signature)
        base_loss, scores = None, []
        if passed:
            base_loss, scores = screening.score_contributions(
                lambda params: self.loss_fn(params, seed), base.params, [c.delta for c in passed]
            )
        finite = [math.isfinite(s) for s in scores]
        chosen = set(robust.select(policy.rule, scores)) & {i for i, f in enumerate(finite) if f}
        shares = screening.reward_shares(scores, finite)
        ranked = sorted(range(len(passed)), key=lambda i: (-scores[i], i))
        for i, c in enumerate(passed):
            if not finite[i]:
                c.reason, c.payload = "harmful: the eval loss is not finite with this Δ", None
                continue
            c.score, c.accepted, c.reward = float(scores[i]), True, float(shares[i])
            if i not in chosen:
                rank, g = ranked.index(i) + 1, policy.rule.top_g
                c.reason = f"accepted, not applied: rank {rank} by score, {policy.rule} applies {g}"
                c.payload = None
        applied = sorted((c for c in passed if c.valid), key=lambda c: c.island)
        combine = rounds.combiner({"aggregation": str(policy.rule)})
        new, update = rounds.derive(
            base, [c.payload for c in applied], self.spec, self.lr, self.momentum, self.like,
            combine,
        )  # fmt: skip
        entries = [c.entry(r) for c in sorted(candidates, key=lambda c: c.island)]
        extra = {"aggregation": str(policy.rule),
                 "contrib": {"seed_signature": signature,
                             "next_seed_commitment": seed_commitment(
                                 seed_signature(self.key, self.run, r + 1)),
                             "base_loss": base_loss, "entries": entries}}  # fmt: skip
        decision = rounds.make_decision(
            self.run, base, new, verdicts, late, reason, update, self.clock(), **extra
        )
        self._history = [(f"{c.contributor}@{r}", c.delta) for c in applied]
        self._history_round = r
        for c in candidates:
            c.delta = None  # the decoded trees are large; only the history keeps some
        return new, update, decision

    def _refresh_history(self, r: int) -> None:
        """The previous round's applied Δ (for stale-copy screening), from the store after a
        restart."""
        if self._history_round == r - 1 or r == 0:
            return
        self._history, self._history_round = [], r - 1
        decision = rounds.read_json(self.store, rounds.decision_key(self.run, r - 1))
        for entry in (decision or {}).get("accepted", []):
            body = self.store.get(entry["key"])
            if body is None or rounds.sha256(body) != entry["sha256"]:
                continue
            payload = rounds.unpack_contribution(body, rounds.num_elements(self.like))[1]
            self._history.append((f"{entry['island']}@{r - 1}", decode(payload, like=self.like)))

    # ------------------------------------------------------------------------ recorded

    def recorded(self, decision: dict) -> None:
        """Appends the round to the ledger (once) and mirrors the ledger into the store."""
        self._record(decision)
        ledger.upload(self.store, self.run, self.ledger_path)

    def _record(self, decision: dict) -> None:
        entries = decision.get("contrib", {}).get("entries")
        if entries is None:
            raise ProtocolError(f"round {decision.get('round')}'s decision has no contrib entries")
        if entries:
            self.ledger.append_round(int(decision["round"]), entries)


def _last_round(path: str) -> int:
    """The last round in a ledger file, -1 if none or no file (read-only)."""
    import sqlite3

    if not os.path.exists(path):
        return -1
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        row = con.execute("SELECT MAX(round) FROM entries").fetchone()
    except sqlite3.Error:
        return -1
    finally:
        con.close()
    return -1 if row is None or row[0] is None else int(row[0])


def _short(e: object) -> str:
    return " ".join(str(e).split())[:300]


# ---------------------------------------------------------------------------------- CLI


def scoring_loss(trainer, num_batches: int) -> Callable[[Any, int], float]:
    """loss_fn(params, seed) for scoring: the trainer's eval loss on `num_batches` val
    batches drawn from `seed` (drawn once per seed: a round scores everything on them)."""
    from near_jax.diloco.aggregator import fixed_eval

    cache: dict[int, Callable[[Any], float]] = {}

    def loss(params: Any, seed: int) -> float:
        if seed not in cache:
            cache.clear()
            cache[seed] = fixed_eval(trainer, num_batches, val_seed=seed)
        return cache[seed](params)

    return loss


def build(
    cfg, trainer, store, run: str, manifest: dict | None, *, key_path: str, ledger_path: str,
    **kwargs: Any,
) -> ContribAggregator:  # fmt: skip
    """The aggregator of a contributor run (the policy from the manifest once the run
    exists, else from `cfg.contrib`); ValueError (one line) for an unusable key."""
    from near_jax.contrib.contributor import recipe_sha256

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
    else:
        policy = Policy.from_config(cfg.contrib, attest.code_sha256(), recipe_sha256(cfg))
    return ContribAggregator(
        store, run, trainer.abstract_state.params, aggregator_key=key, policy=policy,
        loss_fn=scoring_loss(trainer, policy.score_batches), ledger_path=ledger_path, **kwargs,
    )  # fmt: skip
