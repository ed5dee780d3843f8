"""The validator's checks of each contribution (`near_jax.contrib.checks`): each bad
contribution rejected with its reason, hostile tags survived, nobody disqualified by others.
"""

import jax
import numpy as np
import pytest
from contrib_world import (
    CODE,
    CONFIG,
    HONEST,
    POLICY,
    RUN,
    SPEC,
    World,
    by_contributor,
    close_round,
    inner,
)

from near_jax.contrib import identity, ledger, registry
from near_jax.contrib.contributor import Signer, slot_problem
from near_jax.diloco import protocol


def shard_manifest(world, r, island, bodies, spec=SPEC):
    """Writes a contribution's shard objects ({shard: stored bytes}); its manifest bytes,
    which is what a contributor signs."""
    plan = world.agg.plan
    for s, body in bodies.items():
        world.store.put(protocol.contrib_shard_key(RUN, r, island, s), body)
    shards = tuple((protocol.sha256(bodies[s]), len(bodies[s])) for s in range(plan.num_shards))
    return protocol.ContribManifest(spec, plan.plan_id(), shards).to_bytes()


def encoded(plan, delta, spec=SPEC):
    """{shard: its stored payload bytes} of a Δ tree."""
    return {s: protocol.encode(p, spec)[0].to_bytes() for s, p in plan.split(delta).items()}


@pytest.mark.parametrize(
    "attack, reason",
    [
        ("unsigned", "unsigned"),
        ("unregistered", "unregistered contributor"),
        ("stale_object", "replayed: signed for round 0"),
        ("wrong_base", "wrong base"),
        ("unknown_field", "malformed: unknown tag fields 'extra'"),
        ("truncated", "malformed payload: the contribution's shard manifest is not JSON"),
        ("bad_manifest", "malformed payload: the contribution does not list 1 shards"),
        ("nan", "invalid: shard 0: leaf 0: non-finite fp32 values"),
        ("overflow", "invalid: non-finite values in shard 0 piece 0"),
        ("wrong_shape", "invalid: shard 0: payload leaf [1] (23,) does not match"),
        ("changed_shard", "invalid: shard 0: "),
        ("missing_shard", "invalid: shard 0: "),
        ("bad_code", "attestation: code hash"),
        ("oversized", "malformed: oversized"),
    ],
)
def test_each_bad_contribution_is_rejected_with_its_reason(tmp_path, attack, reason):
    world = World(tmp_path, HONEST[:2] + ["mallory"], POLICY)
    world.push("honest0", inner(world.tree(world.base()), "honest0", 0))
    adversarial_round_zero = world.agg.run_round()["decision"]  # round 0 → version 1
    assert adversarial_round_zero["accepted"][0]["island"] == "honest0"
    base, r, plan = world.base(), 1, world.agg.plan
    assert plan.num_shards == 1 and plan.paths == ("['b']", "['w']")  # the reasons name them
    delta = inner(world.tree(base), "mallory", r)
    key = protocol.contrib_key(RUN, r, "mallory")
    signer = Signer(world.keys["mallory"], "mallory", CODE, CONFIG)
    bodies = encoded(plan, delta)
    payload = shard_manifest(world, r, "mallory", bodies)
    tag = {
        "format": 1,
        "run": RUN,
        "round": r,
        "island": "mallory",
        "base_sha256": base.params_sha256,
        "spec": SPEC,
    }
    if attack == "unsigned":
        body = protocol.pack_contribution(tag, payload)
    elif attack == "unregistered":
        tag["island"] = "nobody"
        key = protocol.contrib_key(RUN, r, "nobody")
        payload = shard_manifest(world, r, "nobody", bodies)
        body = protocol.pack_contribution(
            {**tag, **Signer(identity.generate(), "nobody", CODE, CONFIG)(tag, payload)}, payload
        )
    elif attack == "stale_object":
        body = world.store.get(protocol.contrib_key(RUN, 0, "honest0"))
        key = protocol.contrib_key(RUN, r, "honest0")
    elif attack == "wrong_base":
        tag["base_sha256"] = "0" * 64
        body = protocol.pack_contribution({**tag, **signer(tag, payload)}, payload)
    elif attack == "unknown_field":
        body = protocol.pack_contribution({**tag, **signer(tag, payload), "extra": 1}, payload)
    elif attack == "truncated":
        body = protocol.pack_contribution({**tag, **signer(tag, payload)}, payload)[:-7]
    elif attack == "bad_manifest":  # signed, but it lists no shards
        payload = protocol.ContribManifest(SPEC, plan.plan_id(), ()).to_bytes()
        body = protocol.pack_contribution({**tag, **signer(tag, payload)}, payload)
    elif attack == "nan":  # a shard that decodes to NaN in the piece of leaf "b"
        marker = np.float32(1234.5678)
        bad = encoded(plan, {**delta, "b": marker}, "fp32")
        assert bad[0].count(marker.tobytes()) == 1
        bad[0] = bad[0].replace(marker.tobytes(), np.float32(np.nan).tobytes())
        tag["spec"] = "fp32"
        payload = shard_manifest(world, r, "mallory", bad, "fp32")
        body = protocol.pack_contribution({**tag, **signer(tag, payload)}, payload)
    elif attack == "overflow":  # valid int8 codes whose scale decodes "b" to infinity
        scale = np.float32(1234.5)  # b = 127 · scale: code 127, this exact scale
        bad = encoded(plan, {**delta, "b": np.float32(127) * scale})
        huge = np.float32(np.finfo(np.float32).max).tobytes()
        assert bad[0].count(scale.tobytes()) == 1
        bad[0] = bad[0].replace(scale.tobytes(), huge)
        payload = shard_manifest(world, r, "mallory", bad)
        body = protocol.pack_contribution({**tag, **signer(tag, payload)}, payload)
    elif attack == "wrong_shape":  # leaf "w" one element short
        pieces = plan.split(delta)[0]
        short = {0: protocol.encode([pieces[0], pieces[1][:-1]], SPEC)[0].to_bytes()}
        payload = shard_manifest(world, r, "mallory", short)
        body = protocol.pack_contribution({**tag, **signer(tag, payload)}, payload)
    elif attack == "changed_shard":  # replaced after the manifest was signed
        body = protocol.pack_contribution({**tag, **signer(tag, payload)}, payload)
        other = encoded(plan, jax.tree.map(lambda d: np.float32(2) * d, delta))
        world.store.put(protocol.contrib_shard_key(RUN, r, "mallory", 0), other[0])
    elif attack == "missing_shard":
        body = protocol.pack_contribution({**tag, **signer(tag, payload)}, payload)
        world.store.delete(protocol.contrib_shard_key(RUN, r, "mallory", 0))
    elif attack == "oversized":
        body = protocol.pack_contribution({**tag, **signer(tag, payload)}, payload)
        body += b"\0" * protocol.contribution_limit(plan)
    else:
        evil = Signer(world.keys["mallory"], "mallory", "e" * 64, CONFIG)
        body = protocol.pack_contribution({**tag, **evil(tag, payload)}, payload)
    world.store.put(key, body)
    world.push("honest1", inner(world.tree(base), "honest1", r))
    world.agg.quorum = 2
    world.agg.round_timeout = 5.0
    read0 = world.store.bytes_read
    decision = world.agg.run_round()["decision"]
    if attack == "oversized":  # refused from its header: the junk body is never read
        assert world.store.bytes_read - read0 < protocol.contribution_limit(plan)
    entry = [e for e in decision["contrib"]["entries"] if e["contributor"] != "honest1"][0]
    assert entry["reason"].startswith(reason), entry["reason"]
    if attack == "changed_shard":
        assert "does not match its recorded sha256" in entry["reason"], entry["reason"]
    if attack == "missing_shard":
        assert entry["reason"].endswith("is missing"), entry["reason"]
    assert not entry["accepted"] and entry["reward"] == 0.0
    assert [a["island"] for a in decision["accepted"]] == ["honest1"]


def test_hostile_tags_and_registry_entries_never_stop_the_aggregator(tmp_path):
    world = World(tmp_path, HONEST[:2] + ["badsig"], POLICY)
    base = world.base()
    world.push("honest0", inner(world.tree(base), "honest0", 0))
    # A well-formed shard manifest (with its shards in the store): each object below is
    # refused for its tag, signature or registry entry, not for its body.
    payload = shard_manifest(
        world, 0, "badsig", encoded(world.agg.plan, inner(world.tree(base), "x", 0))
    )
    tag = {"format": 1, "run": RUN, "round": 0, "base_sha256": base.params_sha256, "spec": SPEC}
    hostile = {
        "surrogate": {**tag, "island": "surrogate", "contributor": "\ud800", "signature": "x"},
        "badsig": {
            **tag,
            "island": "badsig",
            "contributor": "badsig",
            "signature": "\udcff" * 3,
            "code_sha256": CODE,
            "config_sha256": CONFIG,
        },
        "nested": {**tag, "island": "nested", "contributor": "nested"},
    }
    for name, t in hostile.items():
        body = protocol.pack_contribution(t, payload)
        if name == "nested":  # ~30,000 nested lists inside the tag
            raw = protocol.dumps(t)[:-1] + b',"x":' + b"[" * 30000 + b"]" * 30000 + b"}"
            body = len(raw).to_bytes(4, "little") + raw + payload
        world.store.put(protocol.contrib_key(RUN, 0, name), body)
    world.store.put(registry.registry_key(RUN, "deep"), b"[" * 30000 + b"]" * 30000)
    world.store.put(
        protocol.contrib_key(RUN, 0, "deep"),
        protocol.pack_contribution(
            {
                **tag,
                "island": "deep",
                "contributor": "deep",
                "signature": "0" * 128,
                "payload_sha256": "0" * 64,
                "code_sha256": CODE,
                "config_sha256": CONFIG,
            },
            payload,
        ),
    )
    decision = close_round(world)
    entries = by_contributor(decision)
    assert entries["surrogate"]["reason"].startswith("malformed: the tag names")
    assert entries["badsig"]["reason"].startswith("bad signature: not 128")
    assert entries["badsig"]["signature"] == ""  # never an unencodable string in the ledger
    assert entries["nested"]["reason"].startswith("malformed")
    assert entries["deep"]["reason"].startswith("unregistered contributor 'deep' (its registry")
    assert [a["island"] for a in decision["accepted"]] == ["honest0"]
    world.agg.close()
    assert world.make_aggregator().load().version == 1  # and a restart records it again fine


def test_nobody_can_get_a_contributor_disqualified_without_its_key(tmp_path):
    from near_jax.contrib import rewards

    world = World(tmp_path, HONEST[:3] + ["mallory"], POLICY)
    base = world.base()
    for name in HONEST[:3]:
        world.push(name, inner(world.tree(base), name, 0))
    close_round(world)
    base, r = world.base(), 1
    # Mallory names honest0 in a replayed tag in its own slot, and copies honest1's own
    # signed round-0 object into honest1's slot before honest1 pushes.
    old = protocol.contrib_key(RUN, 0, "honest1")
    world.store.put(protocol.contrib_key(RUN, r, "honest1"), world.store.get(old))
    stale = protocol.pack_contribution({"run": RUN, "round": 0, "contributor": "honest0"}, b"")
    world.store.put(protocol.contrib_key(RUN, r, "mallory"), stale)
    for name in ("honest0", "honest2"):
        world.push(name, inner(world.tree(base), name, r))
    slot = protocol.contrib_key(RUN, r, "honest1")
    own = Signer(world.keys["honest1"], "honest1", CODE, CONFIG)
    expect = {"run": RUN, "round": r, "base_sha256": base.params_sha256}
    assert "not signed by this island's key" in slot_problem(world.store, slot, own, expect)
    theirs = Signer(world.keys["honest0"], "honest0", CODE, CONFIG)
    assert slot_problem(world.store, protocol.contrib_key(RUN, r, "honest0"), theirs, expect) == ""
    entries = by_contributor(close_round(world))
    assert entries["honest1"]["reason"].startswith("replayed") and not entries["honest1"]["key_id"]
    assert entries["mallory"]["reason"].startswith("replayed")  # under the key's name
    with ledger.Ledger.open(str(tmp_path / "local" / "ledger.sqlite"), RUN) as book:
        ranked = rewards.standings(book.entries())
    # none of them is disqualified (whom the ratings pay so far is another matter)
    assert all(not s.disqualified for s in ranked if s.contributor in HONEST[:3])
    assert {s.contributor for s in rewards.promotable(ranked, top=3)} <= set(HONEST[:3])


def test_a_check_streams_the_shards_and_keeps_none_of_them(tmp_path):
    world = World(tmp_path, HONEST[:1], POLICY, shard_bytes=64)
    assert world.agg.plan.num_shards == 3
    world.push("honest0", inner(world.tree(world.base()), "honest0", 0))
    key, base = protocol.contrib_key(RUN, 0, "honest0"), world.agg.state
    c = world.agg.check(base, key)
    assert c.valid and c.reason == "" and c.manifest is not None
    assert not hasattr(c, "delta") and not hasattr(c, "held")  # the manifest, not the Δ
    # Every shard is read at check time: a bad last one is named there, with its reason.
    world.store.delete(protocol.contrib_shard_key(RUN, 0, "honest0", 2))
    c = world.agg.check(base, key)
    assert not c.valid and c.reason.startswith("invalid: shard 2: ") and "missing" in c.reason
