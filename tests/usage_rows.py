"""Usage ledger rows for the usage tests: deterministic fields, filled files, raw SQL edits."""

import hashlib
import sqlite3

from near_jax.serve import usage
from near_jax.serve.usage import FIELDS, UsageLedger

SHA_A, SHA_B = "a" * 64, "b" * 64


def fields(i: int, **over) -> dict:
    """Request i's usage: distinct, deterministic values in every field."""
    out = {
        "request_id": f"req-{i:06d}",
        "key_name": "alice" if i % 3 else "bob",
        "key_sha256": SHA_A if i % 3 else SHA_B,
        "model": f"model-{i % 2}",
        "prompt_tokens": 10 + i,
        "completion_tokens": 2 * i,
        "cost": 7 * i + 1,
        "finish": usage.FINISHES[i % 4],
        "created": 1000.0 + i / 4,
    }
    out.update(over)
    return out


def filled(tmp_path, n: int = 6) -> str:
    path = str(tmp_path / "usage.sqlite")
    with UsageLedger(path) as led:
        for i in range(1, n + 1):
            assert led.record(**fields(i)) is True
    return path


def digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def sql(path: str, *statements: str) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        for s in statements:
            conn.execute(s)
    finally:
        conn.close()


def rows(path: str) -> list[tuple]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute(
            f"SELECT seq, {', '.join(FIELDS)}, prev_hash, entry_hash FROM usage ORDER BY seq"
        ).fetchall()
    finally:
        conn.close()
