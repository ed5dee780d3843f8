"""Manifests: the small objects that name a sharded version or contribution by its hashes.

A version manifest lists, for each part (params, momentum, server_ef and, for versions a
round produced, the update that produced them), the sha256 of every shard object under
its key prefix; its parts' roots (sha256 of the canonical list of shard hashes) are what
`latest`, decisions and contribution tags call `params_sha256` etc. A contribution
manifest is the body of the signed contribution object: the spec, the plan id and every
shard's (sha256, byte size) — no keys, so the same Δ pushed under two names has the same
manifest (contrib's replay check). Shard objects are read one at a time, bounded by the
shard's size and checked against their manifest hash (`read_shard`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import numpy as np

from near_jax.diloco.codec.compress import Payload, PayloadError, decode
from near_jax.diloco.protocol.keys import ProtocolError
from near_jax.diloco.protocol.objects import dumps, sha256
from near_jax.diloco.protocol.shards import ShardPlan
from near_jax.diloco.store import CorruptObject, ObjectStore

PARTS = ("params", "momentum", "server_ef")
_HEX = re.compile(r"[0-9a-f]{64}")


def root(hashes: list[str] | tuple[str, ...]) -> str:
    """The hash of a sharded object: sha256 of its shard hashes' canonical JSON list."""
    return sha256(dumps(list(hashes)))


def shard_limit(plan: ShardPlan, s: int) -> int:
    """The most bytes a stored shard object may take: twice its fp32 size plus 64 KiB."""
    return 8 * plan.shard_elements(s) + (1 << 16)


def manifest_limit(plan: ShardPlan) -> int:
    """The most bytes a manifest of `plan` may take (5 hashes per shard and headroom)."""
    return 400 * plan.num_shards + (1 << 16)


def shard_name(s: int) -> str:
    return f"{s:06d}"


_PREFIX = re.compile(r"(?:[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}/){1,16}")  # no '..' segment


def _hashes(raw: Any, n: int, what: str, gaps: bool = False) -> tuple[str, ...]:
    """n sha256 hex strings (`gaps`: or None, at least one not)."""
    if not isinstance(raw, list) or len(raw) != n:
        raise ProtocolError(f"{what} does not list {n} shard hashes")
    ok = [(gaps and h is None) or (isinstance(h, str) and _HEX.fullmatch(h)) for h in raw]
    if not all(ok) or (gaps and n and all(h is None for h in raw)):
        raise ProtocolError(f"{what} lists something that is not a sha256")
    return tuple(raw)


@dataclasses.dataclass(frozen=True)
class VersionManifest:
    """Where a version's shards are (`prefix`) and their hashes, per part.

    A round of a fragmented run (`diloco.fragments` F > 1) writes only its fragment's shards;
    the others stay where an earlier version wrote them: `origin` then names each shard's
    prefix (None: all under `prefix`), and `update` has None for the shards it left alone.
    """

    prefix: str
    plan_id: str
    params: tuple[str, ...]
    momentum: tuple[str, ...]
    server_ef: tuple[str, ...]
    update: tuple[str | None, ...] | None = None
    origin: tuple[str, ...] | None = None

    def key(self, part: str, s: int) -> str:
        if part == "update" or self.origin is None:
            return f"{self.prefix}{part}/{shard_name(s)}"
        return f"{self.origin[s]}{part}/{shard_name(s)}"

    def shard_prefix(self, s: int) -> str:
        """The prefix shard s's params, momentum and error feedback are stored under."""
        return self.prefix if self.origin is None else self.origin[s]

    def hashes(self, part: str) -> tuple[str, ...]:
        return getattr(self, part)

    def root(self, part: str) -> str:
        return root(self.hashes(part))

    def to_bytes(self) -> bytes:
        body = {
            "prefix": self.prefix,
            "plan": self.plan_id,
            **{part: list(self.hashes(part)) for part in PARTS},
            "update": None if self.update is None else list(self.update),
        }
        if self.origin is not None:  # absent otherwise: unfragmented manifests keep their bytes
            body["origin"] = list(self.origin)
        return dumps(body)

    @classmethod
    def from_bytes(cls, body: bytes, plan: ShardPlan, where: str) -> VersionManifest:
        """The manifest in `body`, checked against `plan` (ProtocolError naming `where`)."""
        try:
            obj = json.loads(body)
        except (ValueError, RecursionError):
            raise ProtocolError(f"{where} is not JSON") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prefix"), str):
            raise ProtocolError(f"{where} is not a version manifest")
        if obj.get("plan") != plan.plan_id():
            raise ProtocolError(f"{where} was cut by another shard plan")
        n = plan.num_shards
        parts = {p: _hashes(obj.get(p), n, f"{where} {p}") for p in PARTS}
        update = obj.get("update")
        update = None if update is None else _hashes(update, n, f"{where} update", gaps=True)
        origin = obj.get("origin")
        if origin is not None:
            if not isinstance(origin, list) or len(origin) != n:
                raise ProtocolError(f"{where} origin does not list {n} prefixes")
            if not all(isinstance(o, str) and _PREFIX.fullmatch(o) for o in origin):
                raise ProtocolError(f"{where} origin lists something that is not a key prefix")
            origin = tuple(origin)
        return cls(obj["prefix"], obj["plan"], **parts, update=update, origin=origin)


@dataclasses.dataclass(frozen=True)
class ContribManifest:
    """The body of a contribution object: its spec and shards (sha256, stored bytes); None
    for a shard the round does not sync (a fragmented run pushes one fragment a round)."""

    spec: str
    plan_id: str
    shards: tuple[tuple[str, int] | None, ...]

    def present(self) -> tuple[int, ...]:
        """The shards this contribution carries."""
        return tuple(s for s, entry in enumerate(self.shards) if entry is not None)

    def to_bytes(self) -> bytes:
        return dumps({"spec": self.spec, "plan": self.plan_id, "shards": list(self.shards)})

    @classmethod
    def from_bytes(cls, body: bytes, plan: ShardPlan) -> ContribManifest:
        """The manifest in `body`, checked against `plan` (PayloadError naming the defect)."""
        try:
            obj = json.loads(body)
        except (ValueError, RecursionError):
            raise PayloadError("the contribution's shard manifest is not JSON") from None
        if not isinstance(obj, dict) or set(obj) != {"spec", "plan", "shards"}:
            raise PayloadError("the contribution is not a shard manifest {spec, plan, shards}")
        if obj["plan"] != plan.plan_id():
            raise PayloadError("the contribution was cut by another shard plan")
        shards = obj["shards"]
        if not isinstance(shards, list) or len(shards) != plan.num_shards:
            raise PayloadError(f"the contribution does not list {plan.num_shards} shards")
        out: list[tuple[str, int] | None] = []
        for s, entry in enumerate(shards):
            if entry is None:
                out.append(None)
                continue
            ok = isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
            if not ok or not _HEX.fullmatch(entry[0]) or type(entry[1]) is not int:
                raise PayloadError(f"shard {s} of the contribution is not [sha256, bytes]")
            if not 0 < entry[1] <= shard_limit(plan, s):
                raise PayloadError(f"shard {s} claims {entry[1]} bytes")
            out.append((entry[0], entry[1]))
        if shards and all(entry is None for entry in out):
            raise PayloadError("the contribution carries no shard")
        if not isinstance(obj["spec"], str):
            raise PayloadError("the contribution's spec is not a string")
        return cls(obj["spec"], obj["plan"], tuple(out))


def read_shard(store: ObjectStore, key: str, want_sha256: str | None, limit: int) -> bytes:
    """The object at `key` (a shard or manifest), bounded by `limit` and, given
    `want_sha256`, matching it; ProtocolError if it is missing, damaged or different."""
    try:
        body = store.get(key, max_bytes=limit)
    except CorruptObject as e:
        raise ProtocolError(str(e)) from None
    if body is None:
        raise ProtocolError(f"{key} is missing")
    if want_sha256 is not None and sha256(body) != want_sha256:
        raise ProtocolError(f"{key} does not match its recorded sha256")
    return body


def decode_shard(body: bytes, plan: ShardPlan, s: int, where: str, fp32: bool) -> list[np.ndarray]:
    """The pieces of shard `s` a payload holds (`fp32`: only an fp32 payload is accepted);
    PayloadError naming `where` on any defect."""
    payload = Payload.from_bytes(body, max_elements=plan.shard_elements(s))
    if fp32 and payload.spec.format != "fp32":
        raise PayloadError(f"{where} is stored as {payload.spec}, expected fp32")
    return decode(payload, like=plan.shard_like(s))
