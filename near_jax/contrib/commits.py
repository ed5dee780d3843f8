"""Commitments: store-ordered slots that decide which of two near-copies is the original.

Before a contributor's payload becomes visible, it commits to the payload's hash in the
lowest free slot of the round, `RUN/commits/RRRRRRRR/SSSSSS` (outside the contributions
prefix: the aggregator never lists commitments as contributions), created with
`put_if_absent`, so every slot has exactly one writer. The object is canonical JSON
{"run", "round", "contributor", "payload_sha256", "slot", "signature"}, signed by the
contributor's key over b"near_jax/commit/v1\\n" + the JSON without its signature.

Why slots order originals: a copier learns what to copy (hence its own payload's hash)
only once the original's payload is visible, which is after the original's commitment.
The original claimed the lowest slot free when it listed the prefix (every lower slot
was taken, and slots are never freed), so every slot a copier can still claim is higher.
Readers take slots in ascending order up to a bound (anyone can flood commitments): if
the original's commitment was not read, neither was the copy's. Flooding only pushes
honest commitments past the bound: then nobody has one, and copy pairs tie ("duplicate").
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

from near_jax.contrib import identity
from near_jax.diloco import protocol
from near_jax.diloco.store import CorruptObject, ObjectStore

DOMAIN = b"near_jax/commit/v1\n"
FIELDS = frozenset({"run", "round", "contributor", "payload_sha256", "slot", "signature"})
MAX_COMMIT_BYTES = 4096  # a commitment is ~400 bytes; anything longer is not one
MAX_SLOT = 999_999  # six digits: keys list in slot order
MAX_ATTEMPTS = 32  # slots tried upward after lost races before giving up
_SLOT = re.compile(r"[0-9]{6}")
_TAKEN = re.compile(r"([0-9]{6})(?:/|$)")  # a nested key blocks its slot's path too
_HEX64 = re.compile(r"[0-9a-f]{64}")


class CommitError(ValueError):
    """No slot could be claimed (one line); the contribution goes on without one."""


def commits_prefix(run: str, rnd: int) -> str:
    """Where round `rnd`'s commitments are."""
    return f"{run}/commits/{rnd:08d}/"


def commit_key(run: str, rnd: int, slot: int) -> str:
    """The key of one slot."""
    return f"{commits_prefix(run, rnd)}{slot:06d}"


def commit_message(body: Mapping[str, Any]) -> bytes:
    """The bytes a commitment's signature covers: the domain, then the canonical JSON of
    every field but the signature."""
    return DOMAIN + protocol.dumps({k: v for k, v in body.items() if k != "signature"})


def commit(
    store: ObjectStore,
    run: str,
    rnd: int,
    name: str,
    ident: identity.Identity,
    payload_sha256: str,
    *,
    attempts: int = MAX_ATTEMPTS,
) -> int:
    """Commits `name` to `payload_sha256` for round `rnd` in the lowest free slot, trying
    upward after lost races; returns the slot. CommitError after `attempts` lost races
    or past MAX_SLOT; ValueError for bad arguments."""
    protocol.check_name("contributor", name)
    if not (isinstance(payload_sha256, str) and _HEX64.fullmatch(payload_sha256)):
        raise ValueError(f"commit: payload_sha256 {payload_sha256!r:.80} is not 64 lowercase hex")
    if type(rnd) is not int or rnd < 0:
        raise ValueError(f"commit: round {rnd!r} is not an integer >= 0")
    prefix = commits_prefix(run, rnd)
    taken = set()
    for key in store.list(prefix):
        m = _TAKEN.match(key[len(prefix) :])
        if m:
            taken.add(int(m[1]))
    slot, tried = 0, 0
    while tried < attempts:
        while slot in taken:
            slot += 1
        if slot > MAX_SLOT:
            break
        body = {
            "run": run,
            "round": rnd,
            "contributor": name,
            "payload_sha256": payload_sha256,
            "slot": slot,
        }
        body["signature"] = ident.sign(commit_message(body))
        if store.put_if_absent(commit_key(run, rnd, slot), protocol.dumps(body)):
            return slot
        taken.add(slot)  # lost the race for it: every slot below ours stays taken
        tried += 1
    raise CommitError(
        f"commit: no free slot under {prefix}: lost {tried} races (at most {attempts}), "
        f"reached slot {slot} (slots go up to {MAX_SLOT})"
    )


def _parse(
    body: bytes, run: str, rnd: int, slot: int, keys: Mapping[str, str]
) -> tuple[str, str] | None:
    """(contributor, payload_sha256) of a well-formed commitment filed at this slot and
    signed by the contributor's registered key; None for anything else."""
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict) or set(obj) != FIELDS:
        return None
    name, sha, signature = obj["contributor"], obj["payload_sha256"], obj["signature"]
    if obj["run"] != run or type(obj["round"]) is not int or obj["round"] != rnd:
        return None  # filed under another run or round: a replay, not a commitment here
    if type(obj["slot"]) is not int or obj["slot"] != slot:
        return None  # copied into a lower slot than the one it was signed for
    if not (isinstance(name, str) and isinstance(sha, str) and _HEX64.fullmatch(sha)):
        return None
    public = keys.get(name)
    if public is None or not identity.verify(public, commit_message(obj), signature):
        return None
    return name, sha


def read_commits(
    store: ObjectStore, run: str, rnd: int, keys: Mapping[str, str], limit: int
) -> dict[tuple[str, str], int]:
    """(contributor, payload_sha256) -> its earliest slot, from the first `limit` slots of
    round `rnd` in ascending order (each object read at most MAX_COMMIT_BYTES). Objects
    that are damaged, malformed, filed elsewhere than they were signed for, or not signed
    by the registered key of a contributor in `keys` (name -> public hex) are skipped,
    but count toward `limit`. A store that fails raises StoreError."""
    if type(limit) is not int or limit < 0:
        raise ValueError(f"read_commits: limit {limit!r} is not an integer >= 0")
    prefix = commits_prefix(run, rnd)
    slots = sorted(
        (int(rest), key)
        for key in store.list(prefix)
        if _SLOT.fullmatch(rest := key[len(prefix) :])
    )
    out: dict[tuple[str, str], int] = {}
    for slot, key in slots[:limit]:
        try:
            body = store.get(key, max_bytes=MAX_COMMIT_BYTES)
        except CorruptObject:  # damaged, oversized or planted: not a commitment
            continue
        if body is None:
            continue
        found = _parse(body, run, rnd, slot, keys)
        if found is not None:
            out.setdefault(found, slot)  # ascending: the first is the earliest
    return out


def arrivals(commits: Mapping[tuple[str, str], int], candidates: Iterable[Any]) -> list[int]:
    """The arrival rank of each candidate (with `.contributor` and `.payload_sha256`) for
    `screening.screen_gram`: its commitment's slot, or for one without a commitment one
    more than every slot among them (those without one tie, after every committed one)."""
    slots = [commits.get((c.contributor, c.payload_sha256)) for c in candidates]
    late = max((s for s in slots if s is not None), default=-1) + 1
    return [late if s is None else s for s in slots]
