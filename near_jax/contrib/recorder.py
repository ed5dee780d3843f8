"""The aggregator's ledger: kept in a local file, recorded from the signed decisions, mirrored.

After a round's decision (the commit point) is written and before `latest` moves, the
validator appends the round's entries to the hash-chained SQLite ledger (`ledger`), then
mirrors the ledger into the store (`RUN/ledger.sqlite`, `ledger_mirror`). The entries are
part of the decision, which the aggregator signs, so the ledger is a pure function of the
decisions: a restarted aggregator re-appends a round it had committed but not recorded (and
checks that a recorded one matches), rebuilds a lost or broken ledger from them, and
`verify` checks ledger against decisions.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from near_jax.contrib import ledger, ledger_mirror, ledger_verify, signing
from near_jax.diloco import protocol
from near_jax.diloco.protocol import ProtocolError
from near_jax.diloco.store import ObjectStore


class Recorder:
    """The ledger file at `path` of the run whose aggregator key is `aggregator_public`;
    every failure is a ProtocolError (one line)."""

    def __init__(
        self,
        store: ObjectStore,
        run: str,
        path: str,
        aggregator_public: str,
        log: Callable[[str], None],
    ):
        self.store, self.run, self.path = store, run, path
        self.aggregator_public, self.log = aggregator_public, log
        self.book: ledger.Ledger | None = None

    def open(self, version: int) -> None:
        """Opens the local ledger (see `_open`), records the rounds before `version` that it
        lacks from their decisions and mirrors it into the store."""
        self._open()
        last = self.book.last_round()
        for rnd in range(0 if last is None else last + 1, version):
            decision = protocol.read_json(self.store, protocol.decision_key(self.run, rnd))
            if decision is None:
                raise ProtocolError(f"round {rnd} is published but has no decision")
            self.record(decision)
        self.upload()

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
            if not want or self.book.append_round(r, entries):
                return
        except (ledger.LedgerError, ValueError) as e:
            raise ProtocolError(f"cannot record round {r} in {self.path}: {e}") from None
        have = [{k: e[k] for k in ledger.ENTRY_FIELDS} for e in self.book.entries(r, r)]
        if have != want:
            raise ProtocolError(
                f"ledger {self.path} holds a round {r} that differs from its decision; "
                "move the file aside and restart to rebuild it from the decisions"
            )

    def upload(self) -> None:
        """Mirrors the ledger into the store."""
        try:
            ledger_mirror.upload(self.store, self.run, self.path)
        except ledger.LedgerError as e:
            raise ProtocolError(str(e)) from None

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
