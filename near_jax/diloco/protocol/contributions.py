"""Contributions: an island's framed, tagged pseudo-gradient, and the aggregator's verdict."""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from near_jax._io import one_line
from near_jax.diloco.codec.compress import CompressionSpec, Payload, PayloadError, decode, encode
from near_jax.diloco.protocol.keys import FORMAT, contrib_key
from near_jax.diloco.protocol.objects import dumps, num_elements, object_limit, sha256
from near_jax.diloco.protocol.versions import Version
from near_jax.diloco.store import HEADER, CorruptObject, ObjectStore

_TAG_LEN = struct.Struct("<I")
MAX_TAG_BYTES = 1 << 16


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
    tag = {
        "format": FORMAT,
        "run": run,
        "round": base.version,
        "island": island,
        "base_sha256": base.params_sha256,
        "spec": str(payload.spec),
        **extra,
    }
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
