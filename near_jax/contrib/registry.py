"""The run's key registry: contributor name -> ed25519 public key, self-signed entries.

`RUN/registry/NAME` in the run's object store holds one JSON entry per contributor:

    {"name", "run", "public_key" (64 hex), "key_id", "registered_at" (unix seconds, not signed),
     "signature": sign(b"near_jax/register/v1\\n" + dumps({"run", "name", "public_key"}))}

The signature is a proof of possession: only the holder of the private key can register its
public key, and the entry is bound to its run and name, so it cannot be copied to another
name or run. Names are first come, first served (`put_if_absent`); re-registering the same
key is a no-op. `lookup` refuses (IdentityError) any entry that is malformed, mis-filed or
whose self-signature fails: a tampered registry never yields a key. What the registry cannot
detect is someone with write access to the store deleting an entry and registering their own
key under the freed name; pin keys out of band where that matters.
"""

from __future__ import annotations

import math

from near_jax._io import one_line, short_repr
from near_jax.contrib.identity import (
    Identity,
    IdentityError,
    check_public_hex,
    key_id,
    verify,
)
from near_jax.diloco import protocol
from near_jax.diloco.store import CorruptObject, ObjectStore

REGISTER_DOMAIN = b"near_jax/register/v1\n"
ENTRY_FIELDS = frozenset({"name", "public_key", "key_id", "run", "registered_at", "signature"})
MAX_ENTRY_BYTES = 1 << 16  # a registry entry is a few hundred bytes; a bigger one is junk


def registry_prefix(run: str) -> str:
    """The store prefix of run `run`'s registry."""
    return f"{_checked('run', run)}/registry/"


def registry_key(run: str, name: str) -> str:
    """The store key of contributor `name`'s registry entry."""
    return registry_prefix(run) + _checked("contributor", name)


def registration_bytes(run: str, name: str, public_hex: str) -> bytes:
    """The bytes a registration's proof-of-possession signature covers."""
    return REGISTER_DOMAIN + protocol.dumps({"run": run, "name": name, "public_key": public_hex})


def register(store: ObjectStore, run: str, name: str, identity: Identity, now: float) -> bool:
    """Registers `identity` as contributor `name` of `run`: True if this call created the
    entry, False if that key already holds the name; IdentityError if another key does."""
    key = registry_key(run, name)
    if isinstance(now, bool) or not isinstance(now, (int, float)) or not math.isfinite(now):
        raise IdentityError(f"registration time must be a finite number, got {now!r}")
    public = identity.public_hex
    entry = {
        "name": name,
        "run": run,
        "public_key": public,
        "key_id": identity.key_id,
        "registered_at": float(now),
        "signature": identity.sign(registration_bytes(run, name, public)),
    }
    if store.put_if_absent(key, protocol.dumps(entry)):
        return True
    existing = lookup(store, run, name)  # a broken entry raises here: the name is unusable
    if existing is None:  # vanished between the two calls (deleted): try once more
        if store.put_if_absent(key, protocol.dumps(entry)):
            return True
        existing = lookup(store, run, name)
    if existing == public:
        return False
    raise IdentityError(
        f"contributor name {name!r} is registered to key id "
        f"{key_id(existing) if existing else '?'}; choose another name"
    )


def lookup(store: ObjectStore, run: str, name: str) -> str | None:
    """The public key (64 hex) registered as contributor `name`, None if none is;
    IdentityError if the entry is corrupt, malformed, mis-filed or not self-signed."""
    key = registry_key(run, name)
    try:
        entry = protocol.read_json(store, key, max_bytes=MAX_ENTRY_BYTES)  # anyone writes here
    except (CorruptObject, protocol.ProtocolError) as e:
        raise IdentityError(f"registry entry {key}: {one_line(e)}") from None
    if entry is None:
        return None
    return _check_entry(key, entry, run, name)


def _check_entry(key: str, entry: dict, run: str, name: str) -> str:
    def bad(why: str) -> IdentityError:
        return IdentityError(f"registry entry {key} {why}")

    if set(entry) != ENTRY_FIELDS:
        got = ", ".join(sorted(map(str, entry)))
        raise bad(f"has fields {got}; expected {', '.join(sorted(ENTRY_FIELDS))}")
    if entry["name"] != name or entry["run"] != run:
        raise bad(
            f"names contributor {short_repr(entry['name'])} of run {short_repr(entry['run'])}, "
            f"but is filed as {name!r} of {run!r}"
        )
    try:
        public = check_public_hex(entry["public_key"])
    except IdentityError as e:
        raise bad(str(e)) from None
    if entry["key_id"] != key_id(public):
        raise bad(f"has key id {short_repr(entry['key_id'])}, but its key's id is {key_id(public)}")
    at = entry["registered_at"]
    if isinstance(at, bool) or not isinstance(at, (int, float)) or not math.isfinite(at):
        raise bad(f"has registered_at {short_repr(at)}; expected unix seconds")
    if not verify(public, registration_bytes(run, name, public), entry["signature"]):
        raise bad("has a signature that does not verify (tampered or forged)")
    return public


def _scan(store: ObjectStore, run: str) -> tuple[dict[str, str], list[str]]:
    prefix = registry_prefix(run)
    valid: dict[str, str] = {}
    problems: list[str] = []
    for key in store.list(prefix):
        name = key[len(prefix) :]
        try:
            _checked("contributor", name)
        except IdentityError as e:
            problems.append(f"{key}: {e}")
            continue
        try:
            public = lookup(store, run, name)
        except IdentityError as e:
            problems.append(str(e))
            continue
        if public is not None:  # None: deleted since the listing
            valid[name] = public
    return valid, problems


def registry(store: ObjectStore, run: str) -> dict[str, str]:
    """Contributor name -> public key (64 hex) for every valid entry of `run`'s registry;
    invalid entries are left out (see `registry_problems`)."""
    return _scan(store, run)[0]


def registry_problems(store: ObjectStore, run: str) -> list[str]:
    """One line per invalid entry of `run`'s registry (empty when all are valid)."""
    return _scan(store, run)[1]


# --------------------------------------------------------------------------------- helpers


def _checked(kind: str, name: str) -> str:
    try:
        return protocol.check_name(kind, name)
    except ValueError as e:
        raise IdentityError(str(e)) from None
