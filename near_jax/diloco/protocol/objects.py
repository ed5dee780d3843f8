"""Objects in the store as the protocol writes them: canonical JSON, hashes, float32 trees."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import jax
import numpy as np

from near_jax.diloco.codec.compress import Payload, PayloadError, decode, encode
from near_jax.diloco.protocol.keys import ProtocolError
from near_jax.diloco.store import MAX_OBJECT_BYTES, CorruptObject, ObjectStore


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


def tree_from_bytes_any(body: bytes, like: Any, where: str) -> Any:
    """Decodes a payload of any spec against `like` (ProtocolError on defects)."""
    try:
        return decode(Payload.from_bytes(body, max_elements=num_elements(like)), like=like)
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
