"""Global versions: the numpy outer step, sharded versions in memory and in the store,
resumable shard-by-shard pulls, and `latest`."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np

from near_jax._io import atomic_write
from near_jax.diloco.protocol.keys import (
    ProtocolError,
    decision_key,
    latest_key,
    manifest_key,
    version0_prefix,
)
from near_jax.diloco.protocol.manifests import (
    PARTS,
    VersionManifest,
    decode_shard,
    manifest_limit,
    read_shard,
    shard_limit,
)
from near_jax.diloco.protocol.objects import dumps, read_json, sha256, tree_bytes
from near_jax.diloco.protocol.shards import ShardPlan
from near_jax.diloco.store import ObjectStore

Shards = dict[int, list[np.ndarray]]  # shard index -> its pieces (float32)

# ---------------------------------------------------------------------------- outer step


def outer_update(params: Any, momentum: Any, update: Any, lr: float, mu: float) -> tuple[Any, Any]:
    """(θ', m') = one SGD step with Nesterov momentum in numpy float32.

    The same operations, in the same order, as `outer.outer_step(outer_optimizer(lr, mu),
    …)`: m' = g + μ·m; u = g + μ·m' (momentum 0: u = g, m' = m); θ' = θ + (−lr)·u.
    """
    step, decay = np.float32(-lr), np.float32(mu)

    def momentum_leaf(g, m):
        return g + decay * m if mu else m

    def params_leaf(p, g, m_new):
        u = g + decay * m_new if mu else g
        return p + step * u

    new_m = jax.tree.map(momentum_leaf, update, momentum)
    return jax.tree.map(params_leaf, params, update, new_m), new_m


def average(deltas: list[Any]) -> Any:
    """Mean of the trees in order, in float32: ((d₀ + d₁) + …) / n."""
    total = deltas[0]
    for delta in deltas[1:]:
        total = jax.tree.map(np.add, total, delta)
    n = np.float32(len(deltas))
    return jax.tree.map(lambda x: (x / n).astype(np.float32), total)


# -------------------------------------------------------------------------- version state


@dataclasses.dataclass
class Version:
    """Global version v: its manifest (where its shards are, their hashes) and the shards
    of it this party holds in memory (an island: all of its shards; the aggregator: none,
    it streams them from the store)."""

    version: int
    manifest: VersionManifest
    manifest_key: str
    manifest_sha256: str
    params: Shards = dataclasses.field(default_factory=dict)
    momentum: Shards = dataclasses.field(default_factory=dict)

    @property
    def params_sha256(self) -> str:
        return self.manifest.root("params")

    @property
    def momentum_sha256(self) -> str:
        return self.manifest.root("momentum")

    def hashes(self) -> dict[str, str]:
        """What `latest` and decisions record of this version."""
        return {
            "params_sha256": self.params_sha256,
            "momentum_sha256": self.momentum_sha256,
            "server_ef_sha256": self.manifest.root("server_ef"),
            "manifest": self.manifest_key,
            "manifest_sha256": self.manifest_sha256,
        }

    def tree(self, plan: ShardPlan, part: str = "params") -> Any:
        """The full float32 tree of a part this party holds every shard of."""
        return plan.assemble(getattr(self, part))


def write_manifest(store: ObjectStore, key: str, manifest: VersionManifest) -> str:
    """Writes a version manifest (deterministic bytes); returns its sha256."""
    body = manifest.to_bytes()
    store.put(key, body)
    return sha256(body)


def write_version0(store: ObjectStore, run: str, plan: ShardPlan, params0: Any) -> dict[str, str]:
    """Stores version 0 (params0, zero momentum and error feedback) shard by shard, each
    object first-writer-wins, and returns the hashes run.json records: a racing or
    restarted aggregator with other params agrees on what the store holds."""
    prefix = version0_prefix(run)
    hashes: dict[str, list[str]] = {part: [] for part in PARTS}
    pieces = plan.split(params0)
    for s in range(plan.num_shards):
        zeros = [np.zeros(x.shape, np.float32) for x in pieces[s]]
        for part, tree in (("params", pieces[s]), ("momentum", zeros), ("server_ef", zeros)):
            key = f"{prefix}{part}/{s:06d}"
            body = tree_bytes([np.asarray(x, np.float32) for x in tree])
            if not store.put_if_absent(key, body):
                body = store.get(key, max_bytes=shard_limit(plan, s))
            hashes[part].append(sha256(body))
    manifest = VersionManifest(prefix, plan.plan_id(), **{p: tuple(h) for p, h in hashes.items()})
    key = prefix + "manifest"
    if not store.put_if_absent(key, manifest.to_bytes()):
        manifest = VersionManifest.from_bytes(store.get(key, manifest_limit(plan)), plan, key)
    return Version(0, manifest, key, sha256(manifest.to_bytes())).hashes()


def version_hashes(store: ObjectStore, run: str, version: int) -> dict[str, str]:
    """The recorded hashes of version v: run.json's for 0, else decision v−1's result."""
    if version == 0:
        manifest = read_json(store, manifest_key(run))
        if manifest is None:
            raise ProtocolError(f"run {run!r} has no {manifest_key(run)}")
        return manifest["version0"]
    decision = read_json(store, decision_key(run, version - 1))
    if decision is None:
        raise ProtocolError(f"version {version} has no decision {decision_key(run, version - 1)}")
    return decision["result"]


def load_version(
    store: ObjectStore, run: str, version: int, plan: ShardPlan, hashes: dict | None = None
) -> Version:
    """Version v's manifest, checked against its recorded hashes; no shard is read."""
    hashes = hashes or version_hashes(store, run, version)
    key, want = hashes.get("manifest"), hashes.get("manifest_sha256")
    if not isinstance(key, str) or not isinstance(want, str):
        raise ProtocolError(f"version {version}'s record names no manifest")
    body = read_shard(store, key, want, manifest_limit(plan))
    manifest = VersionManifest.from_bytes(body, plan, key)
    v = Version(version, manifest, key, want)
    recorded = {k: hashes.get(k) for k in ("params_sha256", "momentum_sha256")}
    if {k: v.hashes()[k] for k in recorded} != recorded:
        raise ProtocolError(f"{key} does not give version {version}'s recorded hashes")
    return v


class PullCache:
    """Shard bodies already fetched and verified, by sha256: a pull that stops (a store
    error, a kill) resumes from them instead of reading those shards again. In memory, or
    in `directory` (files named by their sha256, written atomically) so it survives a
    restart; `clear` drops it once a pull is done."""

    def __init__(self, directory: str | None = None):
        self.directory, self._memory = directory, {}
        if directory:
            os.makedirs(directory, exist_ok=True)

    def get(self, sha: str) -> bytes | None:
        if not self.directory:
            return self._memory.get(sha)
        try:
            with open(os.path.join(self.directory, sha), "rb") as f:
                body = f.read()
        except FileNotFoundError:
            return None
        return body if sha256(body) == sha else None  # a damaged file is fetched again

    def put(self, sha: str, body: bytes) -> None:
        if self.directory:
            atomic_write(os.path.join(self.directory, sha), body)
        else:
            self._memory[sha] = body

    def clear(self) -> None:
        self._memory.clear()
        if self.directory:
            for name in os.listdir(self.directory):
                os.remove(os.path.join(self.directory, name))


def fetch_shard(
    store: ObjectStore, key: str, sha: str, limit: int, cache: PullCache | None
) -> bytes:
    """A verified shard body: from `cache` if it has it, else from the store (then cached)."""
    body = cache.get(sha) if cache is not None else None
    if body is None:
        body = read_shard(store, key, sha, limit)
        if cache is not None:
            cache.put(sha, body)
    return body


def pull_version(
    store: ObjectStore,
    run: str,
    version: int,
    plan: ShardPlan,
    shards: Iterable[int] | None = None,
    cache: PullCache | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Version:
    """Version v's params and momentum, shard by shard (`shards`: the ones this party
    holds; all by default), each checked against the manifest. With a `cache`, shards
    fetched by an earlier, interrupted pull are not read again."""
    held = load_version(store, run, version, plan)
    wanted = list(range(plan.num_shards) if shards is None else shards)
    for done, s in enumerate(wanted, 1):
        for part in ("params", "momentum"):
            key, sha = held.manifest.key(part, s), held.manifest.hashes(part)[s]
            body = fetch_shard(store, key, sha, shard_limit(plan, s), cache)
            try:
                getattr(held, part)[s] = decode_shard(body, plan, s, key, fp32=True)
            except ValueError as e:  # PayloadError: a shard that hashes right but is bad
                raise ProtocolError(f"{key}: {e}") from None
        if progress is not None:
            progress(done, len(wanted))
    if cache is not None:
        cache.clear()
    return held


def read_latest(store: ObjectStore, run: str) -> dict | None:
    return read_json(store, latest_key(run))


def advance_latest(store: ObjectStore, run: str, v: Version, now: float) -> None:
    """Moves `latest` to v unless it already points at v or later (compare-and-swap)."""
    body = dumps({"version": v.version, "published_at": now, **v.hashes()})
    while True:
        current, generation = store.get_with_generation(latest_key(run))
        if current is not None and _version_in(current) >= v.version:
            return
        if store.put_if_generation(latest_key(run), body, generation):
            return


def _version_in(latest: bytes) -> int:
    """The version a stored `latest` names; -1 for one that names none (it is replaced)."""
    try:
        version = json.loads(latest).get("version")
    except (ValueError, AttributeError, RecursionError):
        return -1
    return version if isinstance(version, int) and not isinstance(version, bool) else -1
