"""Ledger rows for the ledger tests: two rounds of entries with awkward values, raw SQL edits."""

import hashlib
import sqlite3

from near_jax.contrib.ledger import ENTRY_FIELDS, Ledger
from near_jax.diloco.protocol import dumps

RUN = "demo"


def entry(contributor: str, **overrides) -> dict:
    base = {
        "contributor": contributor,
        "key_id": f"key-{contributor}",
        "payload_sha256": hashlib.sha256(contributor.encode()).hexdigest(),
        "statement": dumps({"island": contributor, "round": 0}).decode(),
        "signature": "c2ln",
        "score": 0.1,
        "accepted": True,
        "applied": True,
        "reason": "",
        "reward": 1.0 / 3.0,
        "detail": "",
    }
    return {**base, **overrides}


ROUND0 = [
    entry("alice", score=0.1 + 0.2, reward=1e-300, detail='{"rating":[25.5,8.1],"validated":true}'),
    entry("bob", score=None, accepted=False, applied=False, reason="non-finite delta", reward=0.0),
    entry("carol", score=-0.0, reward=5e-324, applied=False, reason="outlier"),
]
ROUND1 = [
    entry("alice", payload_sha256="f" * 64, score=1e300, reward=2.0**62),
    entry("dave", key_id="", payload_sha256="", statement="", signature="", score=-12.5),
]


def fields(e: dict) -> dict:
    return {f: e[f] for f in ENTRY_FIELDS if f in e}


def sqlite_exec(path, *statements) -> None:
    """Raw edits, as an attacker with write access to the file would make them."""
    conn = sqlite3.connect(path)
    with conn:
        for s in statements:
            if isinstance(s, tuple):
                conn.execute(*s)
            else:
                conn.execute(s)
    conn.close()


def make_ledger(path: str) -> str:
    """Writes a ledger with rounds 0 and 1 (5 entries) at `path`; the path."""
    with Ledger.open(path, RUN) as led:
        assert led.append_round(0, ROUND0) and led.append_round(1, ROUND1)
    return path


def file_digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()
