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
    score      each survivor by the eval-loss improvement of θ_r − Δ_i (Δ_i applied alone,
               rescaled to the round's median norm so inflating a Δ cannot buy reward)
               on validation batches drawn from this round's seed, which nobody knows
               before the aggregator reveals it in the decision; with screening, a Δ
               scoring below `contrib.min_score` is not applied
    aggregate  the run's robust rule (trimmed mean, coordinate median, top-G by score or
               the plain mean) over the survivors it selects
    reward     each accepted contribution's share of the round: score⁺ / Σ score⁺

recorded (after the decision, the commit point, is written; before `latest` moves)
    appends the round's entries to the hash-chained SQLite ledger, then mirrors the ledger
    into the store (`RUN/ledger.sqlite`). The entries are part of the decision, which the
    aggregator signs, so the ledger is a pure function of the decisions: a restarted
    aggregator re-appends a round it had committed but not recorded (and checks that a
    recorded one matches), rebuilds a lost or broken ledger from them, and `verify` checks
    ledger against decisions. Only entries whose statement the contributor signed for this
    round carry a key id: nothing unsigned is held against a contributor's name.

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
import re
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from near_jax.contrib import attest, identity, ledger, screening
from near_jax.diloco import protocol, robust
from near_jax.diloco.aggregator import Aggregator
from near_jax.diloco.codec.compress import Payload, PayloadError, decode
from near_jax.diloco.protocol import ProtocolError, Verdict, Version
from near_jax.diloco.store import CorruptObject, ObjectTooLarge, StoreError

TAG_FIELDS = frozenset(
    {"format", "run", "round", "island", "base_sha256", "spec", "inner_loss", "inner_steps",
     "contributor", "payload_sha256", "code_sha256", "config_sha256", "signature",
     "attestation"}
)  # fmt: skip
_SEED_DOMAIN = b"near_jax/seed/v1\n"
_DECISION_DOMAIN = b"near_jax/decision/v1\n"
_SIGNATURE = re.compile(r"[0-9a-f]{128}")
_HASH = re.compile(r"[0-9a-f]{64}")
_ALLOW_DOMAIN = b"near_jax/allowed_code/v1\n"


# ------------------------------------------------------------------------------- policy


@dataclasses.dataclass(frozen=True)
class Policy:
    """How a run treats contributions; fixed in its manifest when the run is created."""

    rule: robust.Rule = robust.Rule("trimmed_mean")
    screen: bool = True
    max_norm_ratio: float = 3.0
    zero_norm_ratio: float = 1e-3
    duplicate_cosine: float = 0.99
    min_score: float = 0.0
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
            min_score=float(contrib_cfg.min_score),
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
    return aggregator.sign(_SEED_DOMAIN + protocol.dumps({"run": run, "round": rnd}))


def seed_commitment(signature_hex: str) -> str:
    """What is published before the round: sha256 of the signature (hides the seed)."""
    return hashlib.sha256(b"commit:" + bytes.fromhex(signature_hex)).hexdigest()


def seed_from_signature(signature_hex: str) -> int:
    """The 31-bit validation seed of a revealed signature."""
    digest = hashlib.sha256(b"seed:" + bytes.fromhex(signature_hex)).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def check_seed(public_hex: str, run: str, rnd: int, signature_hex: str, commitment: str) -> str:
    """'' if round `rnd`'s revealed seed signature is genuine and matches its commitment."""
    message = _SEED_DOMAIN + protocol.dumps({"run": run, "round": rnd})
    if not identity.verify(public_hex, message, signature_hex):
        return f"round {rnd}: the seed is not signed by the run's aggregator key"
    if seed_commitment(signature_hex) != commitment:
        return f"round {rnd}: the revealed seed does not match its commitment"
    return ""


def allowed_code_key(run: str) -> str:
    """The aggregator's signed list of code hashes allowed after the run was created."""
    return f"{run}/allowed_code"


def extra_allowed_code(store, run: str, aggregator_public: str) -> tuple[set[str], str]:
    """(the extra allowed code hashes, a problem or ""): only a list the run's aggregator
    signed counts (anyone can write to the store)."""
    try:
        obj = protocol.read_json(store, allowed_code_key(run))
    except (ProtocolError, CorruptObject) as e:
        return set(), f"{allowed_code_key(run)} is unreadable ({_short(e)[:100]})"
    if obj is None:
        return set(), ""
    body = {"run": obj.get("run"), "hashes": obj.get("hashes")}
    hashes = body["hashes"]
    if (
        body["run"] != run
        or not isinstance(hashes, list)
        or not all(isinstance(h, str) and _HASH.fullmatch(h) for h in hashes)
        or not identity.verify(aggregator_public, _ALLOW_DOMAIN + protocol.dumps(body),
                               obj.get("signature", ""))
    ):  # fmt: skip
        return set(), f"{allowed_code_key(run)} is not signed by the run's aggregator"
    return set(hashes), ""


def decision_bytes(decision: dict) -> bytes:
    """What the aggregator signs of a decision: everything but its "signature"."""
    body = {k: v for k, v in decision.items() if k != "signature"}
    return _DECISION_DOMAIN + protocol.dumps(body)


def check_decision(public_hex: str, decision: dict) -> bool:
    """Whether `decision` carries the aggregator's valid signature over its contents."""
    return identity.verify(public_hex, decision_bytes(decision), decision.get("signature", ""))


def _at_median_norm(deltas: list[Any]) -> list[Any]:
    """Each Δ larger than the round's median norm scaled down to it: a contributor cannot
    raise its score (and reward) by inflating its update. Smaller ones are left as they
    are (scaling up a token update would reward doing nothing)."""
    norms = screening.norms(deltas)
    finite = [n for n in norms if math.isfinite(n) and n > 0]
    if not finite:
        return deltas
    median = float(np.median(finite))
    return [
        jax.tree.map(lambda d, k=median / n: d * np.float32(k), delta)
        if math.isfinite(n) and n > median else delta
        for delta, n in zip(deltas, norms, strict=True)
    ]  # fmt: skip


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
    arrival: int = 0  # the aggregator's poll in which it was first listed

    def entry(self, rnd: int) -> dict:
        """This contribution's ledger entry."""
        return {"round": rnd, "contributor": self.contributor,
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
        log: Callable[[str], None] = lambda message: None,
        **kwargs: Any,
    ):
        super().__init__(store, run, like, **kwargs)
        self.log = log
        self.key, self.policy, self.loss_fn = aggregator_key, policy, loss_fn
        self.ledger_path = ledger_path
        self.verifier = self._verifier(frozenset())
        self.ledger: ledger.Ledger | None = None
        self.max_body = 2 * 4 * protocol.num_elements(like) + (1 << 20)  # fp32 + headroom
        self._keys: dict[str, str] = {}
        self._history: list[tuple[str, Any]] = []  # (contributor@round, Δ) of last round
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
        return {"contrib": {"policy": self.policy.to_json(),
                            "aggregator_key": self.key.public_hex,
                            "seed_commitment": seed_commitment(
                                seed_signature(self.key, self.run, 0))}}  # fmt: skip

    def _verifier(self, extra_code: frozenset[str]) -> attest.Verifier:
        return attest.load_verifier(
            self.policy.attestation, allowed_code=frozenset(self.policy.allowed_code) | extra_code,
            config_sha256=self.policy.config_sha256,
        )  # fmt: skip

    def allow_code(self, hashes: list[str]) -> list[str]:
        """Adds code hashes the run accepts from now on (a new near_jax release mid-run) to
        the signed list in the store; returns the whole extra list."""
        extra, _ = extra_allowed_code(self.store, self.run, self.key.public_hex)
        merged = sorted(extra | set(hashes))
        body = {"run": self.run, "hashes": merged}
        body["signature"] = self.key.sign(_ALLOW_DOMAIN + protocol.dumps(body))
        self.store.put(allowed_code_key(self.run), protocol.dumps(body))
        self.verifier = self._verifier(frozenset(merged))
        return merged

    # ----------------------------------------------------------------------- lifecycle

    def load(self) -> Version:
        """Loads the newest version, then brings the ledger up to it (see the docstring)."""
        state = super().load()
        manifest = protocol.read_json(self.store, protocol.manifest_key(self.run)) or {}
        theirs = manifest.get("contrib", {}).get("aggregator_key")
        if theirs != self.key.public_hex:
            raise ProtocolError(
                f"run {self.run!r} was created with aggregator key "
                f"{str(theirs)[:16]}…, this key is {self.key.public_hex[:16]}…"
            )
        extra, problem = extra_allowed_code(self.store, self.run, self.key.public_hex)
        if problem:
            self.log(f"warning: {problem}; only the manifest's code hashes are allowed")
        self.verifier = self._verifier(frozenset(extra))
        self._open_ledger()
        last = self.ledger.last_round()
        for rnd in range(0 if last is None else last + 1, state.version):
            decision = protocol.read_json(self.store, protocol.decision_key(self.run, rnd))
            if decision is None:
                raise ProtocolError(f"round {rnd} is published but has no decision")
            self._record(decision)
        self._upload()
        return state

    def _open_ledger(self) -> None:
        """The local ledger. One that does not verify is moved aside and rebuilt from the
        decisions (signed by this aggregator); the store's mirror is never read back, since
        anyone who can write to the store could have forged it."""
        if self.ledger is not None:
            self.ledger.close()
        path = self.ledger_path
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        except OSError as e:
            raise ProtocolError(f"cannot create the ledger's directory for {path}: {e}") from None
        if os.path.exists(path) and not _is_sqlite_file(path):
            raise ProtocolError(
                f"ledger path {path} exists and is not a ledger file (pass --ledger=FILE)"
            )
        if os.path.exists(path):
            problems = ledger.verify_chain(path, self.run)
            if problems:
                aside = f"{path}.broken-{int(time.time())}"
                for suffix in ("", "-journal"):
                    if os.path.exists(path + suffix):
                        os.replace(path + suffix, aside + suffix)
                self.log(f"ledger {path} does not verify ({problems[0]}); moved it to {aside}, "
                         "rebuilding it from the decisions")  # fmt: skip
        try:
            self.ledger = ledger.Ledger.open(path, self.run)
        except ledger.LedgerError as e:
            raise ProtocolError(str(e)) from None

    def close(self) -> None:
        if self.ledger is not None:
            self.ledger.close()
            self.ledger = None

    # --------------------------------------------------------------------------- check

    def check(self, base: Version, key: str) -> Candidate:
        """Reads and verifies one contribution; never raises on what it contains."""
        island = key.rsplit("/", 1)[-1]
        c = Candidate(key, island, contributor=island, arrival=self.poll_index)
        try:
            c.reason = self._verify(base, c)
        except StoreError:
            raise  # the store itself failed: not this contribution's fault
        except Exception as e:  # noqa: BLE001 - content must never stop the aggregator
            c.reason = f"malformed: {type(e).__name__} while checking it: {_short(e)}"
        if c.reason:
            c.payload = c.delta = None
        return c

    def _verify(self, base: Version, c: Candidate) -> str:
        """'' if `c` passes every check, else the reason. Fills in what it learns; the key id
        only once the contributor's signature over this round's statement verifies, so
        nothing is attributed to a contributor who did not sign it."""
        r = base.version
        try:  # read no more than max_body: an oversized object is refused unread
            body = self.store.get(c.key, max_bytes=self.max_body)
        except ObjectTooLarge as e:
            return f"malformed: oversized ({e.reason})"
        except CorruptObject as e:
            return f"malformed: corrupt object ({e.reason})"
        if body is None:
            return "malformed: vanished before it could be read"
        c.sha256 = protocol.sha256(body)
        try:
            tag, data = protocol.split_contribution(body)
        except PayloadError as e:
            return f"malformed: {_short(e)}"
        unknown = sorted(set(tag) - TAG_FIELDS)
        if unknown:
            return f"malformed: unknown tag fields {', '.join(map(repr, unknown))[:200]}"
        c.payload_sha256 = hashlib.sha256(data).hexdigest()
        if tag.get("run") != self.run:
            return f"malformed: tag run={tag.get('run')!r:.80}, this run is {self.run!r}"
        if isinstance(tag.get("round"), int) and tag["round"] < r:
            return f"replayed: signed for round {tag['round']}, which is closed (now {r})"
        if tag.get("round") != r:
            return f"malformed: tag round={tag.get('round')!r:.40}, the key says {r}"
        claimed = tag.get("contributor", c.island)
        if tag.get("island") != c.island or claimed != c.island:
            return f"malformed: the tag names {claimed!r:.80}, the key {c.island!r}"
        try:  # the structure only: a truncated or misshapen payload is named as such
            payload = Payload.from_bytes(data, max_elements=protocol.num_elements(self.like))
        except PayloadError as e:
            return f"malformed payload: {_short(e)}"
        if "signature" not in tag or "contributor" not in tag:
            return "unsigned: no contributor signature"
        public, problem = self._public_key(c.island)
        if public is None:
            return f"unregistered contributor {c.island!r}{problem}"
        fields = {k: tag.get(k) for k in identity.STATEMENT_FIELDS}
        fields["payload_sha256"] = c.payload_sha256  # what the payload is, not what it claims
        try:
            statement = identity.statement_bytes(fields).split(b"\n", 1)[1].decode()
        except identity.IdentityError as e:
            return f"malformed: {_short(e)}"
        signature = tag["signature"]
        if not (isinstance(signature, str) and _SIGNATURE.fullmatch(signature)):
            return "bad signature: not 128 lowercase hex characters"
        c.statement, c.signature = statement, signature
        if not identity.verify_statement(public, fields, signature):
            return f"bad signature (registered key id {identity.key_id(public)})"
        c.key_id = identity.key_id(public)  # from here on, the contributor signed this
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
        with np.errstate(over="ignore", invalid="ignore"):  # reported below, per leaf
            delta = decode(payload, like=self.like)
        for path, leaf in jax.tree_util.tree_flatten_with_path(delta)[0]:
            if not np.isfinite(leaf).all():
                return f"invalid: non-finite values in {jax.tree_util.keystr(path)}"
        c.payload, c.delta = payload, delta
        return ""

    def _public_key(self, name: str) -> tuple[str | None, str]:
        """(registered public key or None, why not); cached once found (entries never
        change: first come, first served)."""
        if name not in self._keys:
            try:
                public = identity.lookup(self.store, self.run, name)
            except StoreError:
                raise
            except Exception as e:  # noqa: BLE001 - a tampered entry yields no key
                return None, f" (its registry entry is invalid: {_short(e)[:120]})"
            if public is None:
                return None, ""  # not cached: it may register later
            self._keys[name] = public
        return self._keys[name], ""

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
                arrival=[c.arrival for c in valid],
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
                lambda params: self.loss_fn(params, seed), base.params,
                _at_median_norm([c.delta for c in passed]),
            )  # fmt: skip
            if not math.isfinite(base_loss):
                base_loss = None  # JSON has no nan; every score is -inf, nothing is applied
        for c, score in zip(passed, scores, strict=True):
            if not math.isfinite(score):
                c.reason, c.payload = "harmful: the eval loss is not finite with this Δ", None
            elif policy.screen and score < policy.min_score:  # it does not help: not applied
                c.score, c.payload = float(score), None
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
                c.payload = None
        applied = sorted((c for c in passed if c.valid), key=lambda c: c.island)
        combine = protocol.combiner({"aggregation": str(policy.rule)})
        new, update = protocol.derive(
            base, [c.payload for c in applied], self.spec, self.lr, self.momentum, self.like,
            combine,
        )  # fmt: skip
        entries = [c.entry(r) for c in sorted(candidates, key=lambda c: c.island)]
        extra = {"aggregation": str(policy.rule),
                 "contrib": {"seed_signature": signature,
                             "next_seed_commitment": seed_commitment(
                                 seed_signature(self.key, self.run, r + 1)),
                             "base_loss": base_loss, "entries": entries}}  # fmt: skip
        decision = protocol.make_decision(
            self.run, base, new, verdicts, late, reason, update, self.clock(), **extra
        )
        for entry in entries:  # an entry the ledger refuses must stop us before the commit
            ledger.normalize_entry(entry, r)
        decision["signature"] = self.key.sign(decision_bytes(decision))
        self._history = [(f"{c.contributor}@{r}", c.delta) for c in applied]
        self._history_round = r
        for c in candidates:
            c.delta = None  # the decoded trees are large; only the history keeps some
        return new, update, decision

    def _refresh_history(self, r: int) -> None:
        """What a stale copy would copy, for screening: the previous round's applied Δ and
        its published update (re-pushing the update costs nothing). Read from the store
        after a restart; an unreadable object only drops out of the history."""
        if r == 0:
            return
        if self._history_round != r - 1:
            self._history, self._history_round = [], r - 1
            decision = _read_quietly(
                lambda: protocol.read_json(self.store, protocol.decision_key(self.run, r - 1))
            )
            for entry in (decision or {}).get("accepted", []):
                delta = _read_quietly(lambda e=entry: self._decoded(e["key"], e["sha256"]))
                if delta is not None:
                    self._history.append((f"{entry['island']}@{r - 1}", delta))
        label = f"the published update of round {r - 1}"
        if all(name != label for name, _ in self._history):
            update = _read_quietly(lambda: self._decoded(protocol.update_key(self.run, r - 1)))
            if update is not None:
                self._history.append((label, update))

    def _decoded(self, key: str, sha256: str | None = None) -> Any:
        """The Δ or update stored at `key` (None if missing or not the recorded object)."""
        body = self.store.get(key, max_bytes=self.max_body)
        if body is None or (sha256 is not None and protocol.sha256(body) != sha256):
            return None
        limit = protocol.num_elements(self.like)
        if key.endswith("/update"):
            return decode(Payload.from_bytes(body, max_elements=limit), like=self.like)
        return decode(protocol.unpack_contribution(body, limit)[1], like=self.like)

    # ------------------------------------------------------------------------ recorded

    def recorded(self, decision: dict) -> None:
        """Appends the round to the ledger (once) and mirrors the ledger into the store."""
        self._record(decision)
        self._upload()

    def _record(self, decision: dict) -> None:
        """Appends decision's entries; a round already recorded must match them exactly."""
        r = int(decision.get("round", -1))
        if not check_decision(self.key.public_hex, decision):
            raise ProtocolError(f"decision {r} is not signed by this aggregator's key")
        entries = decision.get("contrib", {}).get("entries")
        if entries is None:
            raise ProtocolError(f"round {r}'s decision has no contrib entries")
        try:
            want = [ledger.normalize_entry(e, r) for e in entries]
            if not want or self.ledger.append_round(r, entries):
                return
        except (ledger.LedgerError, ValueError) as e:
            raise ProtocolError(f"cannot record round {r} in {self.ledger_path}: {e}") from None
        have = [{k: e[k] for k in ledger.ENTRY_FIELDS} for e in self.ledger.entries(r, r)]
        if have != want:
            raise ProtocolError(
                f"ledger {self.ledger_path} holds a round {r} that differs from its decision; "
                "move the file aside and restart to rebuild it from the decisions"
            )

    def _upload(self) -> None:
        try:
            ledger.upload(self.store, self.run, self.ledger_path)
        except ledger.LedgerError as e:
            raise ProtocolError(str(e)) from None


def _is_sqlite_file(path: str) -> bool:
    """A regular file that starts like a SQLite database (what may be moved aside)."""
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(16) == b"SQLite format 3\x00"


def _read_quietly(read: Callable[[], Any]) -> Any:
    """read(), or None when what it reads is damaged (never when the store is down)."""
    try:
        return read()
    except StoreError:
        raise
    except Exception:  # noqa: BLE001 - a damaged object only drops out of the history
        return None


def _short(e: object) -> str:
    return " ".join(str(e).split())[:300]


# ---------------------------------------------------------------------------------- CLI


def scoring_loss(trainer, num_batches: int, source: str = "") -> Callable[[Any, int], float]:
    """loss_fn(params, seed) for scoring: the trainer's eval loss on `num_batches` val
    batches drawn from `seed` (drawn once per seed: a round scores everything on them) —
    of the run's val split, or of a private `source` (see `fixed_eval`)."""
    from near_jax.diloco.aggregator import fixed_eval

    cache: dict[int, Callable[[Any], float]] = {}

    def loss(params: Any, seed: int) -> float:
        if seed not in cache:
            cache.clear()
            cache[seed] = fixed_eval(trainer, num_batches, val_seed=seed, source=source)
        return cache[seed](params)

    return loss


def build(
    cfg, trainer, store, run: str, manifest: dict | None, *, key_path: str, ledger_path: str,
    score_source: str = "", **kwargs: Any,
) -> ContribAggregator:  # fmt: skip
    """The aggregator of a contributor run (the policy from the manifest once the run
    exists, else from `cfg.contrib`); ValueError (one line) for an unusable key or
    scoring source."""
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
    loss = scoring_loss(trainer, policy.score_batches, score_source)
    if score_source:  # fail now, with the source named, not in the first round
        from near_jax.config import ConfigError

        try:
            loss(jax.device_get(trainer.init(jax.random.key(0)).params), 0)
        except (ConfigError, ValueError, OSError) as e:
            raise ValueError(f"--score_source={score_source}: {_short(e)}") from None
    return ContribAggregator(
        store, run, trainer.abstract_state.params, aggregator_key=key, policy=policy,
        loss_fn=loss, ledger_path=ledger_path, **kwargs,
    )  # fmt: skip
