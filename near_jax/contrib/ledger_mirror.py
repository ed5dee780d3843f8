"""The store's copy of a run's ledger: append-only round segments and a signed index.

    RUN/ledger/rounds/RRRRRRRR   one per recorded round (8 digits, even with no entries):
                                 dumps({"format": 1, "run", "round", "entries": [...]}),
                                 entries as `Ledger.entries(r, r)` gives them (the fields,
                                 seq, prev_hash, entry_hash)
    RUN/ledger/index             dumps({"format": 1, "run", "last_round", "entries" (count),
                                 "head", "signature"}), signed by the run's aggregator key
                                 over INDEX_DOMAIN + dumps(the rest); last_round -1 and the
                                 genesis hash when nothing is recorded yet

A round uploads its own segment and the (constant-size) index, so upload bytes stay flat as
the run grows; segments go first and the index last, so the index never names a segment
that is not there. The hash chain from the genesis hash through every segment up to the
signed head authenticates every segment: `download` recomputes each entry's hash and checks
seq continuity and prev links. Anyone who can write to the store can plant objects; a
segment is always put (overwritten) by the aggregator, whose copy wins, and readers believe
nothing the signed index does not reach. A replayed older index (a valid shorter chain) is
caught by the next segment, which continues its chain: `download` re-reads the index a few
times (the aggregator writes that segment just before the index) and then refuses it.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any

from near_jax._io import fsync_dir, one_line, short_repr
from near_jax.contrib import identity, ledger
from near_jax.contrib.ledger import LedgerError
from near_jax.diloco import protocol
from near_jax.diloco.protocol import ProtocolError, check_name, dumps
from near_jax.diloco.store import CorruptObject, ObjectStore, ObjectTooLarge

FORMAT = 1
INDEX_DOMAIN = b"near_jax/ledger_index/v1\n"
MAX_INDEX_BYTES = 4 << 10  # the index is constant-size: a few hashes and counts
MAX_SEGMENT_BYTES = 64 << 20  # one round's entries; upload refuses a larger round
INDEX_REREADS = 3  # a segment past the index: re-read it this often before calling it stale
_INDEX_FIELDS = ("format", "run", "last_round", "entries", "head", "signature")
_SEGMENT_FIELDS = ("format", "run", "round", "entries")
_CHAIN_FIELDS = ("seq", "prev_hash", "entry_hash")


def index_key(run: str) -> str:
    """The store key of a run's ledger index."""
    return f"{check_name('run', run)}/ledger/index"


def segment_key(run: str, rnd: int) -> str:
    """The store key of round `rnd`'s ledger segment."""
    return f"{check_name('run', run)}/ledger/rounds/{rnd:08d}"


def index_message(body: dict[str, Any]) -> bytes:
    """What the aggregator signs for an index: INDEX_DOMAIN + dumps(body less signature)."""
    return INDEX_DOMAIN + dumps({k: v for k, v in body.items() if k != "signature"})


def index_body(
    run: str, last_round: int, count: int, head: str, aggregator: identity.Identity
) -> bytes:
    """The signed index of a ledger holding `count` entries through round `last_round`."""
    body = {"format": FORMAT, "run": run, "last_round": last_round, "entries": count, "head": head}
    return dumps({**body, "signature": aggregator.sign(index_message(body))})


def segment_body(run: str, rnd: int, entries: list[dict[str, Any]]) -> bytes:
    """Round `rnd`'s segment: its entries as `Ledger.entries(rnd, rnd)` returns them."""
    return dumps({"format": FORMAT, "run": run, "round": rnd, "entries": entries})


# ------------------------------------------------------------------------------- upload


def state_at(book: ledger.Ledger, last_round: int) -> tuple[int, str]:
    """(count, head) of `book` through round `last_round`: the index's values there. Reads
    only the entries after that round (normally none)."""
    later = book.entries(last_round + 1, None)
    if not later:
        return book.count(), book.head()
    return book.count() - len(later), later[0]["prev_hash"]


def upload_rounds(
    store: ObjectStore, book: ledger.Ledger, first: int, last: int, aggregator: identity.Identity
) -> int:
    """Puts the segments of rounds first..last (none if first > last) from `book`, then the
    index at round `last` signed by `aggregator`; returns the bytes written. LedgerError if
    a round's segment would exceed MAX_SEGMENT_BYTES (readers could not read it)."""
    run, written = book.run, 0
    for rnd in range(max(first, 0), last + 1):
        body = segment_body(run, rnd, book.entries(rnd, rnd))
        if len(body) > MAX_SEGMENT_BYTES:
            raise LedgerError(
                f"round {rnd}'s ledger segment is {len(body)} bytes, over the "
                f"{MAX_SEGMENT_BYTES}-byte limit of readers"
            )
        written += store.put(segment_key(run, rnd), body)
    count, head = state_at(book, last)
    return written + store.put(index_key(run), index_body(run, last, count, head, aggregator))


def upload(
    store: ObjectStore,
    run: str,
    path: str,
    aggregator: identity.Identity,
    last_round: int | None = None,
) -> int:
    """Puts every segment of the ledger file at `path` through `last_round` (default: its
    last round) and the signed index: the whole copy, rewritten. Returns the bytes written;
    LedgerError if `path` is missing or not `run`'s ledger."""
    if not os.path.isfile(path):
        raise LedgerError(f"no ledger file at {path}")
    with ledger.Ledger.open(path, run) as book:
        last = book.last_round() if last_round is None else last_round
        return upload_rounds(store, book, 0, -1 if last is None else last, aggregator)


# -------------------------------------------------------------------------------- reads


def _get(store: ObjectStore, key: str, what: str, limit: int) -> bytes | None:
    try:
        return store.get(key, max_bytes=limit)
    except ObjectTooLarge:
        raise LedgerError(f"the store's ledger {what} {key} is over {limit} bytes") from None
    except CorruptObject as e:
        raise LedgerError(f"the store's ledger {what} {key} is damaged: {e.reason}") from None


def _json(body: bytes, key: str, what: str, fields: tuple[str, ...]) -> dict[str, Any]:
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError) as e:  # RecursionError: absurdly nested JSON
        raise LedgerError(f"the store's ledger {what} {key} is not JSON: {one_line(e)}") from None
    if not isinstance(obj, dict) or sorted(obj) != sorted(fields):
        got = short_repr(sorted(obj)) if isinstance(obj, dict) else type(obj).__name__
        raise LedgerError(f"the store's ledger {what} {key} has fields {got}, expected {fields}")
    return obj


def _int(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def read_index(store: ObjectStore, run: str, aggregator_public: str) -> dict[str, Any] | None:
    """The run's ledger index once checked and signed by `aggregator_public`; None if there
    is none. LedgerError (one line naming the index) if it is damaged, malformed, another
    run's, or not signed by that key."""
    key = index_key(run)
    body = _get(store, key, "index", MAX_INDEX_BYTES)
    if body is None:
        return None
    index = _json(body, key, "index", _INDEX_FIELDS)
    if index["format"] != FORMAT or index["run"] != run:
        raise LedgerError(
            f"the store's ledger index {key} is format {short_repr(index['format'])} of run "
            f"{short_repr(index['run'])}, expected format {FORMAT} of run {run!r}"
        )
    if not (_int(index["last_round"], -1) and _int(index["entries"], 0)):
        raise LedgerError(f"the store's ledger index {key} has a bad last_round or entries count")
    if not isinstance(index["head"], str):
        raise LedgerError(f"the store's ledger index {key} has a non-text head")
    if not identity.verify(aggregator_public, index_message(index), index["signature"]):
        raise LedgerError(f"the store's ledger index {key} is not signed by the aggregator key")
    return index


class _Chain:
    """The chain as verified so far: the next round, seq and prev_hash expected."""

    def __init__(self, run: str):
        self.run, self.round, self.count, self.head = run, 0, 0, ledger.genesis_hash(run)

    def segment(self, store: ObjectStore, rnd: int) -> list[dict[str, Any]] | None:
        """Round `rnd`'s entries (fields only), verified against the chain so far, which
        they then extend; None if the segment is missing. LedgerError naming the defect."""
        key = segment_key(self.run, rnd)
        body = _get(store, key, "segment", MAX_SEGMENT_BYTES)
        if body is None:
            return None
        seg = _json(body, key, "segment", _SEGMENT_FIELDS)
        if (seg["format"], seg["run"], seg["round"]) != (FORMAT, self.run, rnd):
            raise LedgerError(
                f"the store's ledger segment {key} says format {short_repr(seg['format'])}, "
                f"run {short_repr(seg['run'])}, round {short_repr(seg['round'])}: expected "
                f"{FORMAT}, {self.run!r}, {rnd}"
            )
        if not isinstance(seg["entries"], list):
            raise LedgerError(f"the store's ledger segment {key} has no entries list")
        count, head, out = self.count, self.head, []
        want = sorted((*ledger.ENTRY_FIELDS, *_CHAIN_FIELDS))
        for i, e in enumerate(seg["entries"]):
            where = f"the store's ledger segment {key}, entry {i}"
            if not isinstance(e, dict) or sorted(e) != want:
                raise LedgerError(f"{where} does not have the fields {want}")
            try:
                fields = ledger.normalize_entry({f: e[f] for f in ledger.ENTRY_FIELDS}, rnd)
            except (ValueError, RecursionError) as err:  # a deeply nested statement
                raise LedgerError(f"{where} is malformed: {one_line(err)}") from None
            if e["seq"] != count + 1 or e["prev_hash"] != head:
                raise LedgerError(
                    f"{where} breaks the chain: seq {short_repr(e['seq'])} after {count}, or its "
                    "prev_hash is not the previous entry's hash (missing, reordered or "
                    "renamed entries)"
                )
            count, head = count + 1, ledger.entry_hash(count + 1, head, fields)
            if e["entry_hash"] != head:
                raise LedgerError(f"{where} (seq {count}) does not match its hash (edited)")
            out.append(fields)
        self.round, self.count, self.head = rnd + 1, count, head
        return out


def _default_key(store: ObjectStore, run: str) -> str:
    try:
        manifest = protocol.read_json(store, protocol.manifest_key(run))
        key = ((manifest or {}).get("contrib") or {}).get("aggregator_key")
        return identity.check_public_hex(key)
    except (ProtocolError, CorruptObject, identity.IdentityError, AttributeError) as e:
        raise LedgerError(
            f"no usable aggregator key in {protocol.manifest_key(run)}: {one_line(e)}"
        ) from None


def download(store: ObjectStore, run: str, path: str, aggregator_public: str | None = None) -> bool:
    """Rebuilds the ledger file at `path` (atomically replaced) from the store's segments,
    verified against the index signed by `aggregator_public` (None: the run manifest's
    contrib.aggregator_key, which is what an audit trusts). False, writing nothing, if the
    store has no index. LedgerError (one line naming the object and the defect, the local
    file left as it was) for a bad signature, a missing, oversized or corrupt segment, a
    broken chain, a head or count that disagrees, or a rolled-back index. No Ledger may be
    open on `path` meanwhile."""
    public = _default_key(store, run) if aggregator_public is None else aggregator_public
    index = read_index(store, run, public)
    if index is None:
        return False
    directory = os.path.dirname(os.path.abspath(path))
    with tempfile.TemporaryDirectory(prefix=".ledger-download-", dir=directory) as tmp:
        built = os.path.join(tmp, "ledger.sqlite")
        with ledger.Ledger.open(built, run) as book:
            chain, rereads = _Chain(run), 0
            while True:
                while chain.round <= index["last_round"]:
                    rnd = chain.round
                    entries = chain.segment(store, rnd)
                    if entries is None:
                        raise LedgerError(
                            f"the store's ledger segment {segment_key(run, rnd)} is missing "
                            f"(the index {index_key(run)} reaches round {index['last_round']})"
                        )
                    book.append_round(rnd, entries)
                if (chain.count, chain.head) != (index["entries"], index["head"]):
                    raise LedgerError(
                        f"the store's ledger index {index_key(run)} says {index['entries']} "
                        f"entries with head {str(index['head'])[:16]}…, the segments hold "
                        f"{chain.count} with head {chain.head[:16]}…"
                    )
                if not _continues(store, chain):
                    break
                newer = None
                if rereads < INDEX_REREADS:  # the aggregator may be between its two writes
                    rereads += 1
                    time.sleep(0.05 * rereads)
                    newer = read_index(store, run, public)
                if newer is None or newer["last_round"] < index["last_round"]:
                    raise LedgerError(
                        f"the store's ledger index {index_key(run)} is rolled back: segment "
                        f"{segment_key(run, chain.round)} continues its chain past round "
                        f"{index['last_round']}"
                    )
                index = newer
            if book.head() != chain.head:  # the rebuilt file hashes as verified
                raise LedgerError(f"the ledger rebuilt from {index_key(run)} hashes differently")
        with open(built, "rb") as f:
            os.fsync(f.fileno())
        # a hot journal left by a crashed writer of the old file would be "rolled back"
        # onto the new one and corrupt it: drop it (the old file is being replaced anyway)
        for suffix in ("-journal", "-wal", "-shm"):
            try:
                os.remove(path + suffix)
            except FileNotFoundError:
                pass
        os.replace(built, path)
        fsync_dir(directory)
    return True


def _continues(store: ObjectStore, chain: _Chain) -> bool:
    """Whether the segment after the verified chain extends it validly (a stale index);
    garbage planted there does not."""
    probe = _Chain(chain.run)
    probe.count, probe.head = chain.count, chain.head
    try:
        return probe.segment(store, chain.round) is not None
    except LedgerError:
        return False
