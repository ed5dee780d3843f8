"""The round protocol of DiLoCo across islands that share only an object store.

Islands never talk to each other or to the aggregator: everything goes through framed,
validated objects (`store.py`). Round r starts from global version r (θ_r and the outer
momentum m_r); each island trains H inner steps from θ_r and pushes Δ = θ_r − θ_island; the
aggregator closes the round and publishes version r + 1.

Keys (under `RUN/`, r and v zero-padded to 8 digits; JSON objects are UTF-8, sorted keys)
---------------------------------------------------------------------------------------
    run.json                      manifest: spec, outer lr/momentum, H, model config, hashes
                                  of version 0. Aggregator, put_if_absent (creates the run).
    latest                        {"version": v, "params_sha256", "momentum_sha256",
                                  "published_at"}: the newest complete version. Aggregator,
                                  moved forward only (compare-and-swap), written last.
    finished                      {"version": N, ...}: the run is over. Aggregator.
    versions/v/params             θ_v, full fp32 (a compress.Payload with spec fp32): joiners
    versions/v/momentum           m_v, the outer Nesterov trace, fp32 (islands need it too)
    versions/v/server_ef          the aggregator's error feedback of the update codec, fp32
    rounds/r/contrib/ISLAND       an island's Δ for round r: u32 length | JSON tag {run,
                                  round, island, base_sha256 = sha256 of θ_r, inner_loss, …}
                                  | compressed payload. The island, put_if_absent (immutable).
    rounds/r/decision             the COMMIT POINT of round r: which contributions were
                                  applied (key + sha256 of the object), which were rejected
                                  and why, which pushes to earlier rounds arrived late, why
                                  the round closed (quorum / deadline), and the sha256 of
                                  version r + 1. Aggregator, put_if_absent. Runs of
                                  untrusted contributors add the aggregation rule (replays
                                  combine with it), every contribution's ledger entry, the
                                  seed reveal and the aggregator's signature
                                  (`near_jax/contrib/validator.py`).
    rounds/r/update               Û_r: the mean of the applied Δ in fp32, compressed with the
                                  run's spec (with the aggregator's error feedback) and
                                  decoded again: what every party applies. Absent when no
                                  contribution was applied.

Who computes what (determinism)
-------------------------------
Version r + 1 is a pure function of version r and decision r: decode the applied
contributions, sum them in island-id order in float32, divide by their count, encode with
the run's spec and `server_ef` (→ Û_r and the new server_ef), then the outer step
`outer_update` in numpy float32 — SGD with Nesterov momentum, bit-identical to
`outer.outer_optimizer` + `outer.outer_step` (tests check it). Numpy's elementwise float32
add/multiply are correctly rounded IEEE operations, so every machine gets the same bits.
A round with no applied contribution publishes version r + 1 = version r unchanged (no
step, so momentum does not move the params).

Islands keep θ_r and m_r in host memory and follow the run by pulling only Û_r each round
(`apply_update`), then check sha256(θ_{r+1}) and sha256(m_{r+1}) against the decision; on a
mismatch, or when more than MAX_CHAIN versions behind, or when (re)starting, they pull the
full version (`pull_version`), checked against its recorded hashes (run.json for version 0,
else the decision that produced it).

Crash safety (aggregator)
-------------------------
Closing round r: validate contributions → compute version r + 1 in memory → write the
decision (put_if_absent; commit point) → write update, versions/r+1/* → move `latest`. A
restarted aggregator loads version `latest` = r from the store; if decision r exists it
re-reads the recorded contributions (checking their sha256), recomputes — identical bytes,
checked against the decision's hashes — rewrites the derived objects and moves `latest`:
the round is applied exactly once, always to version r. Before the decision nothing is
committed and the round simply continues. The outer momentum and error feedback live in
versions/v/, so they survive restarts. If two aggregators race, put_if_absent makes one
decision win and the other finishes from it.

Planted objects (slots only the aggregator writes)
--------------------------------------------------
Anyone with write access to the store can put an object in `rounds/r/decision` or `latest`.
The aggregator reads those slots only through `quarantine.read_own`: an object that is torn,
not JSON, not shaped like what it writes (wrong run/round/base, missing fields), does not
replay to its recorded hashes (trusted runs) or is not signed by its key (contributor runs)
is moved to `quarantine/<key>.<ms>` (raw bytes kept as evidence, deleted only if unchanged
meanwhile) with a warning naming both keys; the round is then decided again and `latest` is
rebuilt from the newest version that verifies. Islands treat an unreadable decision or
`latest` as "not there yet": they warn once and keep waiting. Reads of anything another
party can write are bounded (`object_limit`, `store.MAX_OBJECT_BYTES`); file stores refuse
links.

Late, invalid and restarted islands
-----------------------------------
Each contribution names its round in its key and the hash of its base version in its tag,
so it can only ever be applied to that version. Pushes that land after round r's decision
are listed as late in a later decision (looking back LATE_WINDOW rounds) and never applied.
A contribution that is corrupt, untagged, mis-tagged, built on another base, shaped unlike
the params, or non-finite is rejected with its reason in the decision.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import struct
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from near_jax._io import one_line
from near_jax.diloco.codec.compress import CompressionSpec, Payload, PayloadError, decode, encode
from near_jax.diloco.store import HEADER, MAX_OBJECT_BYTES, CorruptObject, ObjectStore

FORMAT = 1
LATE_WINDOW = 8  # a decision lists late pushes to the previous LATE_WINDOW rounds
MAX_CHAIN = 4  # an island this many versions behind or fewer applies updates, else pulls
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_TAG_LEN = struct.Struct("<I")
MAX_TAG_BYTES = 1 << 16


class ProtocolError(RuntimeError):
    """The store holds something the protocol cannot continue from (one line)."""


def check_name(kind: str, name: str) -> str:
    """A run or island name: 1-64 of [A-Za-z0-9._-], starting alphanumeric; else ValueError."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"bad {kind} name {name!r}: 1-64 of [A-Za-z0-9._-], alphanumeric first")
    return name


# ----------------------------------------------------------------------------------- keys


def manifest_key(run: str) -> str:
    return f"{run}/run.json"


def latest_key(run: str) -> str:
    return f"{run}/latest"


def finished_key(run: str) -> str:
    return f"{run}/finished"


def version_key(run: str, version: int, part: str) -> str:
    return f"{run}/versions/{version:08d}/{part}"


def contrib_prefix(run: str, rnd: int) -> str:
    return f"{run}/rounds/{rnd:08d}/contrib/"


def contrib_key(run: str, rnd: int, island: str) -> str:
    return contrib_prefix(run, rnd) + island


def contrib_keys(store: ObjectStore, run: str, rnd: int) -> list[str]:
    """The contribution keys of round `rnd`: prefix + a valid island name. Anything else
    under the prefix (nested keys, odd names) is nobody's contribution and is ignored, so
    no object can pose as a second contribution of some island."""
    prefix = contrib_prefix(run, rnd)
    return [k for k in store.list(prefix) if _NAME.fullmatch(k[len(prefix) :])]


def decision_key(run: str, rnd: int) -> str:
    return f"{run}/rounds/{rnd:08d}/decision"


def update_key(run: str, rnd: int) -> str:
    return f"{run}/rounds/{rnd:08d}/update"


# ---------------------------------------------------------------------------- json, trees


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def read_json(store: ObjectStore, key: str, max_bytes: int = MAX_OBJECT_BYTES) -> dict | None:
    """The JSON object at `key`, None if missing; ProtocolError if it is not a JSON object
    (CorruptObject if not intact or over `max_bytes`)."""
    body = store.get(key, max_bytes=max_bytes)
    if body is None:
        return None
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError) as e:  # RecursionError: absurdly nested JSON
        raise ProtocolError(f"{key} is not JSON: {str(e)[:200]}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{key} is not a JSON object")
    return obj


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tree_bytes(tree: Any) -> bytes:
    """A float32 tree as stored: an fp32 compress.Payload (paths, shapes, exact values)."""
    return encode(tree, "fp32")[0].to_bytes()


def tree_from_bytes(body: bytes, like: Any, where: str) -> Any:
    """The float32 numpy tree stored by `tree_bytes`, checked against `like`'s structure."""
    try:
        payload = Payload.from_bytes(body, max_elements=num_elements(like))
        if payload.spec.format != "fp32":
            raise PayloadError(f"stored as {payload.spec}, expected fp32")
        return decode(payload, like=like)
    except PayloadError as e:
        raise ProtocolError(f"{where}: {e}") from None


def num_elements(tree: Any) -> int:
    return sum(math.prod(np.shape(x)) for x in jax.tree.leaves(tree))


def object_limit(like: Any) -> int:
    """The most bytes a tree object of `like`'s shape may take in the store (a version part,
    an update, a contribution): twice its fp32 size plus 1 MiB for tags and leaf paths.
    Reads of them are bounded by it (`ObjectStore.get(max_bytes=...)`)."""
    return 8 * num_elements(like) + (1 << 20)


def get_tree_object(store: ObjectStore, key: str, like: Any) -> bytes | None:
    """The body at `key`, bounded by `object_limit(like)`; ProtocolError if it is damaged."""
    try:
        return store.get(key, max_bytes=object_limit(like))
    except CorruptObject as e:
        raise ProtocolError(str(e)) from None


def zeros_like(tree: Any) -> Any:
    return jax.tree.map(lambda x: np.zeros(np.shape(x), np.float32), tree)


def as_float32(tree: Any) -> Any:
    return jax.tree.map(lambda x: np.asarray(x, np.float32), tree)


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


# -------------------------------------------------------------------------- contributions


def pack_contribution(tag: dict, payload: Payload | bytes) -> bytes:
    """u32 tag length | tag JSON | payload bytes."""
    tag_bytes = dumps(tag)
    data = payload if isinstance(payload, bytes) else payload.to_bytes()
    return _TAG_LEN.pack(len(tag_bytes)) + tag_bytes + data


def split_contribution(body: bytes) -> tuple[dict, bytes]:
    """(tag, payload bytes) of a contribution object, the payload not yet parsed."""
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


def unpack_contribution(body: bytes, max_elements: int) -> tuple[dict, Payload]:
    """(tag, validated payload); PayloadError naming the defect."""
    tag, data = split_contribution(body)
    return tag, Payload.from_bytes(data, max_elements=max_elements)


def push_contribution(
    store: ObjectStore,
    run: str,
    island: str,
    base: Version,
    delta: Any,
    spec: CompressionSpec | str,
    error_feedback: Any = None,
    sign: Callable[[dict, bytes], dict] | None = None,
    **extra: Any,
) -> tuple[bool, int, Any]:
    """Encodes Δ and writes it for round base.version; (written, bytes, new error feedback).

    `sign(tag, payload bytes)` returns more tag fields (contrib: the signature). written is
    False if this island already has a contribution for the round (e.g. pushed before a
    restart): contributions are immutable.
    """
    payload, new_ef = encode(delta, spec, error_feedback=error_feedback)
    tag = {"format": FORMAT, "run": run, "round": base.version, "island": island,
           "base_sha256": base.params_sha256, "spec": str(payload.spec), **extra}  # fmt: skip
    data = payload.to_bytes()
    if sign is not None:
        tag.update(sign(tag, data))
    body = pack_contribution(tag, data)
    written = store.put_if_absent(contrib_key(run, base.version, island), body)
    return written, (len(body) + HEADER.size if written else 0), new_ef


@dataclasses.dataclass
class Verdict:
    """The aggregator's view of one contribution object."""

    key: str
    island: str
    sha256: str = ""
    payload: Payload | None = None
    reason: str = ""  # why it was rejected ("" = valid)

    @property
    def valid(self) -> bool:
        return self.payload is not None


def check_contribution(store: ObjectStore, run: str, base: Version, key: str, like: Any) -> Verdict:
    """Reads and validates one contribution for round base.version (never raises on its
    content: a defect becomes the verdict's reason)."""
    island = key.rsplit("/", 1)[-1]
    verdict = Verdict(key, island)
    try:
        body = store.get(key, max_bytes=object_limit(like))
    except CorruptObject as e:
        verdict.reason = f"corrupt object: {e.reason}"
        return verdict
    if body is None:
        verdict.reason = "vanished before it could be read"
        return verdict
    verdict.sha256 = sha256(body)
    try:
        tag, payload = unpack_contribution(body, num_elements(like))
        want = {"run": run, "round": base.version, "island": island}
        for name, value in want.items():
            if tag.get(name) != value:
                raise PayloadError(f"tag {name}={tag.get(name)!r:.80}, the key says {value!r}")
        if tag.get("base_sha256") != base.params_sha256:
            raise PayloadError(
                f"built on base {str(tag.get('base_sha256'))[:12]!r}, round {base.version} "
                f"starts from {base.params_sha256[:12]!r}"
            )
        with np.errstate(over="ignore", invalid="ignore"):  # reported below, per leaf
            delta = decode(payload, like=like)  # tree/shape mismatch → PayloadError
        for path, leaf in jax.tree_util.tree_flatten_with_path(delta)[0]:
            if not np.isfinite(leaf).all():
                raise PayloadError(f"non-finite values in {jax.tree_util.keystr(path)}")
    except PayloadError as e:
        verdict.reason = f"invalid: {one_line(e)}"
        return verdict
    verdict.payload = payload
    return verdict


# -------------------------------------------------------------------------------- rounds


def derive(
    base: Version, payloads: list[Payload], spec: CompressionSpec | str, lr: float, mu: float,
    like: Any, combine: Callable[[list[Any]], Any] = average,
) -> tuple[Version, bytes | None]:  # fmt: skip
    """Version base+1 and the update's stored bytes from the applied payloads (in order),
    combined by `combine` (the mean; contrib passes its robust rules).

    No payloads: version base+1 = base (params, momentum and error feedback unchanged).
    """
    if not payloads:
        same = dataclasses.replace(base, version=base.version + 1)
        return same, None
    mean = combine([decode(p, like=like) for p in payloads])
    update_payload, server_ef = encode(mean, spec, error_feedback=base.server_ef)
    update = decode(update_payload, like=like)
    params, momentum = outer_update(base.params, base.momentum, update, lr, mu)
    new = make_version(base.version + 1, params, momentum, server_ef)
    return new, update_payload.to_bytes()


def combiner(decision: dict) -> Callable[[list[Any]], Any]:
    """How decision's applied contributions are combined: the mean, or the robust rule it
    names in "aggregation" (contributor runs; `near_jax.diloco.robust`)."""
    rule = decision.get("aggregation")
    if rule is None:
        return average
    from near_jax.diloco import robust

    try:
        parsed = robust.Rule.parse(rule)
    except ValueError as e:
        raise ProtocolError(f"round {decision.get('round')}: {e}") from None
    return lambda deltas: robust.combine(parsed, deltas)


def make_decision(
    run: str,
    base: Version,
    new: Version,
    verdicts: list[Verdict],
    late: list[dict],
    reason: str,
    update: bytes | None,
    now: float,
    **extra: Any,
) -> dict:
    """The decision object of round base.version (see the module docstring); `extra` adds
    fields (contrib: the aggregation rule, scores, the revealed seed)."""
    accepted = sorted((v for v in verdicts if v.valid), key=lambda v: v.island)
    rejected = sorted((v for v in verdicts if not v.valid), key=lambda v: v.island)
    return {
        **extra,
        "format": FORMAT,
        "run": run,
        "round": base.version,
        "base_sha256": base.params_sha256,
        "reason": reason,
        "closed_at": now,
        "accepted": [{"island": v.island, "key": v.key, "sha256": v.sha256} for v in accepted],
        "rejected": [{"island": v.island, "key": v.key, "reason": v.reason} for v in rejected],
        "late": late,
        "update_sha256": sha256(update) if update is not None else None,
        "result": {"version": new.version, **new.hashes()},
    }


def replay_decision(
    store: ObjectStore, run: str, base: Version, decision: dict, spec, lr, mu, like
) -> tuple[Version, bytes | None]:
    """Recomputes version r+1 from a recorded decision and checks it against its hashes."""
    r = base.version
    if decision.get("round") != r or decision.get("base_sha256") != base.params_sha256:
        raise ProtocolError(f"decision of round {r} does not start from version {r}")
    payloads = []
    for entry in decision["accepted"]:
        body = get_tree_object(store, entry["key"], like)
        if body is None or sha256(body) != entry["sha256"]:
            raise ProtocolError(f"{entry['key']}, applied in round {r}, is missing or changed")
        payloads.append(unpack_contribution(body, num_elements(like))[1])
    new, update = derive(base, payloads, spec, lr, mu, like, combiner(decision))
    if new.hashes() != {k: v for k, v in decision["result"].items() if k != "version"}:
        raise ProtocolError(f"recomputing round {r} does not reproduce its recorded result")
    return new, update


def publish(
    store: ObjectStore, run: str, rnd: int, new: Version, update: bytes | None, now: float
) -> None:
    """Writes the objects derived from decision `rnd`, then moves `latest` (idempotent)."""
    if update is not None:
        store.put(update_key(run, rnd), update)
    write_version(store, run, new)
    advance_latest(store, run, new, now)


# -------------------------------------------------------------------------- island side


def apply_update(
    store: ObjectStore, run: str, held: Version, spec, lr: float, mu: float, like: Any
) -> Version:
    """Version held+1 from held and the published update of round held.version; checks the
    result against the decision's hashes (ProtocolError on any mismatch)."""
    r = held.version
    decision = read_json(store, decision_key(run, r))
    if decision is None:
        raise ProtocolError(f"round {r} has no decision yet")
    if decision.get("base_sha256") != held.params_sha256:
        raise ProtocolError(f"round {r} was decided on another base")
    result = decision["result"]
    if decision["update_sha256"] is None:
        new = dataclasses.replace(held, version=r + 1)
    else:
        body = get_tree_object(store, update_key(run, r), like)
        if body is None or sha256(body) != decision["update_sha256"]:
            raise ProtocolError(f"{update_key(run, r)} is missing or does not match")
        update = tree_from_bytes_any(body, like, update_key(run, r))
        params, momentum = outer_update(held.params, held.momentum, update, lr, mu)
        new = make_version(r + 1, params, momentum)
    if (new.params_sha256, new.momentum_sha256) != (
        result["params_sha256"],
        result["momentum_sha256"],
    ):
        raise ProtocolError(f"applying update {r} locally does not give version {r + 1}'s hash")
    return new


def tree_from_bytes_any(body: bytes, like: Any, where: str) -> Any:
    """Decodes a payload of any spec against `like` (ProtocolError on defects)."""
    try:
        return decode(Payload.from_bytes(body, max_elements=num_elements(like)), like=like)
    except PayloadError as e:
        raise ProtocolError(f"{where}: {e}") from None


def verify_run(store: ObjectStore, run: str, like: Any) -> list[str]:
    """Replays the whole run from version 0: every stored version must equal the previous one
    plus its decision, applied once. Returns the problems found ([] = consistent)."""
    manifest = read_json(store, manifest_key(run))
    if manifest is None:
        return [f"no {manifest_key(run)}"]
    spec, lr, mu = manifest["compression"], manifest["outer_lr"], manifest["outer_momentum"]
    latest = read_latest(store, run) or {"version": 0}
    problems: list[str] = []
    held = pull_version(store, run, 0, like, with_server_ef=True)
    for r in range(latest["version"]):
        decision = read_json(store, decision_key(run, r))
        if decision is None:
            return problems + [f"round {r} has no decision but latest is {latest['version']}"]
        try:
            new, update = replay_decision(store, run, held, decision, spec, lr, mu, like)
            stored = pull_version(store, run, r + 1, like, with_server_ef=True)
        except (ProtocolError, CorruptObject, PayloadError) as e:
            return problems + [f"round {r}: {e}"]
        if stored.hashes() != new.hashes():
            problems.append(f"version {r + 1} differs from replaying decision {r}")
        if update is not None and get_tree_object(store, update_key(run, r), like) != update:
            problems.append(f"{update_key(run, r)} differs from its replay")
        held = new
    if latest and latest.get("params_sha256", held.params_sha256) != held.params_sha256:
        problems.append("latest's hash differs from the replayed version")
    return problems
