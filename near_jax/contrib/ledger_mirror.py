"""The store's copy of a run's ledger, `RUN/ledger.sqlite`: a consistent snapshot put whole.

`upload` puts a snapshot of the local file (SQLite's backup API: never half a round) as one
whole object, so readers of the store see the old or the new ledger, never a mix;
`download` replaces a local file with the store's copy once it passes `verify_chain`.
Anyone who can write to the store can forge the copy: the aggregator never reads it back,
and auditors check it against the signed decisions.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
import urllib.parse

from near_jax._io import atomic_write, one_line
from near_jax.contrib.ledger import LedgerError
from near_jax.contrib.ledger_verify import verify_chain
from near_jax.diloco.protocol import check_name
from near_jax.diloco.store import CorruptObject, ObjectStore

_SQLITE_MAGIC = b"SQLite format 3\x00"
MAX_MIRROR_BYTES = 1 << 30  # the store's ledger copy is read bounded (anyone can write it)


def store_key(run: str) -> str:
    """The store key of a run's ledger copy."""
    return f"{check_name('run', run)}/ledger.sqlite"


def upload(store: ObjectStore, run: str, path: str) -> int:
    """Puts a consistent snapshot of the ledger at `path` into the store (one whole-object
    write replacing the previous copy); returns the bytes written. LedgerError if `path` is
    missing or is another run's ledger."""
    if not os.path.isfile(path):
        raise LedgerError(f"no ledger file at {path}")
    with tempfile.TemporaryDirectory(prefix="ledger-upload-") as tmp:
        snapshot = os.path.join(tmp, "ledger.sqlite")
        # The backup API copies under a read lock and restarts if a writer commits
        # meanwhile: never half a round. A read-write source connection rolls back a hot
        # journal first. (Reading the file directly would need a lock, and closing our own
        # file descriptor would drop this process's POSIX locks on it.)
        uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=rw"
        try:
            src = sqlite3.connect(uri, uri=True, timeout=60.0)
            try:
                dst = sqlite3.connect(snapshot)
                try:
                    src.backup(dst)
                    meta = dict(dst.execute("SELECT key, value FROM meta"))
                finally:
                    dst.close()
            finally:
                src.close()
        except sqlite3.Error as e:
            raise LedgerError(f"cannot snapshot ledger {path}: {one_line(e)}") from None
        if meta.get("run") != run:
            raise LedgerError(f"ledger {path} belongs to run {meta.get('run')!r}, not {run!r}")
        with open(snapshot, "rb") as f:
            body = f.read()
    return store.put(store_key(run), body)


def download(store: ObjectStore, run: str, path: str) -> bool:
    """Replaces the file at `path` with the store's copy of the run's ledger, atomically;
    False (nothing written) if the store has none. LedgerError if the object is torn or
    the copy fails `verify_chain` (the local file is then left as it was). No Ledger may
    be open on `path` meanwhile."""
    try:
        body = store.get(store_key(run), max_bytes=MAX_MIRROR_BYTES)
    except CorruptObject as e:
        raise LedgerError(f"the store's ledger copy is damaged: {e}") from None
    if body is None:
        return False
    if not body.startswith(_SQLITE_MAGIC):
        raise LedgerError(f"the store's ledger copy {store_key(run)} is not a SQLite database")

    def verified(tmp: str) -> None:
        problems = verify_chain(tmp, run)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise LedgerError(f"the store's ledger copy fails verification: {problems[0]}{more}")
        # a hot journal left by a crashed writer of the old file would be "rolled back" onto
        # the new one and corrupt it: drop it first (the old file is being discarded anyway)
        for suffix in ("-journal", "-wal", "-shm"):
            try:
                os.remove(path + suffix)
            except FileNotFoundError:
                pass

    atomic_write(path, body, before_replace=verified)
    return True
