"""The contribution ledger: an append-only, hash-chained record of every contribution.

Each round the aggregator closes, it records every contribution it looked at — accepted or
rejected, applied or not — with its score, the reason for a rejection and the reward it
earned. The ledger is one SQLite file, mirrored into the run's object store as per-round
segments and a signed index (`RUN/ledger/`, `ledger_mirror`); `ledger_verify.verify_chain`
checks a file's chain.

Schema
------
    meta(key TEXT PRIMARY KEY, value TEXT)      format = "2", run = the run's name
    entries(seq INTEGER PRIMARY KEY,            1, 2, 3, ... in append order
            round, contributor, key_id, payload_sha256, statement, signature,
            score REAL NULL, accepted INTEGER, applied INTEGER, reason, reward REAL,
            detail, prev_hash TEXT, entry_hash TEXT)
    indexes on round, contributor, payload_sha256

An entry's fields (`ENTRY_FIELDS`): round (int ≥ 0); contributor (non-empty str); key_id,
payload_sha256 ("" when unknown); statement (the canonical JSON text — `rounds.dumps` — of
the signed statement, "" if none) and signature ("" if none); score (finite float or None);
accepted and applied (bool; applied implies accepted); reason ("" when accepted and applied);
reward (finite float ≥ 0); detail ("" or the canonical JSON text of an object: how the entry
was judged — validated or not, the assigned-data check, the rating after the round, the
reward weight; "" when left out, as in runs recorded before format 2).

Hash chain
----------
    entry_hash = sha256(rounds.dumps({"seq": seq, "prev_hash": prev_hash, **fields}))

with accepted/applied as JSON booleans and score as null or a float; prev_hash is the
previous entry's entry_hash, and the first entry's is the genesis hash
sha256(b"near_jax/ledger/v1\\n" + run). SQLite REAL is an 8-byte IEEE double, so floats
read back bit-identical (-0.0 is stored as 0.0, since SQLite may store integral reals as
integers; NaN and ±Inf are refused: JSON cannot hash them and SQLite turns NaN into NULL).

Crash safety
------------
The file uses SQLite's default rollback journal (not WAL: the ledger stays one
file) with synchronous=FULL, and `append_round` writes a whole round in one transaction
(BEGIN IMMEDIATE … COMMIT). A kill -9 at any moment therefore leaves either all or none of a
round's entries; an interrupted transaction leaves a hot `-journal` file that the next
read-write open rolls back. Appending is idempotent per round (a restarted aggregator
re-appending a round it had recorded gets False), and rounds only move forward. The store
copy is append-only: a round's segment, then the signed index that reaches it
(`ledger_mirror`), so readers of the store see the old or the new ledger, never a mix.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
from typing import Any

from near_jax._io import one_line, open_record_db
from near_jax.diloco.protocol import check_name, dumps, sha256

FORMAT = 2  # 2: the detail field (a format-1 file is rebuilt from the decisions)
ENTRY_FIELDS = (
    "round",
    "contributor",
    "key_id",
    "payload_sha256",
    "statement",
    "signature",
    "score",
    "accepted",
    "applied",
    "reason",
    "reward",
    "detail",
)
_STR_FIELDS = (
    "contributor",
    "key_id",
    "payload_sha256",
    "statement",
    "signature",
    "reason",
    "detail",
)
_OPTIONAL = {"detail": ""}  # fields a decision written before them lacks
_COLUMNS = ", ".join(ENTRY_FIELDS)

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE entries (
    seq INTEGER PRIMARY KEY,
    round INTEGER NOT NULL,
    contributor TEXT NOT NULL,
    key_id TEXT NOT NULL,
    payload_sha256 TEXT NOT NULL,
    statement TEXT NOT NULL,
    signature TEXT NOT NULL,
    score REAL NULL,
    accepted INTEGER NOT NULL,
    applied INTEGER NOT NULL,
    reason TEXT NOT NULL,
    reward REAL NOT NULL,
    detail TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    entry_hash TEXT NOT NULL
);
CREATE INDEX entries_round ON entries (round);
CREATE INDEX entries_contributor ON entries (contributor);
CREATE INDEX entries_payload ON entries (payload_sha256);
"""


class LedgerError(Exception):
    """The ledger cannot be opened, appended to, or copied as asked; one line."""


def genesis_hash(run: str) -> str:
    """The prev_hash of a run's first entry."""
    return sha256(b"near_jax/ledger/v1\n" + run.encode())


def entry_hash(seq: int, prev_hash: str, fields: dict[str, Any]) -> str:
    """The hash of an entry: its seq, its prev_hash and its normalized fields."""
    return sha256(dumps({"seq": seq, "prev_hash": prev_hash, **fields}))


# --------------------------------------------------------------------------- validation


def _number(name: str, value: Any, *, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    # bool is an int subclass; True as a score is a bug, not a number
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a float{' or None' if optional else ''}: {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite: {value!r}")
    return value + 0.0  # -0.0 → 0.0: SQLite may store it as the integer 0


def normalize_entry(entry: dict[str, Any], rnd: int) -> dict[str, Any]:
    """The entry's fields, checked and normalized for round `rnd`; ValueError if malformed.

    "round" may be left out (it is `rnd`), and "detail" (""); ints are accepted for score and
    reward."""
    if not isinstance(entry, dict):
        raise ValueError(f"an entry must be a dict, got {type(entry).__name__}")
    unknown = sorted(set(entry) - set(ENTRY_FIELDS))
    entry = {**_OPTIONAL, **entry}
    missing = [f for f in ENTRY_FIELDS if f not in entry and f != "round"]
    if unknown or missing:
        raise ValueError(f"entry fields: unknown {unknown}, missing {missing}")
    if entry.get("round", rnd) != rnd or isinstance(entry.get("round", rnd), bool):
        raise ValueError(f"entry round {entry['round']!r} in a call for round {rnd}")
    out: dict[str, Any] = {"round": rnd}
    for name in _STR_FIELDS:
        if not isinstance(entry[name], str):
            raise ValueError(f"{name} must be a str: {entry[name]!r}")
        out[name] = entry[name]
    if not out["contributor"]:
        raise ValueError("contributor must not be empty")
    if out["statement"]:
        try:
            canonical = dumps(json.loads(out["statement"])).decode()
        except ValueError as e:
            raise ValueError(f"statement is not JSON: {e}") from None
        if canonical != out["statement"]:
            raise ValueError("statement is not canonical JSON (rounds.dumps)")
    if out["detail"]:
        try:
            detail = json.loads(out["detail"])
        except ValueError as e:
            raise ValueError(f"detail is not JSON: {e}") from None
        if not isinstance(detail, dict) or dumps(detail).decode() != out["detail"]:
            raise ValueError("detail is not the canonical JSON text of an object")
    for name in ("accepted", "applied"):
        if not isinstance(entry[name], bool):
            raise ValueError(f"{name} must be a bool: {entry[name]!r}")
        out[name] = entry[name]
    if out["applied"] and not out["accepted"]:
        raise ValueError("an entry cannot be applied without being accepted")
    out["score"] = _number("score", entry["score"], optional=True)
    out["reward"] = _number("reward", entry["reward"])
    if out["reward"] < 0:
        raise ValueError(f"reward must be >= 0: {out['reward']!r}")
    return {f: out[f] for f in ENTRY_FIELDS}


def row_fields(row: tuple) -> dict[str, Any]:
    """Fields of a stored row (columns in ENTRY_FIELDS order); ValueError naming the first
    mistyped or out-of-range value."""
    fields = dict(zip(ENTRY_FIELDS, row, strict=True))
    if not isinstance(fields["round"], int) or fields["round"] < 0:
        raise ValueError(f"round is {fields['round']!r}, not an int >= 0")
    for name in _STR_FIELDS:
        if not isinstance(fields[name], str):
            raise ValueError(f"{name} is {fields[name]!r}, not text")
    for name in ("accepted", "applied"):
        if fields[name] not in (0, 1) or not isinstance(fields[name], int):
            raise ValueError(f"{name} is {fields[name]!r}, not 0 or 1")
        fields[name] = bool(fields[name])
    for name in ("score", "reward"):
        value = fields[name]
        if value is None and name == "score":
            continue
        if not isinstance(value, float):
            raise ValueError(f"{name} is {value!r}, not a float")
        if not math.isfinite(value):
            raise ValueError(f"{name} is {value!r}, not finite")
    if fields["reward"] < 0:
        raise ValueError(f"reward is {fields['reward']!r}, negative")
    return fields


# ------------------------------------------------------------------------------- ledger


class Ledger:
    """One run's ledger file; open with `Ledger.open`. Safe to share between threads."""

    def __init__(self, conn: sqlite3.Connection, path: str, run: str):
        self._conn = conn
        self._lock = threading.Lock()
        self.path = path
        self.run = run

    @classmethod
    def open(cls, path: str, run: str) -> Ledger:
        """Opens (creating it if absent) the ledger at `path` for `run`; LedgerError if the
        file is not a ledger, has another format, or belongs to another run."""
        check_name("run", run)
        meta = {"format": str(FORMAT), "run": run}
        conn = open_record_db(path, _SCHEMA, meta, "ledger", LedgerError)
        return cls(conn, path, run)

    def append_round(self, round: int, entries: list[dict[str, Any]]) -> bool:
        """Appends `entries` (in order) as round `round` in one transaction. False, writing
        nothing, if the round is already recorded; LedgerError if `round` is not after the
        last recorded round; ValueError, writing nothing, if an entry is malformed. An
        empty list records nothing (True)."""
        if isinstance(round, bool) or not isinstance(round, int) or round < 0:
            raise ValueError(f"round must be an int >= 0: {round!r}")
        rows = [normalize_entry(e, round) for e in entries]  # all checked before any write
        with self._lock:
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as e:
                raise LedgerError(f"cannot append to {self.path}: {one_line(e)}") from None
            try:
                if conn.execute(
                    "SELECT 1 FROM entries WHERE round = ? LIMIT 1", (round,)
                ).fetchone():
                    conn.execute("ROLLBACK")
                    return False
                last = conn.execute(
                    "SELECT seq, round, entry_hash FROM entries ORDER BY seq DESC LIMIT 1"
                ).fetchone()
                seq, prev = (last[0], last[2]) if last else (0, genesis_hash(self.run))
                if last and round <= last[1]:
                    raise LedgerError(
                        f"round {round} is not after the ledger's last round {last[1]}"
                    )
                for fields in rows:
                    seq += 1
                    h = entry_hash(seq, prev, fields)
                    conn.execute(
                        f"INSERT INTO entries (seq, {_COLUMNS}, prev_hash, entry_hash) "
                        f"VALUES ({', '.join('?' * (len(ENTRY_FIELDS) + 3))})",
                        (seq, *(_sql(fields[f]) for f in ENTRY_FIELDS), prev, h),
                    )
                    prev = h
                conn.execute("COMMIT")
            except BaseException as e:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # the failed COMMIT may already have ended the transaction
                if isinstance(e, sqlite3.Error):
                    raise LedgerError(f"cannot append to {self.path}: {one_line(e)}") from None
                raise
        return True

    def last_round(self) -> int | None:
        """The last recorded round, None if the ledger is empty."""
        row = self._one("SELECT round FROM entries ORDER BY seq DESC LIMIT 1")
        return row[0] if row else None

    def head(self) -> str:
        """The last entry's hash (the genesis hash of an empty ledger): anchors the chain."""
        row = self._one("SELECT entry_hash FROM entries ORDER BY seq DESC LIMIT 1")
        return row[0] if row else genesis_hash(self.run)

    def count(self) -> int:
        """The number of entries."""
        return self._one("SELECT count(*) FROM entries")[0]

    def entries(
        self, first_round: int | None = None, last_round: int | None = None
    ) -> list[dict[str, Any]]:
        """Entries of rounds first_round..last_round (inclusive; None = unbounded) in seq
        order: the fields plus seq, prev_hash and entry_hash, accepted/applied as bools."""
        lo = -1 if first_round is None else first_round
        hi = (1 << 62) if last_round is None else last_round
        with self._lock:
            rows = self._conn.execute(
                f"SELECT seq, {_COLUMNS}, prev_hash, entry_hash FROM entries "
                "WHERE round >= ? AND round <= ? ORDER BY seq",
                (lo, hi),
            ).fetchall()
        out = []
        for row in rows:
            entry = {"seq": row[0], **dict(zip(ENTRY_FIELDS, row[1:-2], strict=True))}
            entry["accepted"], entry["applied"] = bool(entry["accepted"]), bool(entry["applied"])
            entry["prev_hash"], entry["entry_hash"] = row[-2], row[-1]
            out.append(entry)
        return out

    def payload_seen(self, payload_sha256: str) -> tuple[int, str] | None:
        """(round, contributor) of the earliest entry with this payload hash (a replay
        check); None if never seen. "" (unknown) never matches."""
        if not payload_sha256:
            return None
        row = self._one(
            "SELECT round, contributor FROM entries WHERE payload_sha256 = ? ORDER BY seq LIMIT 1",
            (payload_sha256,),
        )
        return (row[0], row[1]) if row else None

    def close(self) -> None:
        """Closes the file (every round is already committed)."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _one(self, sql: str, args: tuple = ()) -> tuple | None:
        with self._lock:
            return self._conn.execute(sql, args).fetchone()


def _sql(value: Any) -> Any:
    return int(value) if isinstance(value, bool) else value
