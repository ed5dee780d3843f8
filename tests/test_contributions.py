"""Tests of near_jax.diloco.protocol.contributions: pushing, and the verdict on each one."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from helpers import LIKE, RUN, SPEC, bits_equal, optax_rounds, push, tree

from near_jax.diloco import protocol
from near_jax.diloco import store as store_lib
from near_jax.diloco.codec.compress import LeafPayload, Payload, decode, encode


def test_invalid_contributions_are_rejected_with_reasons(started, tmp_path):
    store, clock, agg = started
    base = protocol.pull_version(store, RUN, 0, LIKE)
    good = tree(20, 1e-2)
    push(store, "good", 0, good)
    # Wrong base: built on other params.
    other = protocol.make_version(0, tree(5), protocol.zeros_like(LIKE))
    protocol.push_contribution(store, RUN, "stale", other, good, SPEC)
    # Shapes unlike the params.
    bad_shape = {**good, "b": np.zeros(32, np.float32)}
    protocol.push_contribution(store, RUN, "shape", base, bad_shape, SPEC)
    # Not a payload at all.
    store.put(protocol.contrib_key(RUN, 0, "garbage"), b"\x05\x00\x00\x00{}abc" + b"junk" * 9)
    # Finite scales whose decoded values overflow to inf.
    payload, _ = encode(good, SPEC)
    leaves = list(payload.leaves)
    leaves[0] = LeafPayload(
        leaves[0].path,
        leaves[0].shape,
        leaves[0].values,
        np.full_like(leaves[0].scales, 3e38),
        None,
    )
    tag = {"run": RUN, "round": 0, "island": "huge", "base_sha256": base.params_sha256}
    body = protocol.pack_contribution(tag, Payload(payload.spec, tuple(leaves)))
    store.put(protocol.contrib_key(RUN, 0, "huge"), body)
    # Tag naming another island than its key.
    store.put(protocol.contrib_key(RUN, 0, "liar"), body)
    # A torn object (as a store without atomic writes might leave).
    push(store, "torn", 0, good)
    path = tmp_path / protocol.contrib_key(RUN, 0, "torn")
    path.write_bytes(path.read_bytes()[:100])

    stats = agg.run_round()
    decision = stats["decision"]
    assert stats["reason"] == "deadline" and clock.t >= agg.opened_at  # quorum 3 not met
    assert [e["island"] for e in decision["accepted"]] == ["good"]
    reasons = {e["island"]: e["reason"] for e in decision["rejected"]}
    assert set(reasons) == {"stale", "shape", "garbage", "huge", "liar", "torn"}
    assert "built on base" in reasons["stale"]
    assert "does not match" in reasons["shape"]
    assert "invalid" in reasons["garbage"]
    assert "non-finite" in reasons["huge"]
    assert "island" in reasons["liar"]
    assert reasons["torn"].startswith("corrupt object")
    # Only the good contribution was applied.
    update = decode(encode(decode(encode(good, SPEC)[0]), SPEC)[0])
    ref_params, _ = optax_rounds(tree(1), [update])
    assert bits_equal(protocol.pull_version(store, RUN, 1, LIKE).params, ref_params)


def test_junk_and_links_are_rejected_without_being_read(started, tmp_path):
    """A 200 MB (sparse) contribution is refused from its header; a link to a file outside
    the store is refused by name, and nothing of that file reaches the decision."""
    store, clock, agg = started
    push(store, "good", 0, tree(20, 1e-2))
    size = 200 << 20
    with open(tmp_path / protocol.contrib_key(RUN, 0, "junk"), "wb") as f:
        f.write(store_lib.HEADER.pack(store_lib.MAGIC, 1, size, b"\0" * 32))
        f.truncate(store_lib.HEADER.size + size)
    outside = tmp_path.parent / f"{tmp_path.name}-passwd"
    outside.write_bytes(store_lib.frame(b"SECRET:x:0:0:root:/root:/bin/bash"))
    os.symlink(outside, tmp_path / protocol.contrib_key(RUN, 0, "link"))
    read0 = store.bytes_read
    decision = agg.run_round()["decision"]
    assert store.bytes_read - read0 < protocol.object_limit(LIKE)
    reasons = {e["island"]: e["reason"] for e in decision["rejected"]}
    assert "oversized" in reasons["junk"]
    assert (
        "symbolic link" in reasons["link"]
        and protocol.contrib_key(RUN, 0, "link") in reasons["link"]
    )
    assert "SECRET" not in json.dumps(decision)
    assert [e["island"] for e in decision["accepted"]] == ["good"]


def test_jnp_params_are_accepted_like_numpy(started):
    store, _, agg = started
    agg.quorum = 1
    delta = jax.tree.map(jnp.asarray, tree(50, 1e-2))
    assert push(store, "a", 0, delta)[0]
    assert agg.run_round()["accepted"] == 1
