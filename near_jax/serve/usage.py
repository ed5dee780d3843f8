"""The usage ledger: an append-only, hash-chained record of every request the server billed.

Each finished request is one row: who made it (key name and the SHA-256 of its secret), the
model, its prompt and completion token counts, its cost (integer micro-units, see
`keys.request_cost`), how it finished, and when it was created. This module holds the
writer: the schema, the hashing, the field checks and `UsageLedger`, which records rows and
enforces spend limits across restarts (`UsageLedger.spent`). Reading a file back lives in
`usage_verify`: `usage_verify.verify` checks a file and `usage_verify.period_totals` gives
the totals the server bills from.

Schema
------
    meta(key TEXT PRIMARY KEY, value TEXT)      format = "1"
    usage(seq INTEGER PRIMARY KEY,              1, 2, 3, ... in append order
          request_id TEXT UNIQUE, key_name, key_sha256, model, prompt_tokens INTEGER,
          completion_tokens INTEGER, cost INTEGER, finish, created REAL,
          prev_hash TEXT, entry_hash TEXT)
    indexes on key_sha256 and created

Fields (`FIELDS`): request_id (1-200 printable characters, unique); key_name (a key name,
`keys.check_key_name`, or "anonymous"); key_sha256 (64 lowercase hex); model (1-200
printable characters); prompt_tokens, completion_tokens (int 0..MAX_TOKENS); cost (int
0..MAX_COST); finish (one of FINISHES); created (finite float >= 0, Unix seconds).

Hash chain
----------
    entry_hash = sha256(canonical JSON of {"seq": seq, "prev_hash": prev_hash, **fields})

(canonical: sorted keys, no spaces, no NaN), prev_hash being the previous row's entry_hash
and the first row's the genesis hash sha256(b"near_jax/usage/v1\\n"). created is a REAL, an
IEEE double, so it reads back bit-identical; an int created is stored as its float.

Crash safety
------------
The file uses SQLite's default rollback journal (not WAL: the ledger stays one file) with
synchronous=FULL, and each record is one transaction (BEGIN IMMEDIATE ... COMMIT), or with
`submit` each group of records that arrived while the previous group was committing, so a
kill -9 at any moment leaves a row whole or absent, never half-written. A kill inside the
transaction may leave a hot `-journal` file; the next read-write open (`UsageLedger`)
rolls it back, and the readers in `usage_verify`, which never modify the file, read a
private copy rolled back with it. Recording is idempotent by request_id: a restarted server
re-recording a request gets False.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import math
import os
import re
import sqlite3
import threading
from typing import Any

from near_jax._io import one_line, open_record_db, short_repr
from near_jax.serve.keys import ANONYMOUS, check_key_name

FORMAT = 1
FIELDS = (
    "request_id",
    "key_name",
    "key_sha256",
    "model",
    "prompt_tokens",
    "completion_tokens",
    "cost",
    "finish",
    "created",
)
FINISHES = ("stop", "length", "cancelled", "error")  # the engine's finish reasons
MAX_TOKENS = 1 << 40
MAX_COST = 10**15  # micro-units in one request; sums of them stay far inside int64
MAX_TEXT = 200  # characters of request_id and model
GENESIS_DOMAIN = b"near_jax/usage/v1\n"
_COLUMNS = ", ".join(FIELDS)
_HEX64 = re.compile(r"[0-9a-f]{64}")

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE usage (
    seq INTEGER PRIMARY KEY,
    request_id TEXT NOT NULL UNIQUE,
    key_name TEXT NOT NULL,
    key_sha256 TEXT NOT NULL,
    model TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cost INTEGER NOT NULL,
    finish TEXT NOT NULL,
    created REAL NOT NULL,
    prev_hash TEXT NOT NULL,
    entry_hash TEXT NOT NULL
);
CREATE INDEX usage_key ON usage (key_sha256);
CREATE INDEX usage_created ON usage (created);
"""


class UsageError(Exception):
    """The usage ledger cannot be opened, recorded to or read as asked; one line."""


def genesis_hash() -> str:
    """The prev_hash of a ledger's first row."""
    return hashlib.sha256(GENESIS_DOMAIN).hexdigest()


def entry_hash(seq: int, prev_hash: str, fields: dict[str, Any]) -> str:
    """The hash of a row: its seq, its prev_hash and its fields."""
    body = {"seq": seq, "prev_hash": prev_hash, **fields}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


# --------------------------------------------------------------------------- validation


def _text_problem(value: Any) -> str | None:
    if not isinstance(value, str):
        return "not text"
    if not 1 <= len(value) <= MAX_TEXT or not value.isprintable():
        return f"not 1-{MAX_TEXT} printable characters"
    return None


def field_problem(name: str, value: Any) -> str | None:
    """What is wrong with `value` as field `name` (None if allowed): the one check shared by
    `record` and `usage_verify.verify`."""
    if name in ("request_id", "model"):
        return _text_problem(value)
    if name == "key_name":
        if value == ANONYMOUS:
            return None
        try:
            check_key_name(value)
        except ValueError:
            return "not a key name (1-64 of [A-Za-z0-9._-], alphanumeric first)"
        return None
    if name == "key_sha256":
        ok = isinstance(value, str) and _HEX64.fullmatch(value)
        return None if ok else "not 64 lowercase hex digits"
    if name in ("prompt_tokens", "completion_tokens", "cost"):
        top = MAX_COST if name == "cost" else MAX_TOKENS
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
            return f"not an int in 0..{top}"
        return None
    if name == "finish":
        return None if value in FINISHES and isinstance(value, str) else f"not one of {FINISHES}"
    if name == "created":
        if not isinstance(value, float) or not math.isfinite(value) or value < 0:
            return "not a finite float >= 0"
        return None
    raise AssertionError(name)


def normalize(fields: dict[str, Any]) -> dict[str, Any]:
    """`fields` checked (ValueError naming the first bad field) with created as a float."""
    created = fields["created"]
    if isinstance(created, int) and not isinstance(created, bool) and abs(created) < 2**1023:
        fields = {**fields, "created": float(created)}  # the REAL column reads back a float
    for name in FIELDS:
        problem = field_problem(name, fields[name])
        if problem:
            raise ValueError(f"{name} {short_repr(fields[name])}: {problem}")
    return {**fields, "created": fields["created"] + 0.0}  # -0.0 → 0.0, as it reads back


# ------------------------------------------------------------------------------- ledger


class UsageLedger:
    """The usage ledger at `path`, created if absent; UsageError if the file is not a usage
    ledger. Opening it rolls back a transaction a killed writer left. Safe to share between
    threads; close() when done."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        self._lock = threading.Lock()
        self._spent: dict[str, int] = {}  # key_sha256 → total cost, valid at _version
        self._version: int | None = None
        meta = {"format": str(FORMAT)}
        conn = open_record_db(self.path, _SCHEMA, meta, "usage ledger", UsageError)
        self._conn = conn
        # submit()'s queue and writer thread (started by the first submit)
        self._pending_lock = threading.Lock()
        self._wake = threading.Condition(self._pending_lock)
        self._pending: list[tuple[dict[str, Any], concurrent.futures.Future[bool]]] = []
        self._writer: threading.Thread | None = None
        self._closed = False

    def record(
        self,
        request_id: str,
        key_name: str,
        key_sha256: str,
        model: str,
        prompt_tokens: int,
        completion_tokens: int,
        cost: int,
        finish: str,
        created: float,
    ) -> bool:
        """Appends one request's usage in one transaction. False, writing nothing, if this
        request_id is already recorded with exactly these fields; UsageError if it is
        recorded with others, or the file cannot be written; ValueError, writing nothing,
        for a value not allowed (see the module docstring)."""
        fields = normalize(
            dict(
                zip(
                    FIELDS,
                    (
                        request_id,
                        key_name,
                        key_sha256,
                        model,
                        prompt_tokens,
                        completion_tokens,
                        cost,
                        finish,
                        created,
                    ),
                    strict=True,
                )
            )
        )
        with self._lock:
            (outcome,) = self._append([fields])
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def submit(self, **fields: Any) -> concurrent.futures.Future[bool]:
        """`record(**fields)` on the ledger's writer thread, which commits every record
        submitted meanwhile in one transaction (a group commit: one sync for many rows, and
        the caller's thread never waits on the disk). The future resolves as record would
        return or raise, once the row is committed; ValueError at once for a bad value."""
        fields = normalize({name: fields[name] for name in FIELDS})
        future: concurrent.futures.Future[bool] = concurrent.futures.Future()
        with self._pending_lock:
            if self._closed:
                raise UsageError(f"the usage ledger {self.path} is closed")
            self._pending.append((fields, future))
            if self._writer is None:
                self._writer = threading.Thread(
                    target=self._write_pending, name="near_jax-usage", daemon=True
                )
                self._writer.start()
            self._wake.notify()
        return future

    def _write_pending(self) -> None:
        while True:
            with self._pending_lock:
                while not self._pending and not self._closed:
                    self._wake.wait()
                if not self._pending:
                    return  # closed and drained
                batch, self._pending = self._pending, []
            with self._lock:
                try:
                    outcomes = self._append([fields for fields, _ in batch])
                except BaseException as e:  # every waiter learns of it, and the thread lives on
                    outcomes = [e] * len(batch)
            for (_, future), outcome in zip(batch, outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)

    def _append(self, rows: list[dict[str, Any]]) -> list[bool | UsageError]:
        """Appends normalized rows in one transaction (the caller holds _lock): per row True
        (written), False (already recorded alike) or the UsageError of a conflicting one.
        Raises UsageError, writing nothing, if the file cannot be written."""
        conn, outcomes = self._conn, []
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            raise UsageError(f"cannot record to {self.path}: {one_line(e)}") from None
        try:
            last = conn.execute(
                "SELECT seq, entry_hash FROM usage ORDER BY seq DESC LIMIT 1"
            ).fetchone()
            seq, prev = last if last else (0, genesis_hash())
            written = []
            for fields in rows:
                request_id = fields["request_id"]
                old = conn.execute(
                    f"SELECT {_COLUMNS} FROM usage WHERE request_id = ?", (request_id,)
                ).fetchone()
                if old is not None:
                    differ = [f for f, v in zip(FIELDS, old, strict=True) if v != fields[f]]
                    outcomes.append(
                        UsageError(
                            f"request {short_repr(request_id)} is already recorded with other "
                            f"{', '.join(differ)}"
                        )
                        if differ
                        else False
                    )
                    continue
                seq, digest = seq + 1, entry_hash(seq + 1, prev, fields)
                conn.execute(
                    f"INSERT INTO usage (seq, {_COLUMNS}, prev_hash, entry_hash) "
                    f"VALUES ({', '.join('?' * (len(FIELDS) + 3))})",
                    (seq, *(fields[f] for f in FIELDS), prev, digest),
                )
                prev = digest
                written.append(fields)
                outcomes.append(True)
            conn.execute("COMMIT")
        except BaseException as e:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")  # a failed COMMIT may have ended it already
            if isinstance(e, sqlite3.Error):
                raise UsageError(f"cannot record to {self.path}: {one_line(e)}") from None
            raise
        for fields in written:
            self._after_write(fields["key_sha256"], fields["cost"])
        return outcomes

    def spent(self, key_sha256: str) -> int:
        """The total cost recorded for the key with this secret hash (micro-units)."""
        with self._lock:
            self._refresh()
            if key_sha256 not in self._spent:
                row = self._conn.execute(
                    "SELECT SUM(cost) FROM usage WHERE key_sha256 = ?", (key_sha256,)
                ).fetchone()
                self._spent[key_sha256] = row[0] or 0
            return self._spent[key_sha256]

    def head(self) -> str:
        """The last row's entry_hash (the genesis hash when empty): anchors the chain."""
        with self._lock:
            row = self._conn.execute(
                "SELECT entry_hash FROM usage ORDER BY seq DESC LIMIT 1"
            ).fetchone()
        return row[0] if row else genesis_hash()

    def count(self) -> int:
        """The number of rows."""
        with self._lock:
            return self._conn.execute("SELECT count(*) FROM usage").fetchone()[0]

    def close(self) -> None:
        """Commits what was submitted, then closes the file."""
        with self._pending_lock:
            self._closed = True
            self._wake.notify()
            writer = self._writer
        if writer is not None:
            writer.join()
        with self._lock:
            self._conn.close()

    def __enter__(self) -> UsageLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _refresh(self) -> None:
        # data_version changes when another connection commits: drop totals it may have moved
        version = self._conn.execute("PRAGMA data_version").fetchone()[0]
        if version != self._version:
            self._spent.clear()
            self._version = version

    def _after_write(self, key_sha256: str, cost: int) -> None:
        # our own commits leave data_version alone, so the cached totals only need our cost
        if key_sha256 in self._spent:
            self._spent[key_sha256] += cost
