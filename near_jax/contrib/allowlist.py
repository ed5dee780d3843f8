"""Allowlisted runs: signed promotions from the rung below, and admissions made later.

A rung of the model ladder is its own run. `python -m near_jax.contrib promote --out=PATH
--key=AGG_KEY` writes the contributors who qualified in run A as a *promotion document*
signed by A's aggregator key:

    {"format": 1, "kind": "near_jax/promotion", "from_run", "aggregator_key" (public hex),
     "issued_at", "window", "top", "contributors": [{"contributor", "key_id",
     "public_key", "reward", "rounds"}, ...],
     "signature": sign(b"near_jax/promotion/v1\\n" + dumps(everything but "signature"))}

Creating run B with `--allowlist=PATH` (the aggregator program) fixes, in B's manifest,
`contrib.allowlist = {"from_run", "signer", "sha256", "keys": {name: public hex}}`: only
those names, each with that key, may contribute. B's aggregator may admit more later:
`RUN/allowlist_additions` holds {"run", "seq", "keys", "signature"} signed by B's aggregator
key (anyone can write to the store, so an object it did not sign counts for nothing);
each admission rewrites it with every earlier addition and seq + 1. Additions never
re-bind a name the manifest admits.

A run whose manifest has no allowlist is open: every registered contributor may take part.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Any

from near_jax._io import one_line, short_repr
from near_jax.contrib import identity
from near_jax.diloco import protocol
from near_jax.diloco.protocol import ProtocolError
from near_jax.diloco.store import CorruptObject, ObjectStore

KIND = "near_jax/promotion"
FORMAT = 1
MAX_PROMOTION_BYTES = 1 << 22  # ~25k contributors; a bigger file is not a promotion
MAX_ADDITIONS_BYTES = 1 << 22
_PROMOTION_DOMAIN = b"near_jax/promotion/v1\n"
_ADDITIONS_DOMAIN = b"near_jax/allowlist_additions/v1\n"
_PROMOTION_FIELDS = frozenset(
    {"format", "kind", "from_run", "aggregator_key", "issued_at", "window", "top"}
    | {"contributors", "signature"}
)
_ADDITIONS_FIELDS = frozenset({"run", "seq", "keys", "signature"})
_MAX_SEQ = 1 << 53


@dataclasses.dataclass(frozen=True)
class Promotion:
    """A verified promotion document: who run `from_run`'s aggregator (`signer`, public
    hex) promoted, with their keys; `sha256` of the document's bytes."""

    from_run: str
    signer: str
    keys: dict[str, str]
    sha256: str

    def manifest_entry(self) -> dict:
        """What a run created from this promotion records as `contrib.allowlist`."""
        return {
            "from_run": self.from_run,
            "signer": self.signer,
            "sha256": self.sha256,
            "keys": dict(sorted(self.keys.items())),
        }


# ------------------------------------------------------------------------- promotions


def sign_promotion(
    aggregator: identity.Identity,
    from_run: str,
    rows: list[dict],
    *,
    window: int,
    top: int,
    issued_at: float,
) -> dict:
    """The promotion document of `rows` (promote's rows, each with a valid public_key),
    signed by run `from_run`'s aggregator key; ValueError (one line) on a bad row."""
    _check_keys({_name(r.get("contributor")): r.get("public_key") for r in rows}, len(rows))
    body = {
        "format": FORMAT,
        "kind": KIND,
        "from_run": protocol.check_name("run", from_run),
        "aggregator_key": aggregator.public_hex,
        "issued_at": float(issued_at),
        "window": int(window),
        "top": int(top),
        "contributors": [dict(r) for r in rows],
    }
    body["signature"] = aggregator.sign(_PROMOTION_DOMAIN + protocol.dumps(body))
    return body


def read_promotion(
    source: str | os.PathLike | bytes, expected_signer: str | None = None
) -> Promotion:
    """The verified promotion in file `source` (or its bytes); ValueError (one line) when
    it is unreadable, oversized, not a signed promotion, or not signed by
    `expected_signer` (public hex) when given."""
    if isinstance(source, (bytes, bytearray)):
        what, data = "the promotion document", bytes(source)
    else:
        what = f"promotion file {os.fspath(source)}"
        try:
            with open(source, "rb") as f:
                data = f.read(MAX_PROMOTION_BYTES + 1)
        except OSError as e:
            raise ValueError(f"cannot read {what}: {e.strerror or e}") from None
    if len(data) > MAX_PROMOTION_BYTES:
        raise ValueError(f"{what} is over {MAX_PROMOTION_BYTES} bytes; not a promotion")
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{what} is not JSON ({one_line(e, 80)})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{what} is not a JSON object; expected a {KIND} document")
    if doc.get("kind") != KIND or doc.get("format") != FORMAT:
        raise ValueError(
            f"{what} is kind {short_repr(doc.get('kind'), 40)} format "
            f"{short_repr(doc.get('format'), 20)}; expected kind {KIND!r} format {FORMAT} "
            "(written by python -m near_jax.contrib promote --out --key)"
        )
    if set(doc) != _PROMOTION_FIELDS:
        raise ValueError(
            f"{what} has fields {short_repr(sorted(map(str, doc)), 200)}; expected "
            f"{', '.join(sorted(_PROMOTION_FIELDS))}"
        )
    rows = doc["contributors"]
    try:
        from_run = protocol.check_name("run", doc["from_run"])
        signer = identity.check_public_hex(doc["aggregator_key"])
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ValueError("contributors is not a list of objects")
        keys = _check_keys({_name(r.get("contributor")): r.get("public_key") for r in rows})
        if len(keys) != len(rows):
            raise ValueError("a contributor is listed twice")
    except (ValueError, identity.IdentityError) as e:
        raise ValueError(f"{what}: {one_line(e, 200)}") from None
    body = {k: v for k, v in doc.items() if k != "signature"}
    try:
        message = _PROMOTION_DOMAIN + protocol.dumps(body)
    except (ValueError, RecursionError) as e:  # NaN, absurd nesting: never signed by us
        raise ValueError(f"{what} has values JSON does not allow ({one_line(e, 80)})") from None
    if not identity.verify(signer, message, doc["signature"]):
        raise ValueError(
            f"{what}: the signature does not verify under its aggregator key id "
            f"{identity.key_id(signer)} (tampered or forged)"
        )
    if expected_signer is not None and signer != expected_signer:
        raise ValueError(
            f"{what} is signed by key id {identity.key_id(signer)}, not the expected "
            f"{_kid(expected_signer)}"
        )
    return Promotion(from_run, signer, keys, hashlib.sha256(data).hexdigest())


def source_problem(store: ObjectStore, promotion: Promotion) -> str:
    """Why `promotion` is not its run's aggregator's word, when `store` holds that run
    ("" if it does not, or if it is); the manifest is read bounded."""
    try:
        manifest = protocol.read_json(store, protocol.manifest_key(promotion.from_run))
    except (ProtocolError, CorruptObject) as e:
        return f"run {promotion.from_run!r}'s manifest is unreadable ({one_line(e, 100)})"
    if manifest is None:
        return ""
    contrib = manifest.get("contrib")
    theirs = contrib.get("aggregator_key") if isinstance(contrib, dict) else None
    if theirs != promotion.signer:
        return (
            f"the promotion is signed by key id {identity.key_id(promotion.signer)}, but the "
            f"aggregator key of run {promotion.from_run!r} is key id {_kid(theirs)}"
        )
    return ""


# ------------------------------------------------------------------------- admissions


@dataclasses.dataclass(frozen=True)
class Additions:
    """A validly signed `RUN/allowlist_additions`: its seq and keys (seq 0: none yet)."""

    seq: int = 0
    keys: dict[str, str] = dataclasses.field(default_factory=dict)


def additions_key(run: str) -> str:
    """The store key of the keys the run's aggregator admitted after creating the run."""
    return f"{run}/allowlist_additions"


def signed_additions(aggregator: identity.Identity, run: str, seq: int, keys: dict) -> dict:
    """The object stored at `additions_key(run)`, signed by the run's aggregator."""
    body = {"run": run, "seq": int(seq), "keys": dict(sorted(keys.items()))}
    body["signature"] = aggregator.sign(_ADDITIONS_DOMAIN + protocol.dumps(body))
    return body


def read_additions(store: ObjectStore, run: str, aggregator_public: str) -> tuple[Additions, str]:
    """(the additions, a problem or ""): nothing counts unless the run's aggregator signed
    it for this run (anyone can write to the store)."""
    key = additions_key(run)
    try:
        obj = protocol.read_json(store, key, max_bytes=MAX_ADDITIONS_BYTES)
    except (ProtocolError, CorruptObject) as e:
        return Additions(), f"{key} is unreadable ({one_line(e, 100)})"
    if obj is None:
        return Additions(), ""
    seq = obj.get("seq")
    body = {k: obj.get(k) for k in ("run", "seq", "keys")}
    try:
        keys = _check_keys(obj.get("keys"))
    except ValueError as e:
        return Additions(), f"{key} is malformed ({one_line(e, 100)})"
    if (
        set(obj) != _ADDITIONS_FIELDS
        or obj.get("run") != run
        or isinstance(seq, bool)
        or not isinstance(seq, int)
        or not 0 < seq < _MAX_SEQ
        or not identity.verify(
            aggregator_public, _ADDITIONS_DOMAIN + protocol.dumps(body), obj.get("signature")
        )
    ):
        return Additions(), f"{key} is not signed by the run's aggregator for run {run!r}"
    return Additions(seq, keys), ""


def manifest_keys(manifest: dict) -> tuple[dict[str, str] | None, str]:
    """(the keys the manifest's allowlist admits, a problem or ""); None for an open run.
    A malformed allowlist admits nobody (a closed run stays closed)."""
    contrib = manifest.get("contrib") if isinstance(manifest, dict) else None
    if not isinstance(contrib, dict) or contrib.get("allowlist") is None:
        return None, ""
    entry = contrib["allowlist"]
    try:
        if not isinstance(entry, dict):
            raise ValueError("not an object")
        return _check_keys(entry.get("keys")), ""
    except ValueError as e:
        return {}, f"the manifest's contrib.allowlist is malformed ({one_line(e, 100)})"


def merged(keys: dict[str, str], additions: Additions) -> dict[str, str]:
    """The manifest's keys plus the additions (which never re-bind a manifest name)."""
    return {**additions.keys, **keys}


def admitted(store: ObjectStore, run: str, manifest: dict) -> tuple[dict[str, str] | None, str]:
    """(name -> public hex of everyone admitted to `run`, a problem or ""): the manifest's
    allowlist plus the additions its aggregator signed; None for an open run."""
    keys, problem = manifest_keys(manifest)
    if keys is None:
        return None, ""
    aggregator = manifest["contrib"].get("aggregator_key")
    additions, more = read_additions(store, run, aggregator)
    return merged(keys, additions), "; ".join(p for p in (problem, more) if p)


def admit(
    store: ObjectStore,
    run: str,
    aggregator: identity.Identity,
    manifest: dict,
    keys: dict[str, str],
    *,
    force: bool = False,
) -> tuple[Additions, list[str]]:
    """Admits `keys` (name -> public hex) to allowlisted `run`: rewrites the signed
    additions with seq + 1; (the new additions, the names newly admitted). ValueError
    (one line) for an open run or a name admitted with another key; ProtocolError when
    the stored additions are not the aggregator's (`force` replaces them: they are lost)."""
    base, problem = manifest_keys(manifest)
    if base is None:
        raise ValueError(f"run {run!r} is open (no allowlist): every registered key may take part")
    keys = _check_keys(keys)
    current, problem = read_additions(store, run, aggregator.public_hex)
    if problem and not force:
        raise ProtocolError(f"{problem}; pass --force to replace it (its admissions are lost)")
    have = merged(base, current)
    for name, public in sorted(keys.items()):
        if have.get(name, public) != public:
            raise ValueError(
                f"{name} is already admitted with key id {identity.key_id(have[name])}, not "
                f"{identity.key_id(public)}; admit the new key under another name"
            )
    new = sorted(n for n in keys if n not in have)
    if not new:
        return current, []
    seq = current.seq + 1
    if problem:  # the lost object's seq is unknown: a clock seq passes any count-based one
        seq = max(seq, int(time.time()))
    out = Additions(seq, {**current.keys, **{n: keys[n] for n in new}})
    body = signed_additions(aggregator, run, out.seq, out.keys)
    store.put(additions_key(run), protocol.dumps(body))
    return out, new


class Admissions:
    """The validator's view of who is admitted: the manifest's allowlist (`entry`, its
    `contrib.allowlist`) plus the additions, re-read at most once per round and never
    rolled back to a lower seq (someone can re-put an older signed object)."""

    def __init__(self, store: ObjectStore, run: str, aggregator_public: str, entry: Any):
        self.store, self.run, self.aggregator = store, run, aggregator_public
        self.keys, self.problem = manifest_keys({"contrib": {"allowlist": entry}})
        self.keys = self.keys or {}
        self.additions, self._version = Additions(), None

    def at(self, version: int) -> dict[str, str]:
        """Who is admitted in round `version` (name -> public hex)."""
        if version != self._version:
            found, problem = read_additions(self.store, self.run, self.aggregator)
            if found.seq >= self.additions.seq:
                self.additions = found
            elif not problem:
                problem = f"{additions_key(self.run)} went back to seq {found.seq}; kept seq "
                problem += f"{self.additions.seq}"
            self.problem, self._version = problem, version
        return merged(self.keys, self.additions)


# ----------------------------------------------------------------------------- helpers


def _name(name: Any) -> str:
    if not isinstance(name, str):
        raise ValueError(f"bad contributor name {short_repr(name, 40)}")
    return protocol.check_name("contributor", name)


def _check_keys(keys: Any, expect: int | None = None) -> dict[str, str]:
    """`keys` if it maps valid contributor names to ed25519 public hex; else ValueError."""
    if not isinstance(keys, dict):
        raise ValueError(
            f"keys must map contributor names to public keys, not {type(keys).__name__}"
        )
    if expect is not None and len(keys) != expect:
        raise ValueError("a contributor is listed twice")
    out = {}
    for name, public in keys.items():
        try:
            out[_name(name)] = identity.check_public_hex(public)
        except identity.IdentityError as e:
            raise ValueError(f"{name}: {e}") from None
    return out


def _kid(public: Any) -> str:
    try:
        return identity.key_id(identity.check_public_hex(public))
    except identity.IdentityError:
        return f"(none: {short_repr(public, 20)})"
