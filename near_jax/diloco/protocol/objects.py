"""Objects in the store as the protocol writes them: canonical JSON, hashes, float32 trees."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import jax
import numpy as np

from near_jax.diloco.codec.compress import encode
from near_jax.diloco.protocol.keys import ProtocolError
from near_jax.diloco.store import MAX_OBJECT_BYTES, ObjectStore


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


def num_elements(tree: Any) -> int:
    return sum(math.prod(np.shape(x)) for x in jax.tree.leaves(tree))


def zeros_like(tree: Any) -> Any:
    return jax.tree.map(lambda x: np.zeros(np.shape(x), np.float32), tree)


def as_float32(tree: Any) -> Any:
    return jax.tree.map(lambda x: np.asarray(x, np.float32), tree)
