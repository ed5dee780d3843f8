"""What the aggregator's key signs in a contributor run: round seeds and decisions.

Seeds: the seed of round r is derived from the aggregator's ed25519 signature over
(run, r) — deterministic, so a restart recomputes it — and sha256 of that signature is
published one round ahead (round 0's in the run's manifest, round r + 1's in decision r),
so the aggregator cannot pick a seed after seeing the contributions, and anyone can check
the reveal against the commitment and the aggregator's public key.

Decisions: the aggregator signs each decision (everything but its "signature" field), so
its entries — the ledger's rows of that round — are the aggregator's word, and the ledger
is a pure function of the decisions. (The list of code hashes allowed after the run was
created is signed too: see `policy`.)
"""

from __future__ import annotations

import hashlib

from near_jax.contrib import identity
from near_jax.diloco import protocol

_SEED_DOMAIN = b"near_jax/seed/v1\n"
_DECISION_DOMAIN = b"near_jax/decision/v1\n"


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


def decision_bytes(decision: dict) -> bytes:
    """What the aggregator signs of a decision: everything but its "signature"."""
    body = {k: v for k, v in decision.items() if k != "signature"}
    return _DECISION_DOMAIN + protocol.dumps(body)


def check_decision(public_hex: str, decision: dict) -> bool:
    """Whether `decision` carries the aggregator's valid signature over its contents."""
    return identity.verify(public_hex, decision_bytes(decision), decision.get("signature", ""))
