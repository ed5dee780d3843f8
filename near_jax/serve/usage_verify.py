"""Reading a usage ledger file back: checking it, and the totals the server bills from.

`verify(path)` lists the problems of a usage ledger file (see `usage` for its schema, hash
chain and writer, `UsageLedger`), one line each; `period_totals(path, start, end)` sums the
rows created in a period after verifying the whole file. Neither ever modifies the file.

What `verify` detects
---------------------
Edited rows (contents no longer match their hash), deleted rows (a gap in seq, and the next
row's prev_hash no longer matches), inserted and reordered rows (prev_hash breaks), an edited
row whose entry_hash was recomputed (the next row's prev_hash breaks), a request_id recorded
twice, values `usage.field_problem` refuses, a wrong format, missing tables, and damage
SQLite's integrity_check finds. A truncated tail leaves a valid shorter chain: only an
external anchor catches it, so the caller passes the `head` it recorded elsewhere.

Crash safety
------------
A hot `-journal` file left by a writer killed mid-transaction is not a problem: a read-only
connection cannot roll it back, so the file is read through a private copy rolled back with
its journal, i.e. as the next read-write open (`UsageLedger`) will see it.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import sqlite3
import tempfile
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from near_jax._io import one_line, short_repr
from near_jax.serve.usage import FIELDS, FORMAT, UsageError, entry_hash, field_problem, genesis_hash

_COLUMNS = ", ".join(FIELDS)
_MAX_PROBLEMS = 100  # a wholly rewritten ledger would otherwise give one line per row
T = TypeVar("T")


def verify(path: str | os.PathLike[str], *, head: str | None = None) -> list[str]:
    """Problems with the usage ledger at `path`, one line each; [] if intact. Never modifies
    the file and never raises on a damaged one. A truncated tail leaves a valid shorter
    chain: pass the `head` (entry_hash of the last row) recorded elsewhere to catch it.

    A hot journal left by a killed writer is not a problem: the ledger is checked as the
    next read-write open will see it, by rolling back a private copy."""
    try:
        problems = _read(os.fspath(path), lambda conn: _verify(conn, head))
    except UsageError as e:
        return [str(e)]
    except Exception as e:  # noqa: BLE001 - a damaged file must give a problem, not a crash
        return [f"cannot verify {os.fspath(path)}: {one_line(e, typed=True)}"]
    if len(problems) > _MAX_PROBLEMS:
        more = len(problems) - _MAX_PROBLEMS
        problems = problems[:_MAX_PROBLEMS] + [f"... and {more} more problems"]
    return problems


def period_totals(path: str | os.PathLike[str], start: float, end: float) -> dict[str, Any]:
    """Totals of the rows created in [start, end): requests, prompt_tokens,
    completion_tokens, revenue (sum of cost, micro-units), first_seq and last_seq (the
    smallest and largest seq among them) and head_hash (the entry_hash of the row at
    last_seq); the seqs and head_hash are None when there are none. The whole file is
    verified in the same snapshot first: UsageError (one line) if it has problems."""
    for name, value in (("start", start), ("end", end)):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{name} must be a number: {short_repr(value)}")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite: {value!r}")
    if end < start:
        raise ValueError(f"end {end!r} is before start {start!r}")

    def totals(conn: sqlite3.Connection) -> dict[str, Any]:
        problems = _verify(conn, None)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise UsageError(f"usage ledger {os.fspath(path)}: {problems[0]}{more}")
        row = conn.execute(
            "SELECT count(*), SUM(prompt_tokens), SUM(completion_tokens), SUM(cost), "
            "MIN(seq), MAX(seq) FROM usage WHERE created >= ? AND created < ?",
            (float(start), float(end)),
        ).fetchone()
        last = row[5]
        head_row = conn.execute("SELECT entry_hash FROM usage WHERE seq = ?", (last,)).fetchone()
        return {
            "requests": row[0],
            "prompt_tokens": row[1] or 0,
            "completion_tokens": row[2] or 0,
            "revenue": row[3] or 0,
            "first_seq": row[4],
            "last_seq": last,
            "head_hash": head_row[0] if head_row else None,
        }

    return _read(os.fspath(path), totals)


def _read(path: str, fn: Callable[[sqlite3.Connection], T]) -> T:
    """fn(a read-only connection to the file as a read-write open would leave it), in one
    snapshot; UsageError (one line) if the file cannot be read as a SQLite database."""
    if not os.path.isfile(path):
        raise UsageError(f"no usage ledger file at {path}")
    try:
        for _ in range(3):
            uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro"
            try:
                with _snapshot(sqlite3.connect(uri, uri=True, isolation_level=None)) as conn:
                    return fn(conn)
            except sqlite3.OperationalError as e:
                # a read-only connection cannot roll back a hot journal (SQLITE_READONLY)
                if "readonly" not in str(e) or not os.path.exists(path + "-journal"):
                    raise
            done, value = _read_rolled_back_copy(path, fn)
            if done:
                return value
        raise UsageError(f"cannot read {path}: its journal keeps changing")
    except sqlite3.DatabaseError as e:
        if "not a database" in str(e) or "file is encrypted" in str(e):
            raise UsageError(f"not a SQLite database: {path} ({one_line(e)})") from None
        raise UsageError(f"cannot read {path}: {one_line(e)}") from None


def _read_rolled_back_copy(path: str, fn: Callable[[sqlite3.Connection], T]) -> tuple[bool, Any]:
    """(True, fn(copy)) on a private copy of the file rolled back with its hot journal;
    (False, None) if the journal changed meanwhile (someone rolled it back: read again)."""
    journal = path + "-journal"
    with tempfile.TemporaryDirectory(prefix="usage-verify-") as tmp:
        copy = os.path.join(tmp, "usage.sqlite")
        try:
            # journal first: a rollback that starts later only makes the file more like the
            # journal's pages, and replaying the journal again onto that is harmless
            shutil.copyfile(journal, copy + "-journal")
            shutil.copyfile(path, copy)
            with open(journal, "rb") as f, open(copy + "-journal", "rb") as g:
                if f.read() != g.read():
                    return False, None
        except FileNotFoundError:
            return False, None
        with _snapshot(sqlite3.connect(copy, isolation_level=None)) as conn:
            return True, fn(conn)


@contextlib.contextmanager
def _snapshot(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    # damaged text must surface as a hash mismatch, not a UnicodeDecodeError; surrogateescape
    # keeps distinct bytes distinct, so no edit can hide behind a decoding
    conn.text_factory = lambda b: b.decode("utf-8", "surrogateescape")
    try:
        conn.execute("BEGIN")  # one snapshot for every query fn makes
        try:
            yield conn
        finally:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")  # read-only: nothing to commit, just drop the lock
    finally:
        conn.close()


def _verify(conn: sqlite3.Connection, head: str | None) -> list[str]:
    problems: list[str] = []
    integrity = [r[0] for r in conn.execute("PRAGMA integrity_check(20)")]
    if integrity != ["ok"]:
        problems += [f"integrity_check: {one_line(str(line))}" for line in integrity]
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    missing = [t for t in ("meta", "usage") if t not in tables]
    if missing:
        return problems + [f"the {t} table is missing" for t in missing]
    meta = {str(k): v for k, v in conn.execute("SELECT key, value FROM meta")}
    if meta.get("format") != str(FORMAT):
        problems.append(f"meta format is {meta.get('format')!r}, expected '{FORMAT}'")
    expected_seq, prev_seq, prev_hash = 1, None, genesis_hash()
    seen: dict[Any, int] = {}
    cursor = conn.execute(f"SELECT seq, {_COLUMNS}, prev_hash, entry_hash FROM usage ORDER BY seq")
    for row in cursor:
        seq, stored_prev, stored_hash = row[0], row[-2], row[-1]
        if seq != expected_seq:
            if seq > expected_seq and prev_seq is None:
                problems.append(f"rows 1..{seq - 1} are missing (seq starts at {seq})")
            elif seq > expected_seq:
                problems.append(
                    f"rows {expected_seq}..{seq - 1} are missing (seq jumps {prev_seq} → {seq})"
                    if seq > expected_seq + 1
                    else f"row {expected_seq} is missing (seq jumps {prev_seq} → {seq})"
                )
            else:
                problems.append(f"row {seq}: seq out of range (expected {expected_seq})")
        if stored_prev != prev_hash:
            after = "the genesis hash" if prev_seq is None else f"row {prev_seq}"
            problems.append(
                f"row {seq}: prev_hash does not match {after} (deleted, inserted or reordered rows)"
            )
        fields = dict(zip(FIELDS, row[1:-2], strict=True))
        bad = [(f, field_problem(f, fields[f])) for f in FIELDS]
        bad = [f"{f} {short_repr(fields[f], 40)} is {p}" for f, p in bad if p]
        if bad:
            problems.append(f"row {seq}: {'; '.join(bad)}")
        elif (
            not isinstance(stored_prev, str) or entry_hash(seq, stored_prev, fields) != stored_hash
        ):
            problems.append(f"row {seq}: contents do not match its hash (edited)")
        rid = fields["request_id"]
        if rid in seen:
            problems.append(
                f"row {seq}: request_id {short_repr(rid, 40)} is also row {seen[rid]}'s"
            )
        else:
            seen[rid] = seq
        if isinstance(seq, int):
            expected_seq = max(seq, expected_seq - 1) + 1
        prev_seq, prev_hash = seq, stored_hash
    if head is not None and prev_hash != head:
        problems.append(
            f"the head is {str(prev_hash)[:16]}…, expected {head[:16]}… "
            "(truncated or rewritten tail)"
        )
    return problems
