"""Contributions: an island's sharded, tagged pseudo-gradient, and the aggregator's verdict.

The object at `contrib_key` is u32 tag length | tag JSON | shard manifest JSON
(`manifests.ContribManifest`); its shards are at `contrib_shard_key(..., s)`. The shards are
written first, the manifest last (put_if_absent), so a contribution exists only once it is
complete, and a signature over (tag, manifest) covers every shard.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from near_jax._io import one_line
from near_jax.diloco.codec.compress import (
    CompressionSpec,
    Payload,
    PayloadError,
    as_spec,
    decode,
    encode,
)
from near_jax.diloco.protocol.keys import FORMAT, ProtocolError, contrib_key, contrib_shard_key
from near_jax.diloco.protocol.manifests import (
    ContribManifest,
    manifest_limit,
    read_shard,
)
from near_jax.diloco.protocol.objects import dumps, sha256
from near_jax.diloco.protocol.shards import ShardPlan
from near_jax.diloco.protocol.versions import Shards, Version
from near_jax.diloco.store import HEADER, CorruptObject, ObjectStore

_TAG_LEN = struct.Struct("<I")
MAX_TAG_BYTES = 1 << 16


def pack_contribution(tag: dict, body: bytes) -> bytes:
    """u32 tag length | tag JSON | body (the shard manifest)."""
    tag_bytes = dumps(tag)
    return _TAG_LEN.pack(len(tag_bytes)) + tag_bytes + body


def split_contribution(body: bytes) -> tuple[dict, bytes]:
    """(tag, manifest bytes) of a contribution object, the manifest not yet parsed."""
    if len(body) < _TAG_LEN.size:
        raise PayloadError("contribution shorter than its tag length")
    (n,) = _TAG_LEN.unpack_from(body)
    if n > MAX_TAG_BYTES or _TAG_LEN.size + n > len(body):
        raise PayloadError(f"contribution tag claims {n} bytes")
    try:
        tag = json.loads(body[_TAG_LEN.size : _TAG_LEN.size + n])
    except (ValueError, RecursionError) as e:  # RecursionError: absurdly nested JSON
        raise PayloadError(f"contribution tag is not JSON: {str(e)[:200]}") from None
    if not isinstance(tag, dict):
        raise PayloadError("contribution tag is not a JSON object")
    return tag, body[_TAG_LEN.size + n :]


def contribution_limit(plan: ShardPlan) -> int:
    """The most bytes a contribution object (tag and manifest) may take."""
    return _TAG_LEN.size + MAX_TAG_BYTES + manifest_limit(plan)


def push_shards(
    store: ObjectStore,
    run: str,
    rnd: int,
    island: str,
    plan: ShardPlan,
    delta: Shards,
    spec: CompressionSpec | str,
    error_feedback: Shards | None = None,
    write: bool = True,
) -> tuple[dict[int, tuple[str, int]], int, Shards]:
    """Encodes and writes the given shards of Δ (a host of a multi-host island: its own);
    returns ({shard: (sha256, bytes)}, bytes written, new error feedback of those shards).
    write=False only encodes and hashes (what a contributor commits to before anything is
    visible; encoding is deterministic, so the shards written later hash the same)."""
    entries, written, new_ef = {}, 0, {}
    for s, pieces in sorted(delta.items()):
        ef = None if error_feedback is None else error_feedback.get(s)
        payload, new_ef[s] = encode(pieces, spec, error_feedback=ef)
        body = payload.to_bytes()
        if write:
            written += store.put(contrib_shard_key(run, rnd, island, s), body)
        entries[s] = (sha256(body), len(body))
    return entries, written, new_ef


def put_contribution(
    store: ObjectStore, run: str, island: str, base: Version, body: bytes
) -> tuple[bool, int]:
    """Writes a contribution object (`contribution_body`) unless the island's slot for the
    round is taken; (written, bytes)."""
    written = store.put_if_absent(contrib_key(run, base.version, island), body)
    return written, (len(body) + HEADER.size if written else 0)


def contribution_body(
    run: str,
    island: str,
    base: Version,
    plan: ShardPlan,
    spec: CompressionSpec | str,
    entries: dict[int, tuple[str, int]],
    sign: Callable[[dict, bytes], dict] | None = None,
    shards: Iterable[int] | None = None,
    **extra: Any,
) -> bytes:
    """The contribution object of these shard entries: its tag (signed by `sign`, which
    sees the tag and the manifest bytes) and shard manifest."""
    wanted = set(range(plan.num_shards) if shards is None else shards)
    if set(entries) != wanted:
        missing = sorted(wanted ^ set(entries))
        raise ValueError(f"cannot write the manifest: shards {missing[:8]} do not match the round")
    spec_text = str(as_spec(spec))
    manifest = ContribManifest(
        spec_text, plan.plan_id(), tuple(entries.get(s) for s in range(plan.num_shards))
    )
    tag = {
        "format": FORMAT,
        "run": run,
        "round": base.version,
        "island": island,
        "base_sha256": base.params_sha256,
        "spec": spec_text,
        **extra,
    }
    data = manifest.to_bytes()
    if sign is not None:
        tag.update(sign(tag, data))
    return pack_contribution(tag, data)


def push_contribution(
    store: ObjectStore,
    run: str,
    island: str,
    base: Version,
    plan: ShardPlan,
    delta: Shards,
    spec: CompressionSpec | str,
    error_feedback: Shards | None = None,
    sign: Callable[[dict, bytes], dict] | None = None,
    **extra: Any,
) -> tuple[bool, int, Shards]:
    """Pushes every shard of Δ (all, or the round's fragment), then the manifest;
    (written, bytes, new error feedback). With `sign`, the contribution is signed first
    (the shards encoded and hashed, not written), so a signer that commits to the payload
    (contrib's) does so before any of it is visible: nobody can copy it and commit first.

    Nothing is written if the island's slot for the round is taken already (pushed before
    a restart): its shards then stay as the manifest there names them."""
    if store.exists(contrib_key(run, base.version, island)):
        return False, 0, {}
    body = None
    if sign is not None:  # signed (and committed to) before any of it is visible
        entries, _, _ = push_shards(
            store, run, base.version, island, plan, delta, spec, error_feedback, write=False
        )
        body = contribution_body(
            run, island, base, plan, spec, entries, sign, shards=sorted(delta), **extra
        )
    written_entries, shard_bytes, new_ef = push_shards(
        store, run, base.version, island, plan, delta, spec, error_feedback
    )
    if body is None:
        body = contribution_body(
            run, island, base, plan, spec, written_entries, shards=sorted(delta), **extra
        )
    elif written_entries != entries:
        raise ProtocolError(f"{island}: its shards encoded differently twice (not deterministic)")
    written, manifest_bytes = put_contribution(store, run, island, base, body)
    return written, (shard_bytes + manifest_bytes if written else 0), new_ef


@dataclasses.dataclass
class Verdict:
    """The aggregator's view of one contribution object."""

    key: str
    island: str
    sha256: str = ""
    manifest: ContribManifest | None = None
    reason: str = ""  # why it was rejected ("" = valid)
    tag: dict = dataclasses.field(default_factory=dict)

    @property
    def valid(self) -> bool:
        return self.manifest is not None


class ShardDefect(RuntimeError):  # noqa: N818 - a verdict on a contribution, not a bug
    """A contribution shard that is missing, changed or undecodable (found while streaming)."""

    def __init__(self, island: str, reason: str):
        super().__init__(f"{island}: {reason}")
        self.island, self.reason = island, reason


def read_delta_shard(
    store: ObjectStore, run: str, rnd: int, plan: ShardPlan, verdict: Verdict, s: int
) -> list[np.ndarray]:
    """Shard `s` of an accepted contribution, verified against its manifest's hash (so it
    is exactly what was checked and signed) and decoded; ShardDefect if bad."""
    key = contrib_shard_key(run, rnd, verdict.island, s)
    entry = verdict.manifest.shards[s]
    if entry is None:
        raise ShardDefect(verdict.island, f"invalid: it does not carry shard {s}")
    sha, nbytes = entry
    try:
        body = read_shard(store, key, sha, nbytes + (1 << 10))
        payload = Payload.from_bytes(body, max_elements=plan.shard_elements(s))
        if str(payload.spec) != verdict.manifest.spec:
            raise PayloadError(f"it is {payload.spec}, the manifest says {verdict.manifest.spec}")
        with np.errstate(over="ignore", invalid="ignore"):  # reported below
            pieces = decode(payload, like=plan.shard_like(s))
    except (PayloadError, ProtocolError) as e:
        raise ShardDefect(verdict.island, f"invalid: shard {s}: {one_line(e)}") from None
    for i, x in enumerate(pieces):
        if not np.isfinite(x).all():
            raise ShardDefect(verdict.island, f"invalid: non-finite values in shard {s} piece {i}")
    return pieces


def read_delta(
    store: ObjectStore,
    run: str,
    rnd: int,
    plan: ShardPlan,
    verdict: Verdict,
    shards: Iterable[int] | None = None,
) -> Shards:
    """The given shards (all it carries by default) of a valid contribution; ShardDefect if
    one is bad."""
    wanted = verdict.manifest.present() if shards is None else shards
    return {s: read_delta_shard(store, run, rnd, plan, verdict, s) for s in wanted}


def read_contribution(
    store: ObjectStore, run: str, rnd: int, plan: ShardPlan, island: str, sha: str | None = None
) -> Any:
    """An island's whole Δ for round `rnd` as a float32 tree (tests, benchmarks: the
    validator streams shards instead); None if there is none or (given `sha`) it is not
    that object. PayloadError if its manifest is bad, ShardDefect if a shard is."""
    key = contrib_key(run, rnd, island)
    body = store.get(key, max_bytes=contribution_limit(plan))
    if body is None or (sha is not None and sha256(body) != sha):
        return None
    _, data = split_contribution(body)
    verdict = Verdict(key, island, sha256(body), ContribManifest.from_bytes(data, plan))
    return plan.assemble(read_delta(store, run, rnd, plan, verdict))


def check_contribution(
    store: ObjectStore,
    run: str,
    base: Version,
    plan: ShardPlan,
    key: str,
    shards: Iterable[int] | None = None,
) -> Verdict:
    """Reads and validates one contribution object (tag and shard manifest) for round
    base.version, which syncs `shards` (all by default); its shards are checked as they
    are streamed (`read_delta_shard`). Never raises on its content: a defect becomes the
    verdict's reason."""
    island = key.rsplit("/", 1)[-1]
    verdict = Verdict(key, island)
    try:
        body = store.get(key, max_bytes=contribution_limit(plan))
    except CorruptObject as e:
        verdict.reason = f"corrupt object: {e.reason}"
        return verdict
    if body is None:
        verdict.reason = "vanished before it could be read"
        return verdict
    verdict.sha256 = sha256(body)
    try:
        tag, data = split_contribution(body)
        verdict.tag = tag
        want = {"run": run, "round": base.version, "island": island}
        for name, value in want.items():
            if tag.get(name) != value:
                raise PayloadError(f"tag {name}={tag.get(name)!r:.80}, the key says {value!r}")
        if tag.get("base_sha256") != base.params_sha256:
            raise PayloadError(
                f"built on base {str(tag.get('base_sha256'))[:12]!r}, round {base.version} "
                f"starts from {base.params_sha256[:12]!r}"
            )
        manifest = ContribManifest.from_bytes(data, plan)
        as_spec(manifest.spec)
        wanted = tuple(range(plan.num_shards) if shards is None else shards)
        if manifest.present() != wanted:
            raise PayloadError(
                f"it carries {len(manifest.present())} shards, not the {len(wanted)} round "
                f"{base.version} syncs (shards {wanted[0]}..{wanted[-1]})"
            )
    except (PayloadError, ValueError) as e:
        verdict.reason = f"invalid: {one_line(e)}"
        return verdict
    verdict.manifest = manifest
    return verdict
