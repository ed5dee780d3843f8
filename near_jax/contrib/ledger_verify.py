"""Checking a ledger file: its hash chain, its rows, and the anchors the caller knows.

`verify_chain(path, run)` lists the problems of a ledger file (see `ledger` for its schema
and hash chain), one line each, and never modifies it.

What `verify_chain` detects
---------------------------
Edited rows (contents no longer match their hash), deleted rows (a gap in seq, and the next
row's prev_hash no longer matches), inserted and reordered rows (prev_hash breaks), an edited
row whose entry_hash was recomputed (the next row's prev_hash breaks), rounds that go
backwards, non-finite or mistyped values, a wrong meta.run or format, and damage SQLite's
integrity_check finds. A truncated tail — the last entries or rounds removed, or the last
row rewritten with a fresh hash — leaves a valid shorter chain: only an external anchor
catches it, so the caller passes what it knows (`head=`, `count=`, `last_round=`, e.g. the
head recorded in the round's decision).
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
import urllib.parse

from near_jax._io import one_line
from near_jax.contrib.ledger import ENTRY_FIELDS, FORMAT, entry_hash, genesis_hash, row_fields

_COLUMNS = ", ".join(ENTRY_FIELDS)
_MAX_PROBLEMS = 100  # a wholly rewritten ledger would otherwise give one line per row


def verify_chain(
    path: str,
    run: str | None = None,
    *,
    head: str | None = None,
    count: int | None = None,
    last_round: int | None = None,
) -> list[str]:
    """Problems with the ledger at `path`, one line each; [] if intact. Never modifies the
    file and never raises on a damaged one. `run`, `head`, `count` and `last_round` are
    optional external anchors (a truncated tail is only detectable against them).

    An interrupted transaction (a hot journal left by a killed writer) is not a problem:
    the ledger is verified as a reader would see it once the journal is rolled back, by
    rolling back a private copy."""
    if not os.path.isfile(path):
        return [f"no ledger file at {path}"]
    anchors = {"head": head, "count": count, "last_round": last_round}
    try:
        uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro"
        for _ in range(3):
            conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=60.0)
            try:
                return _verify(conn, run, anchors)
            except sqlite3.OperationalError as e:
                # a read-only connection cannot roll back a hot journal (SQLITE_READONLY)
                if "readonly" not in str(e) or not os.path.exists(path + "-journal"):
                    raise
            finally:
                conn.close()
            problems = _verify_rolled_back_copy(path, run, anchors)
            if problems is not None:
                return problems
        return [f"cannot read {path}: its journal keeps changing"]
    except sqlite3.DatabaseError as e:
        if "not a database" in str(e) or "file is encrypted" in str(e):
            return [f"not a SQLite database: {path} ({one_line(e)})"]
        return [f"cannot read {path}: {one_line(e)}"]
    except Exception as e:  # noqa: BLE001 - a damaged file must give a problem, not a crash
        return [f"cannot verify {path}: {type(e).__name__}: {one_line(e)}"]


def _verify_rolled_back_copy(path: str, run: str | None, anchors: dict) -> list[str] | None:
    """Verifies a copy of the file rolled back with its hot journal; None if the journal
    changed meanwhile (someone else rolled it back: read the file itself again)."""
    journal = path + "-journal"
    with tempfile.TemporaryDirectory(prefix="ledger-verify-") as tmp:
        copy = os.path.join(tmp, "ledger.sqlite")
        try:
            # journal first: a rollback that starts later only makes the file more like the
            # journal's pages, and replaying the journal again onto that is harmless
            shutil.copyfile(journal, copy + "-journal")
            shutil.copyfile(path, copy)
            with open(journal, "rb") as f, open(copy + "-journal", "rb") as g:
                if f.read() != g.read():
                    return None
        except FileNotFoundError:
            return None
        conn = sqlite3.connect(copy, isolation_level=None, timeout=60.0)
        try:
            return _verify(conn, run, anchors)
        finally:
            conn.close()


def _verify(conn: sqlite3.Connection, run: str | None, anchors: dict) -> list[str]:
    problems: list[str] = []
    # damaged text must surface as a hash mismatch, not a UnicodeDecodeError; surrogateescape
    # keeps distinct bytes distinct, so no edit can hide behind a decoding
    conn.text_factory = lambda b: b.decode("utf-8", "surrogateescape")
    conn.execute("BEGIN")  # one snapshot for meta, entries and the integrity check
    try:
        integrity = [r[0] for r in conn.execute("PRAGMA integrity_check(20)")]
        if integrity != ["ok"]:
            problems += [f"integrity_check: {line}" for line in integrity]
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        for table in ("meta", "entries"):
            if table not in tables:
                problems.append(f"the {table} table is missing")
        if problems and not {"meta", "entries"} <= tables:
            return problems
        meta = {str(k): v for k, v in conn.execute("SELECT key, value FROM meta")}
        if meta.get("format") != str(FORMAT):
            problems.append(f"meta format is {meta.get('format')!r}, expected '{FORMAT}'")
        meta_run = meta.get("run")
        if meta_run is None:
            problems.append("meta has no run")
        elif run is not None and meta_run != run:
            problems.append(f"meta run is {meta_run!r}, expected {run!r}")
        chain_run = run if run is not None else meta_run
        problems += _verify_entries(conn, chain_run, anchors)
    finally:
        try:
            conn.execute("ROLLBACK")  # read-only: nothing to commit, just drop the lock
        except sqlite3.Error:
            pass  # a failed read may have ended the transaction already
    if len(problems) > _MAX_PROBLEMS:
        more = len(problems) - _MAX_PROBLEMS
        problems = problems[:_MAX_PROBLEMS] + [f"... and {more} more problems"]
    return problems


def _verify_entries(conn: sqlite3.Connection, run: str | None, anchors: dict) -> list[str]:
    problems: list[str] = []
    genesis = genesis_hash(run) if isinstance(run, str) else None
    expected_seq, prev_seq, prev_hash, prev_round, n = 1, None, genesis, None, 0
    cursor = conn.execute(
        f"SELECT seq, {_COLUMNS}, prev_hash, entry_hash FROM entries ORDER BY seq"
    )
    for row in cursor:
        n += 1
        seq, stored_prev, stored_hash = row[0], row[-2], row[-1]
        if seq != expected_seq:
            if seq > expected_seq and expected_seq == 1:
                problems.append(f"entries 1..{seq - 1} are missing (seq starts at {seq})")
            elif seq == expected_seq + 1:
                problems.append(f"entry {expected_seq} is missing (seq jumps {prev_seq} → {seq})")
            elif seq > expected_seq:
                problems.append(
                    f"entries {expected_seq}..{seq - 1} are missing (seq jumps {prev_seq} → {seq})"
                )
            else:
                problems.append(f"entry {seq}: seq out of range (expected {expected_seq})")
        if prev_hash is None:
            problems.append(f"entry {seq}: cannot check prev_hash (the run is unknown)")
        elif stored_prev != prev_hash:
            if prev_seq is None:
                problems.append(
                    f"entry {seq}: prev_hash does not match the genesis hash of run {run!r} "
                    "(another run, or rows deleted at the start)"
                )
            else:
                problems.append(
                    f"entry {seq}: prev_hash does not match entry {prev_seq} "
                    "(deleted, inserted or reordered rows)"
                )
        try:
            fields = row_fields(row[1:-2])
        except ValueError as e:
            problems.append(f"entry {seq}: {e}")
            fields = None
        if fields is not None:
            if (
                not isinstance(stored_prev, str)
                or entry_hash(seq, stored_prev, fields) != stored_hash
            ):
                problems.append(f"entry {seq}: contents do not match its hash (edited)")
            if prev_round is not None and fields["round"] < prev_round:
                problems.append(
                    f"entry {seq}: round {fields['round']} after round {prev_round} "
                    "(rounds must not decrease)"
                )
            prev_round = fields["round"] if prev_round is None else max(prev_round, fields["round"])
        expected_seq, prev_seq, prev_hash = max(seq, expected_seq - 1) + 1, seq, stored_hash
    head = prev_hash if n else genesis
    if anchors["count"] is not None and n != anchors["count"]:
        problems.append(f"the ledger has {n} entries, expected {anchors['count']} (truncated?)")
    if anchors["last_round"] is not None and prev_round != anchors["last_round"]:
        problems.append(
            f"the last round is {prev_round}, expected {anchors['last_round']} (truncated?)"
        )
    if anchors["head"] is not None and head != anchors["head"]:
        problems.append(
            f"the head is {str(head)[:16]}…, expected {anchors['head'][:16]}… "
            "(truncated or rewritten tail)"
        )
    return problems
