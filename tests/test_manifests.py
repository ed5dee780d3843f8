"""Tests of near_jax.diloco.protocol.manifests: version and contribution manifests, shard reads."""

import json

import numpy as np
import pytest
from helpers import LIKE, plan, tree

from near_jax.diloco import protocol
from near_jax.diloco.codec.compress import PayloadError, encode
from near_jax.diloco.protocol import manifests
from near_jax.diloco.protocol.keys import ProtocolError
from near_jax.diloco.store import ObjectStore

H = "ab" * 32  # a sha256


def version_manifest(update=None):
    n = plan().num_shards
    return manifests.VersionManifest(
        "run/x/", plan().plan_id(), (H,) * n, (H,) * n, (H,) * n, update
    )


@pytest.mark.parametrize("update", [None, (H,) * 5])
def test_version_manifest_round_trip_and_roots(update):
    m = version_manifest(update)
    back = manifests.VersionManifest.from_bytes(m.to_bytes(), plan(), "k")
    assert back == m and back.key("params", 3) == "run/x/params/000003"
    assert m.root("params") == protocol.sha256(protocol.dumps([H] * 5))
    other = manifests.VersionManifest(m.prefix, m.plan_id, ("cd" * 32,) + (H,) * 4, *[(H,) * 5] * 2)
    assert other.root("params") != m.root("params") and other.root("momentum") == m.root("momentum")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda o: o.update(params=[H] * 4), "params does not list 5"),
        (lambda o: o.update(momentum=["nothex"] * 5), "not a sha256"),
        (lambda o: o.update(plan="0" * 64), "another shard plan"),
        (lambda o: o.update(update=[H]), "update does not list 5"),
        (lambda o: o.pop("prefix"), "not a version manifest"),
    ],
)
def test_version_manifest_refuses_what_does_not_fit_the_plan(edit, message):
    obj = json.loads(version_manifest().to_bytes())
    edit(obj)
    with pytest.raises(ProtocolError, match=message):
        manifests.VersionManifest.from_bytes(protocol.dumps(obj), plan(), "k")
    with pytest.raises(ProtocolError, match="not JSON"):
        manifests.VersionManifest.from_bytes(b"{", plan(), "k")


def test_a_fragmented_version_manifest_names_where_each_shard_is():
    n = plan().num_shards
    origin = ("run/a/",) * 2 + ("run/b/",) * (n - 2)
    update = (H, H) + (None,) * (n - 2)
    m = manifests.VersionManifest(
        "run/a/", plan().plan_id(), (H,) * n, (H,) * n, (H,) * n, update, origin
    )
    back = manifests.VersionManifest.from_bytes(m.to_bytes(), plan(), "k")
    assert back == m
    assert back.key("params", 1) == "run/a/params/000001"
    assert back.key("server_ef", 3) == "run/b/server_ef/000003"
    assert back.key("update", 3) == "run/a/update/000003"  # an update is its round's own
    assert b"origin" not in version_manifest().to_bytes()  # unfragmented: bytes as before
    for field, value, message in [
        ("origin", ["run/a/"] * (n - 1), "origin does not list"),
        ("origin", ["../x/"] * n, "not a key prefix"),
        ("origin", ["run/a"] * n, "not a key prefix"),
        ("update", [None] * n, "not a sha256"),
    ]:
        obj = json.loads(m.to_bytes())
        obj[field] = value
        with pytest.raises(ProtocolError, match=message):
            manifests.VersionManifest.from_bytes(protocol.dumps(obj), plan(), "k")


def test_contrib_manifest_round_trip_and_checks():
    cut = plan()
    entries = tuple((H, 100 + s) for s in range(cut.num_shards))
    m = manifests.ContribManifest("int8", cut.plan_id(), entries)
    assert manifests.ContribManifest.from_bytes(m.to_bytes(), cut) == m
    assert m.present() == tuple(range(cut.num_shards))
    some = manifests.ContribManifest("int8", cut.plan_id(), (None, entries[1]) + (None,) * 3)
    assert manifests.ContribManifest.from_bytes(some.to_bytes(), cut).present() == (1,)
    bad = [
        (
            protocol.dumps({"spec": "int8", "plan": cut.plan_id(), "shards": [None] * 5}),
            "carries no shard",
        ),
        (b"[1]", "not a shard manifest"),
        (protocol.dumps({"spec": "int8", "plan": "x", "shards": []}), "another shard plan"),
        (protocol.dumps({"spec": "int8", "plan": cut.plan_id(), "shards": [[H, 1]]}), "list 5"),
        (
            protocol.dumps({"spec": "int8", "plan": cut.plan_id(), "shards": [[H, True]] * 5}),
            "not \\[sha256, bytes\\]",
        ),
        (
            protocol.dumps({"spec": "int8", "plan": cut.plan_id(), "shards": [[H, 10**9]] * 5}),
            "claims 1000000000 bytes",
        ),
        (
            protocol.dumps({"spec": 8, "plan": cut.plan_id(), "shards": [[H, 9]] * 5}),
            "spec is not a string",
        ),
        (protocol.dumps({"spec": "int8", "plan": cut.plan_id(), "shards": [], "x": 1}), "not a"),
    ]
    for body, message in bad:
        with pytest.raises(PayloadError, match=message):
            manifests.ContribManifest.from_bytes(body, cut)


def test_read_shard_checks_presence_hash_and_size(tmp_path):
    store = ObjectStore.open(str(tmp_path))
    body = protocol.tree_bytes(plan().split(tree(0))[0])
    store.put("r/s", body)
    sha = protocol.sha256(body)
    assert manifests.read_shard(store, "r/s", sha, len(body)) == body
    with pytest.raises(ProtocolError, match="missing"):
        manifests.read_shard(store, "r/t", sha, len(body))
    with pytest.raises(ProtocolError, match="does not match"):
        manifests.read_shard(store, "r/s", H, len(body))
    with pytest.raises(ProtocolError, match="oversized"):
        manifests.read_shard(store, "r/s", sha, len(body) - 1)


def test_decode_shard_checks_shapes_and_the_fp32_format():
    cut = plan()
    pieces = cut.split(tree(0))[0]
    out = manifests.decode_shard(protocol.tree_bytes(pieces), cut, 0, "k", fp32=True)
    for x, y in zip(out, pieces, strict=True):
        np.testing.assert_array_equal(x, y)
    int8 = encode(pieces, "int8")[0].to_bytes()
    with pytest.raises(PayloadError, match="expected fp32"):
        manifests.decode_shard(int8, cut, 0, "k", fp32=True)
    assert len(manifests.decode_shard(int8, cut, 0, "k", fp32=False)) == 2
    with pytest.raises(PayloadError):
        manifests.decode_shard(protocol.tree_bytes(cut.split(tree(0))[1]), cut, 0, "k", fp32=True)


def test_limits_cover_what_the_protocol_writes():
    cut = plan()
    for s in range(cut.num_shards):
        assert len(protocol.tree_bytes(cut.split(LIKE)[s])) <= manifests.shard_limit(cut, s)
    assert len(version_manifest((H,) * 5).to_bytes()) <= manifests.manifest_limit(cut)
