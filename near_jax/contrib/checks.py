"""The validator's check of each contribution as it arrives: a failed check is a rejection.

    malformed: corrupt or truncated object, oversized, unknown tag fields, bad payload
    replayed:  signed for an earlier (closed) round, or a payload already in the ledger
    unsigned / unregistered contributor / bad signature (ed25519 over the statement: run,
               round, contributor, base hash, payload hash, code hash, config hash)
    not on the run's allowlist: (allowlisted runs) the contributor's name and key are not
               admitted (`allowlist`); checked once the signature verifies, not disqualifying
    wrong base: trained from another version than the round's
    attestation: the signed code hash was revoked, or the run's verifier refused it or the
               attestation blob
    invalid:   payload shaped unlike the params, or NaN/Inf

A contribution that passes every check is a `Candidate`: its signed shard manifest, for
the validator to screen and score once the round closes. Its shards are streamed here one
at a time (read, checked against the manifest, decoded, dropped: one shard in memory), and
again while the round is decided (`streamed.py`); nothing holds the whole Δ.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import re
from collections.abc import Callable
from typing import Any

from near_jax._io import one_line
from near_jax.contrib import attest, identity, registry
from near_jax.contrib.allowlist import Admissions
from near_jax.diloco import protocol
from near_jax.diloco.codec.compress import PayloadError
from near_jax.diloco.protocol import Verdict, Version
from near_jax.diloco.store import CorruptObject, ObjectStore, ObjectTooLarge, StoreError

TAG_FIELDS = frozenset(
    {
        "format",
        "run",
        "round",
        "island",
        "base_sha256",
        "spec",
        "inner_loss",
        "inner_steps",
        "contributor",
        "payload_sha256",
        "code_sha256",
        "config_sha256",
        "signature",
        "attestation",
    }
)
_SIGNATURE = re.compile(r"[0-9a-f]{128}")


@dataclasses.dataclass
class Candidate(Verdict):
    """A contribution as the validator sees it (a diloco Verdict plus who signed what)."""

    contributor: str = ""
    key_id: str = ""
    payload_sha256: str = ""
    statement: str = ""  # canonical JSON of the signed fields ("" when unsigned/unparsed)
    signature: str = ""
    score: float | None = None
    accepted: bool = False
    reward: float = 0.0
    arrival: int = 0  # the aggregator's poll in which it was first listed

    def entry(self, rnd: int) -> dict:
        """This contribution's ledger entry."""
        return {
            "round": rnd,
            "contributor": self.contributor,
            "key_id": self.key_id,
            "payload_sha256": self.payload_sha256,
            "statement": self.statement,
            "signature": self.signature,
            "score": self.score,
            "accepted": self.accepted,
            "applied": self.valid,
            "reason": self.reason,
            "reward": self.reward,
        }


class Checker:
    """Checks the contributions to one run (cut by `plan`, the run's shard plan: set it once
    the run exists): reads at most a manifest's bytes of each object (then its shards, one
    at a time, each checked against the manifest and dropped), looks its contributor up
    in the run's key registry (caching keys once found), asks `payload_seen(sha256)` —
    the ledger's (round, contributor) of a payload, or None — whether it is a replay, and
    `verifier` (replaced when more code is allowed) whether its attestation holds; a
    code hash in `revoked` is refused first. In an allowlisted run, `admissions` says who
    is admitted (re-read once per round)."""

    def __init__(
        self,
        store: ObjectStore,
        run: str,
        like: Any,
        *,
        plan: protocol.ShardPlan,
        verifier: attest.Verifier,
        payload_seen: Callable[[str], tuple[int, str] | None],
        admissions: Admissions | None = None,
    ):
        self.store, self.run, self.like, self.plan = store, run, like, plan
        self.verifier, self.payload_seen = verifier, payload_seen
        self.admissions, self.revoked = admissions, frozenset()
        self._keys: dict[str, str] = {}

    def check(self, base: Version, key: str, arrival: int) -> Candidate:
        """Reads and verifies one contribution, first listed in the aggregator's poll number
        `arrival`; never raises on what it contains."""
        island = key.rsplit("/", 1)[-1]
        c = Candidate(key, island, contributor=island, arrival=arrival)
        try:
            c.reason = self._verify(base, c)
        except StoreError:
            raise  # the store itself failed: not this contribution's fault
        except Exception as e:  # noqa: BLE001 - content must never stop the aggregator
            c.reason = f"malformed: {type(e).__name__} while checking it: {one_line(e)}"
        if c.reason:
            c.manifest = None
        return c

    def _verify(self, base: Version, c: Candidate) -> str:
        """'' if `c` passes every check, else the reason. Fills in what it learns; the key id
        only once the contributor's signature over this round's statement verifies, so
        nothing is attributed to a contributor who did not sign it."""
        r = base.version
        try:  # an oversized object is refused unread
            body = self.store.get(c.key, max_bytes=protocol.contribution_limit(self.plan))
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
            return f"malformed: {one_line(e)}"
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
        try:  # the shard manifest only: a misshapen one is named as such
            manifest = protocol.ContribManifest.from_bytes(data, self.plan)
        except PayloadError as e:
            return f"malformed payload: {one_line(e)}"
        if len(manifest.present()) != self.plan.num_shards:  # contributor runs: whole Δs
            return (
                f"malformed payload: it carries {len(manifest.present())} of the "
                f"{self.plan.num_shards} shards"
            )
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
            return f"malformed: {one_line(e)}"
        signature = tag["signature"]
        if not (isinstance(signature, str) and _SIGNATURE.fullmatch(signature)):
            return "bad signature: not 128 lowercase hex characters"
        c.statement, c.signature = statement, signature
        if not identity.verify_statement(public, fields, signature):
            return f"bad signature (registered key id {identity.key_id(public)})"
        c.key_id = identity.key_id(public)  # from here on, the contributor signed this
        if self.admissions is not None and self.admissions.at(r).get(c.island) != public:
            return (
                f"not on the run's allowlist: {c.island}'s key id {c.key_id} is not admitted "
                "(python -m near_jax.contrib admit)"
            )
        if tag["base_sha256"] != base.params_sha256:
            return (
                f"wrong base: trained from {tag['base_sha256'][:12]}, round {r} starts "
                f"from {base.params_sha256[:12]}"
            )
        seen = self.payload_seen(c.payload_sha256)
        if seen is not None:
            return f"replayed: payload already seen from {seen[1]!r} in round {seen[0]}"
        try:
            blob = base64.b64decode(tag.get("attestation", ""), validate=True)
        except (binascii.Error, TypeError, ValueError):
            return "malformed: attestation is not base64"
        if fields["code_sha256"] in self.revoked:
            return f"attestation: code hash {fields['code_sha256'][:12]} was revoked in this run"
        claim = attest.Claim(**fields)
        refused = attest.check(self.verifier, claim, blob)
        if refused:
            return f"attestation: {one_line(refused)}"
        c.manifest = manifest
        # Every shard read, checked and dropped (one at a time), so a bad one is rejected
        # now with its reason; `decide` reads them again, checked against the same hashes.
        try:
            for s in range(self.plan.num_shards):
                protocol.read_delta_shard(self.store, self.run, r, self.plan, c, s)
        except protocol.ShardDefect as e:
            return e.reason
        return ""

    def public_key(self, name: str) -> str | None:
        """The registered public key of a contributor this checker has verified, else None."""
        return self._keys.get(name)

    def _public_key(self, name: str) -> tuple[str | None, str]:
        """(registered public key or None, why not); cached once found (entries never
        change: first come, first served)."""
        if name not in self._keys:
            try:
                public = registry.lookup(self.store, self.run, name)
            except StoreError:
                raise
            except Exception as e:  # noqa: BLE001 - a tampered entry yields no key
                return None, f" (its registry entry is invalid: {one_line(e, 120)})"
            if public is None:
                return None, ""  # not cached: it may register later
            self._keys[name] = public
        return self._keys[name], ""
