"""Tests of near_jax.diloco.protocol.contributions: pushing, and the verdict on each one."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from helpers import LIKE, RUN, SPEC, bits_equal, optax_rounds, plan, push, reference_update, tree

from near_jax.diloco import protocol
from near_jax.diloco import store as store_lib
from near_jax.diloco.codec.compress import LeafPayload, Payload, encode


def _push_pieces(store, island, base, shards, tag_island=None, raw=None):
    """Pushes shard pieces (any shapes; `raw`: {shard: bytes} stored as they are) and a
    manifest naming them."""
    cut = plan()
    entries, _, _ = protocol.push_shards(store, RUN, 0, island, cut, shards, SPEC)
    for s, body in (raw or {}).items():
        store.put(protocol.contrib_shard_key(RUN, 0, island, s), body)
        entries[s] = (protocol.sha256(body), len(body))
    tag = {"run": RUN, "round": 0, "island": tag_island or island}
    tag["base_sha256"] = base.params_sha256
    manifest = protocol.ContribManifest(SPEC, cut.plan_id(), tuple(entries[s] for s in range(5)))
    body = protocol.pack_contribution(tag, manifest.to_bytes())
    store.put(protocol.contrib_key(RUN, 0, island), body)


def test_invalid_contributions_are_rejected_with_reasons(started, tmp_path):
    store, clock, agg = started
    agg.quorum = 9
    cut = plan()
    base = protocol.pull_version(store, RUN, 0, cut)
    good = tree(20, 1e-2)
    push(store, "good", 0, good)
    # Wrong base: built on other params.
    other = dataclasses.replace(
        base, manifest=dataclasses.replace(base.manifest, params=("0" * 64,) * cut.num_shards)
    )
    protocol.push_contribution(store, RUN, "stale", other, cut, cut.split(good), SPEC)
    # A shard shaped unlike the params (found while streaming).
    bad_shape = cut.split(good)
    bad_shape[2] = [np.zeros((3, 11), np.float32)]  # 33 values, another shape
    _push_pieces(store, "shape", base, bad_shape)
    # Not a manifest at all.
    store.put(protocol.contrib_key(RUN, 0, "garbage"), b"\x05\x00\x00\x00{}abc" + b"junk" * 9)
    # Finite scales whose decoded values overflow to inf (in shard 1).
    shards = cut.split(good)
    payload, _ = encode(shards[1], SPEC)
    leaf = payload.leaves[0]
    huge = LeafPayload(leaf.path, leaf.shape, leaf.values, np.full_like(leaf.scales, 3e38))
    _push_pieces(store, "huge", base, shards, raw={1: Payload(payload.spec, (huge,)).to_bytes()})
    # Tag naming another island than its key.
    _push_pieces(store, "liar", base, cut.split(good), tag_island="someone")
    # A torn object (as a store without atomic writes might leave), a torn shard, a shard
    # replaced after the manifest was written, a shard missing.
    for name in ("torn", "torn_shard", "swapped", "missing"):
        push(store, name, 0, good)
    path = tmp_path / protocol.contrib_key(RUN, 0, "torn")
    path.write_bytes(path.read_bytes()[:100])
    path = tmp_path / protocol.contrib_shard_key(RUN, 0, "torn_shard", 4)
    path.write_bytes(path.read_bytes()[:100])
    store.put(
        protocol.contrib_shard_key(RUN, 0, "swapped", 0),
        encode(cut.split(tree(3))[0], SPEC)[0].to_bytes(),
    )
    store.delete(protocol.contrib_shard_key(RUN, 0, "missing", 3))
    # Another shard plan (a contributor with other flags).
    other_plan = protocol.plan_shards(LIKE, 1 << 20)
    other_base = protocol.pull_version(store, RUN, 0, cut)
    entries, _, _ = protocol.push_shards(
        store, RUN, 0, "plan", other_plan, other_plan.split(good), SPEC
    )
    body = protocol.contribution_body(RUN, "plan", other_base, other_plan, SPEC, entries)
    protocol.put_contribution(store, RUN, "plan", other_base, body)

    logged = []
    agg.log = logged.append
    stats = agg.run_round()
    decision = stats["decision"]
    assert stats["reason"] == "deadline" and clock.t >= agg.opened_at  # quorum not met
    assert [e["island"] for e in decision["accepted"]] == ["good"]
    reasons = {e["island"]: e["reason"] for e in decision["rejected"]}
    assert set(reasons) == {
        "stale",
        "shape",
        "garbage",
        "huge",
        "liar",
        "torn",
        "torn_shard",
        "swapped",
        "missing",
        "plan",
    }
    assert "built on base" in reasons["stale"]
    assert "shard 2" in reasons["shape"] and "does not match" in reasons["shape"]
    assert "invalid" in reasons["garbage"]
    assert "non-finite values in shard 1" in reasons["huge"]
    assert "island" in reasons["liar"]
    assert reasons["torn"].startswith("corrupt object")
    assert "shard 4" in reasons["torn_shard"] and "corrupt" in reasons["torn_shard"]
    assert "shard 0" in reasons["swapped"] and "sha256" in reasons["swapped"]
    assert "shard 3" in reasons["missing"] and "missing" in reasons["missing"]
    assert "another shard plan" in reasons["plan"]
    # Shard defects were found while streaming: each was logged, and the set decided again.
    assert sum("rejected" in line for line in logged) == 5, logged
    # Only the good contribution was applied; nothing of the abandoned sets is left.
    ref_params, _ = optax_rounds(tree(1), [reference_update([good])])
    assert bits_equal(protocol.pull_version(store, RUN, 1, cut).tree(cut), ref_params)
    outs = {k.split("/")[4] for k in store.list(protocol.outs_prefix(RUN, 0))}
    assert outs == {protocol.load_version(store, RUN, 1, cut).manifest.prefix.split("/")[4]}


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
    assert store.bytes_read - read0 < protocol.contribution_limit(plan()) + (1 << 20)
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


def test_a_signed_contribution_is_signed_before_any_shard_is_visible(started):
    # A contributor commits to its payload hash when it signs (contrib's Signer): nothing of
    # it may be readable then, or a copier could hash the shards and commit first.
    store = started[0]
    seen = []

    def sign(tag, payload):
        seen.append(store.list(f"{RUN}/rounds/"))
        return {"signed": protocol.sha256(payload)}

    delta = tree(np.random.default_rng(3))
    written, _, _ = push(store, "island-a", 0, delta, sign=sign)
    assert written and len(seen) == 1
    assert not [k for k in seen[0] if "island-a" in k]  # neither shards nor the object yet
    tag, data = protocol.split_contribution(store.get(protocol.contrib_key(RUN, 0, "island-a")))
    assert tag["signed"] == protocol.sha256(data)  # signed what was then written
    unsigned = push(store, "island-b", 0, delta)[0]
    assert unsigned
    body = store.get(protocol.contrib_key(RUN, 0, "island-b"))
    assert protocol.split_contribution(body)[1] == data  # the same shards, the same manifest
