"""The aggregator's ledger: kept in a local file, recorded from the signed decisions, mirrored.

After a round's decision (the commit point) is written and before `latest` moves, the
validator appends the round's entries to the hash-chained SQLite ledger (`ledger`), then
mirrors the round into the store (its segment `RUN/ledger/rounds/RRRRRRRR` and the signed
index `RUN/ledger/index`, `ledger_mirror`): upload bytes per round stay flat. The entries are
part of the decision, which the aggregator signs, so the ledger is a pure function of the
decisions: a restarted aggregator re-appends a round it had committed but not recorded (and
checks that a recorded one matches), rebuilds a lost or broken ledger from them, and
`verify` checks ledger against decisions. After a restart the store's index says which
segments are already there (when it is signed by this key and agrees with the local
ledger); otherwise every segment is put again.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from near_jax.contrib import identity, ledger, ledger_mirror, ledger_verify, signing
from near_jax.diloco import protocol
from near_jax.diloco.protocol import ProtocolError
from near_jax.diloco.store import ObjectStore


class Recorder:
    """The ledger file at `path` of the run whose aggregator key is `aggregator` (which
    signs the store's index); every failure is a ProtocolError (one line)."""

    def __init__(
        self,
        store: ObjectStore,
        run: str,
        path: str,
        aggregator: identity.Identity,
        log: Callable[[str], None],
    ):
        self.store, self.run, self.path = store, run, path
        self.aggregator, self.aggregator_public = aggregator, aggregator.public_hex
        self.log = log
        self.book: ledger.Ledger | None = None
        self.recorded_through = -1  # the last round recorded (entries or not)
        self.uploaded_through: int | None = None  # the store index's round; None: no index

    def open(self, version: int) -> None:
        """Opens the local ledger (see `_open`), records the rounds before `version` that it
        lacks from their decisions and mirrors what the store lacks (see `_in_store`)."""
        self._open()
        last = self.book.last_round()
        for rnd in range(0 if last is None else last + 1, version):
            decision = protocol.read_json(self.store, protocol.decision_key(self.run, rnd))
            if decision is None:
                raise ProtocolError(f"round {rnd} is published but has no decision")
            self.record(decision)
        # rounds without entries leave no trace in the file, yet get a segment; a round
        # recorded but not yet published (killed in between) is past version - 1
        self.recorded_through = max(version - 1, -1 if last is None else last)
        self.uploaded_through = self._in_store()
        self.upload()

    def _in_store(self) -> int | None:
        """The last round whose segment the store holds: the index's, when it is signed by
        this key and agrees with the local ledger at that round; else None (all again)."""
        try:
            index = ledger_mirror.read_index(self.store, self.run, self.aggregator_public)
            if index is None:
                return None
            r = index["last_round"]
            if r <= self.recorded_through and ledger_mirror.state_at(self.book, r) == (
                index["entries"],
                index["head"],
            ):
                return r
            why = f"it reaches round {r} with head {index['head'][:16]}…, unlike this ledger"
        except ledger.LedgerError as e:
            why = str(e)
        self.log(f"the store's ledger index is unusable ({why}); putting every segment again")
        return None

    def _open(self) -> None:
        """The local ledger. One that does not verify is moved aside and rebuilt from the
        decisions (signed by this aggregator); the store's mirror is never read back, since
        anyone who can write to the store could have forged it."""
        if self.book is not None:
            self.book.close()
        path = self.path
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        except OSError as e:
            raise ProtocolError(f"cannot create the ledger's directory for {path}: {e}") from None
        if os.path.exists(path) and not _is_sqlite_file(path):
            raise ProtocolError(
                f"ledger path {path} exists and is not a ledger file (pass --ledger=FILE)"
            )
        if os.path.exists(path):
            problems = ledger_verify.verify_chain(path, self.run)
            if problems:
                aside = f"{path}.broken-{int(time.time())}"
                for suffix in ("", "-journal"):
                    if os.path.exists(path + suffix):
                        os.replace(path + suffix, aside + suffix)
                self.log(
                    f"ledger {path} does not verify ({problems[0]}); moved it to {aside}, "
                    "rebuilding it from the decisions"
                )
        try:
            self.book = ledger.Ledger.open(path, self.run)
        except ledger.LedgerError as e:
            raise ProtocolError(str(e)) from None

    def record(self, decision: dict) -> None:
        """Appends decision's entries; a round already recorded must match them exactly."""
        r = int(decision.get("round", -1))
        if not signing.check_decision(self.aggregator_public, decision):
            raise ProtocolError(f"decision {r} is not signed by this aggregator's key")
        entries = decision.get("contrib", {}).get("entries")
        if entries is None:
            raise ProtocolError(f"round {r}'s decision has no contrib entries")
        try:
            want = [ledger.normalize_entry(e, r) for e in entries]
            appended = not want or self.book.append_round(r, entries)
        except (ledger.LedgerError, ValueError) as e:
            raise ProtocolError(f"cannot record round {r} in {self.path}: {e}") from None
        if not appended:
            have = [{k: e[k] for k in ledger.ENTRY_FIELDS} for e in self.book.entries(r, r)]
            if have != want:
                raise ProtocolError(
                    f"ledger {self.path} holds a round {r} that differs from its decision; "
                    "move the file aside and restart to rebuild it from the decisions"
                )
        self.recorded_through = max(self.recorded_through, r)

    def upload(self) -> int:
        """Puts into the store what it lacks: normally the last recorded round's segment
        and the index (every segment when the store's index was unusable). Returns the
        bytes written, 0 when the store is up to date."""
        done = self.uploaded_through
        if self.book is None or (done is not None and done >= self.recorded_through):
            return 0
        first = 0 if done is None else done + 1
        try:
            n = ledger_mirror.upload_rounds(
                self.store, self.book, first, self.recorded_through, self.aggregator
            )
        except ledger.LedgerError as e:
            raise ProtocolError(str(e)) from None
        self.uploaded_through = self.recorded_through
        return n

    def payload_seen(self, payload_sha256: str) -> tuple[int, str] | None:
        """The ledger's (round, contributor) of a payload (a replay); None if never seen or
        while no ledger is open."""
        return self.book.payload_seen(payload_sha256) if self.book else None

    def close(self) -> None:
        if self.book is not None:
            self.book.close()
            self.book = None


def _is_sqlite_file(path: str) -> bool:
    """A regular file that starts like a SQLite database (what may be moved aside)."""
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(16) == b"SQLite format 3\x00"
