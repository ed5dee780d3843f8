"""Global versions: the numpy outer step, versions in memory and in the store, `latest`."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import numpy as np

from near_jax.diloco.protocol.keys import (
    ProtocolError,
    decision_key,
    latest_key,
    manifest_key,
    version_key,
)
from near_jax.diloco.protocol.objects import (
    dumps,
    get_tree_object,
    read_json,
    sha256,
    tree_bytes,
    tree_from_bytes,
)
from near_jax.diloco.store import ObjectStore

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
    """Global version v as held in memory: θ_v, m_v (and the aggregator's server_ef)."""

    version: int
    params: Any
    momentum: Any
    server_ef: Any = None
    params_sha256: str = ""
    momentum_sha256: str = ""
    server_ef_sha256: str = ""

    def hashes(self) -> dict[str, str]:
        out = {"params_sha256": self.params_sha256, "momentum_sha256": self.momentum_sha256}
        if self.server_ef_sha256:
            out["server_ef_sha256"] = self.server_ef_sha256
        return out


def make_version(version: int, params: Any, momentum: Any, server_ef: Any = None) -> Version:
    v = Version(version, params, momentum, server_ef)
    v.params_sha256 = sha256(tree_bytes(params))
    v.momentum_sha256 = sha256(tree_bytes(momentum))
    if server_ef is not None:
        v.server_ef_sha256 = sha256(tree_bytes(server_ef))
    return v


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


def pull_version(
    store: ObjectStore, run: str, version: int, like: Any, with_server_ef: bool = False
) -> Version:
    """Reads version v in full and checks it against its recorded hashes."""
    hashes = version_hashes(store, run, version)
    parts = ["params", "momentum"] + (["server_ef"] if with_server_ef else [])
    trees = {}
    for part in parts:
        key = version_key(run, version, part)
        body = get_tree_object(store, key, like)
        if body is None:
            raise ProtocolError(f"{key} is missing")
        if sha256(body) != hashes[f"{part}_sha256"]:
            raise ProtocolError(f"{key} does not match its recorded sha256")
        trees[part] = tree_from_bytes(body, like, key)
    out = Version(version, trees["params"], trees["momentum"], trees.get("server_ef"))
    out.params_sha256, out.momentum_sha256 = hashes["params_sha256"], hashes["momentum_sha256"]
    out.server_ef_sha256 = hashes.get("server_ef_sha256", "") if with_server_ef else ""
    return out


def write_version(store: ObjectStore, run: str, v: Version) -> None:
    """Writes versions/v/{params, momentum, server_ef} (deterministic bytes)."""
    store.put(version_key(run, v.version, "params"), tree_bytes(v.params))
    store.put(version_key(run, v.version, "momentum"), tree_bytes(v.momentum))
    if v.server_ef is not None:
        store.put(version_key(run, v.version, "server_ef"), tree_bytes(v.server_ef))


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
