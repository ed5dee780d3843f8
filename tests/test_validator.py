"""The aggregator's validator role (`near_jax.contrib.validator`) against untrusted contributors.

Rounds of the adversarial run in tests/contrib_world.py (a least-squares model, real store,
signatures, registry, screening, scoring, robust rules and ledger): who is rewarded, what
is applied, how the robust rules hold up, and the holes found in review.
"""

import dataclasses
import re
import tracemalloc

import jax
import numpy as np
import pytest
from contrib_world import (
    ADVERSARIES,
    CODE,
    CONFIG,
    HONEST,
    LIKE,
    LR,
    MU,
    NAMES,
    POLICY,
    RUN,
    SPEC,
    World,
    adversarial_round,
    by_contributor,
    close_round,
    eval_loss,
    inner,
    loss,
)

from near_jax.contrib import identity, validator
from near_jax.contrib.contributor import Signer, slot_problem
from near_jax.contrib.signing import check_decision
from near_jax.contrib.validator import ContribAggregator
from near_jax.diloco import protocol
from near_jax.diloco.codec.compress import Payload
from near_jax.diloco.robust import Rule


def test_every_honest_contributor_outscores_every_adversary(adversarial_run):
    world, decisions = adversarial_run
    for d in decisions:
        entries = {e["contributor"]: e for e in d["contrib"]["entries"]}
        honest = [entries[n] for n in HONEST]
        # rewards follow the ratings (`ratings.weights`): a newcomer ranked low earns 0 at first
        assert all(e["accepted"] and e["score"] > 0 for e in honest)
        assert sum(e["reward"] for e in honest) == pytest.approx(1.0)
        for name, reason in ADVERSARIES.items():
            if name not in entries:
                assert name == "replayer" and d["round"] == 0
                continue
            e = entries[name]
            assert not e["accepted"] and not e["applied"] and e["reward"] == 0, e
            assert e["reason"].startswith(reason), (name, e["reason"])
            assert e["signature"] or name == "forger"
        assert "honest2" in [a["island"] for a in d["accepted"]]  # the copied one keeps it
        worst_honest = min(e["score"] for e in honest)
        scored = [entries[n]["score"] for n in ADVERSARIES if n in entries]
        assert all(s is None or s < worst_honest for s in scored)


def test_robust_rules_stay_near_honest_only_while_the_plain_mean_does_not(tmp_path):
    def final_loss(name, policy, adversaries, rounds_=6):
        names = HONEST + (list(ADVERSARIES) if adversaries else [])
        world = World(tmp_path / name, names, policy)
        for _ in range(rounds_):
            adversarial_round(world, adversaries)
        world.agg.close()
        return eval_loss(world.agg.params())

    start = eval_loss(LIKE)
    honest = final_loss(
        "honest",
        dataclasses.replace(POLICY, rule=Rule("mean")),
        False,
    )
    assert honest < 0.3 * start  # the run learns
    # top_g with G = the honest count: a smaller G throws honest work away (G=4: +4% here).
    for rule in (Rule("trimmed_mean", trim_fraction=0.2), Rule("median"), Rule("top_g", top_g=6)):
        policy = dataclasses.replace(POLICY, rule=rule)
        robust = final_loss(f"robust-{rule.name}", policy, True)
        assert abs(robust - honest) <= 0.02 * honest, (str(rule), robust, honest)
    plain = dataclasses.replace(POLICY, rule=Rule("mean"), screen=False)
    assert final_loss("plain", plain, True) > 1.5 * honest


def test_without_screening_the_robust_rule_alone_resists_the_poisoner(tmp_path):
    policy = dataclasses.replace(POLICY, rule=Rule("median"), screen=False)
    world = World(tmp_path, NAMES, policy)
    decision = adversarial_round(world)
    entries = {e["contributor"]: e for e in decision["contrib"]["entries"]}
    assert entries["poisoner"]["score"] < 0 < min(entries[n]["score"] for n in HONEST)
    assert entries["zero"]["score"] == 0.0 and entries["zero"]["reward"] == 0.0
    assert eval_loss(world.agg.params()) < eval_loss(LIKE)


def test_a_run_refuses_another_aggregator_key(tmp_path):
    world = World(tmp_path, HONEST[:1], POLICY)
    world.agg.close()
    other = ContribAggregator(
        world.store,
        RUN,
        LIKE,
        aggregator_key=identity.generate(),
        policy=POLICY,
        loss_fn=loss,
        ledger_path=str(tmp_path / "other.sqlite"),
        spec=SPEC,
        lr=LR,
        momentum=MU,
        quorum=1,
        round_timeout=1.0,
    )
    with pytest.raises(protocol.ProtocolError, match="aggregator key"):
        other.load()


def test_verify_run_replays_robust_decisions(adversarial_run):
    world, _ = adversarial_run
    assert protocol.verify_run(world.store, RUN, LIKE) == []


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("aggregation", "mode", "one of mean | trimmed_mean | median | top_g"),
        ("trim_fraction", 0.5, "in [0, 0.5)"),
        ("top_g", 0, "a positive integer"),
        ("max_norm_ratio", 0.5, "0 (off) or a ratio > 1"),
        ("duplicate_cosine", 1.5, "a cosine in (0, 1]"),
        ("score_batches", 0, "a positive integer"),
        ("attestation", "not a spec", "code_hash or package.module:factory"),
        ("allowed_code", "abc", "comma-separated sha256"),
    ],
)
def test_contrib_config_errors_name_the_key(key, value, message):
    from near_jax import config

    cfg = config.default_config()
    cfg.contrib[key] = value
    with pytest.raises(config.ConfigError, match=rf"config\.contrib\.{key}=.*{re.escape(message)}"):
        config.validate(cfg)


def test_contrib_needs_shuffled_val_data():
    from near_jax import config

    cfg = config.default_config()
    cfg.contrib.enabled, cfg.data.shuffle = True, False
    with pytest.raises(config.ConfigError, match="unpredictable"):
        config.validate(cfg)


# ------------------------------------------------------------ found in review: each was a hole


def _copied_round(tmp_path):
    """Four honest contributions and aaa's copy of honest3's, listed before honest3's (by
    name) in the same poll."""
    world = World(tmp_path, HONEST[:4] + ["aaa"], POLICY)
    base = world.base()
    for name in HONEST[:4]:
        world.push(name, inner(world.tree(base), name, 0))
    stolen = world.decoded(0, "honest3")
    stolen["w"] = stolen["w"] * np.float32(1.0001)
    world.push("aaa", stolen)
    return world


def test_the_original_of_a_copy_is_who_committed_first_not_who_was_listed_first(tmp_path):
    world = _copied_round(tmp_path)
    entries = by_contributor(close_round(world))
    assert entries["aaa"]["reason"].startswith("copy: near-duplicate of honest3")
    assert entries["aaa"]["reward"] == 0 and not entries["aaa"]["applied"]
    assert all(entries[n]["applied"] for n in HONEST[:4])


def test_a_copy_pair_without_commitments_credits_neither(tmp_path):
    world = _copied_round(tmp_path)
    for key in world.store.list(f"{RUN}/commits/"):  # as if nobody had committed
        world.store.delete(key)
    entries = by_contributor(close_round(world))
    for name in ("aaa", "honest3"):
        assert entries[name]["reason"].startswith("duplicate:"), entries[name]
        assert entries[name]["reward"] == 0 and not entries[name]["applied"]
    assert all(entries[n]["applied"] for n in HONEST[:3])


def test_inflating_an_update_buys_no_reward_and_harmful_ones_are_not_applied(tmp_path):
    key = identity.generate()  # the same key: the same seed, the same scoring batches

    def round_zero(factor):
        names = HONEST[:4] + ["inflated", "harmful"]
        world = World(tmp_path / str(factor), names, POLICY, key)
        base = world.base()
        for name in HONEST[:4]:
            world.push(name, inner(world.tree(base), name, 0))
        own = inner(world.tree(base), "inflated", 0)  # an honest direction, pushed inflated
        world.push("inflated", jax.tree.map(lambda d: np.float32(factor) * d, own))
        harmful = inner(world.tree(base), "z", 0)
        world.push("harmful", jax.tree.map(lambda d: np.float32(-1.5) * d, harmful))
        return world, by_contributor(close_round(world))

    # Above the round's median norm every Δ is scored at the median: pushing the same
    # direction at 1.5× or 2.9× its norm scores and earns the same.
    _, less = round_zero(1.5)
    world, entries = round_zero(2.9)
    assert entries["inflated"]["applied"]
    assert entries["inflated"]["score"] == pytest.approx(less["inflated"]["score"], rel=1e-4)
    assert entries["inflated"]["reward"] == pytest.approx(less["inflated"]["reward"], rel=1e-4)
    assert entries["harmful"]["reason"].startswith("no improvement: score -")
    assert entries["harmful"]["score"] < 0 and not entries["harmful"]["applied"]
    honest = world.decoded(0, "honest1")
    # Scaled down to the median norm, an inflated copy scores like its original would; a
    # token update is not scaled up (that would reward doing nothing).
    big, tiny = (jax.tree.map(lambda d, k=k: np.float32(k) * d, honest) for k in (2.9, 0.003))
    scaled = validator._at_median_norm([honest, honest, big, tiny])
    assert np.allclose(scaled[2]["w"], honest["w"], rtol=1e-5)
    assert np.array_equal(scaled[3]["w"], tiny["w"]) and scaled[0] is honest


def test_a_diverged_model_closes_the_round_without_applying_anything(tmp_path):
    world = World(tmp_path, HONEST[:2], POLICY)
    world.agg.loss_fn = lambda params, seed: float("nan")
    base = world.base()
    for name in HONEST[:2]:
        world.push(name, inner(world.tree(base), name, 0))
    decision = close_round(world, quorum=2)
    assert decision["contrib"]["base_loss"] is None and decision["accepted"] == []
    assert all(e["reason"].startswith("harmful") for e in decision["contrib"]["entries"])
    assert check_decision(world.agg_key.public_hex, decision)


def published_update(world, r):
    """Round r's published update Û_r as a tree, read from version r + 1's manifest."""
    plan = world.agg.plan
    v = protocol.load_version(world.store, RUN, r + 1, plan)
    pieces = {}
    for s, sha in enumerate(v.manifest.update):
        body = protocol.read_shard(
            world.store, v.manifest.key("update", s), sha, protocol.shard_limit(plan, s)
        )
        payload = Payload.from_bytes(body, max_elements=plan.shard_elements(s))
        pieces[s] = protocol.decode(payload, like=plan.shard_like(s))
    return plan.assemble(pieces)


def test_second_review_holes_stay_closed(tmp_path):
    world = World(tmp_path / "run", HONEST[:3], POLICY)
    base = world.base()
    for name in HONEST[:3]:
        world.push(name, inner(world.tree(base), name, 0))
    # An object posing as a second contribution of honest0 under a nested key is ignored.
    own = world.store.get(protocol.contrib_key(RUN, 0, "honest0"))
    world.store.put(protocol.contrib_prefix(RUN, 0) + "x/honest0", own)
    decision = close_round(world, quorum=3)
    assert [e["contributor"] for e in decision["contrib"]["entries"]] == HONEST[:3]
    assert all(e["applied"] for e in decision["contrib"]["entries"])
    # Damage to an applied round-0 object does not block a restarted aggregator, and
    # re-pushing the published update of round 0 is a stale copy.
    world.store.put(protocol.contrib_key(RUN, 0, "honest1"), b"junk")
    world.agg.close()
    world.agg = world.make_aggregator()
    world.agg.load()
    base = world.base()
    echo = published_update(world, 0)
    world.push("honest0", inner(world.tree(base), "honest0", 1))
    world.push("honest2", echo)
    entries = by_contributor(close_round(world, quorum=2))
    assert entries["honest2"]["reason"].startswith("stale: near-duplicate of the published")
    assert entries["honest0"]["applied"]
    # Junk in an island's own slot is reported, not fatal.
    slot = protocol.contrib_key(RUN, 2, "honest1")
    world.store._kv.write(slot, b"not a framed object").result()
    signer = Signer(world.keys["honest1"], "honest1", CODE, CONFIG)
    assert slot_problem(world.store, slot, signer, {}) == "it is not an intact object"
    world.agg.close()
    # A --ledger path that is not a ledger file is refused, never moved aside.
    other = world.make_aggregator()
    other.recorder.path = str(tmp_path / "run")  # the store's own directory
    with pytest.raises(protocol.ProtocolError, match="is not a ledger file"):
        other.load()
    assert (tmp_path / "run").is_dir() and world.store.exists(protocol.manifest_key(RUN))


def test_a_decision_not_signed_by_the_aggregator_is_moved_aside(tmp_path):
    world = World(tmp_path, HONEST[:2], POLICY)
    for name in HONEST[:2]:
        world.push(name, inner(world.tree(world.base()), name, 0))
    base, logged = world.agg.state, []
    world.agg.log = logged.append
    other = world.make_aggregator()  # the same key: a decision it could have written...
    other.recorder.path = str(tmp_path / "other.sqlite")
    other.load()
    verdicts = [other.check(base, k) for k in protocol.contrib_keys(world.store, RUN, 0)]
    forged = other.decide(base, verdicts, [], "quorum")[1]
    forged["signature"] = "0" * 128  # well-formed and replayable, but not the key's
    world.store.put(protocol.decision_key(RUN, 0), protocol.dumps(forged))
    world.agg.quorum = 2
    stats = world.agg.run_round()
    assert stats["accepted"] == 2 and not stats["replayed"]
    assert check_decision(world.agg_key.public_hex, stats["decision"])
    assert any("not signed by this aggregator's key" in m for m in logged), logged
    assert len(world.store.list(f"{RUN}/quarantine/")) == 1


# ------------------------------------------------------------------ streamed, shard by shard


def test_a_round_decides_the_same_whatever_the_shard_plan(tmp_path):
    # fp32 pushes and updates: both plans then hold the same numbers (int8 scales per piece).
    key, decisions = identity.generate(), []
    for shard_bytes, shards in ((protocol.DEFAULT_SHARD_BYTES, 1), (64, 3)):  # w in 2 slices
        world = World(tmp_path / str(shards), NAMES, POLICY, key, shard_bytes=shard_bytes)
        world.spec = world.agg.spec = "fp32"
        assert world.agg.plan.num_shards == shards
        decisions.append([adversarial_round(world) for _ in range(2)])  # round 1 has history
        world.agg.close()

    def same_key(reason):  # the forger's reason names a key id: each world has its own keys
        return re.sub(r"key id [0-9a-f]+", "key id K", reason)

    for one, many in zip(*decisions, strict=True):
        assert [a["island"] for a in one["accepted"]] == [a["island"] for a in many["accepted"]]
        assert one["contrib"]["base_loss"] == pytest.approx(many["contrib"]["base_loss"], 1e-12)
        a, b = by_contributor(one), by_contributor(many)
        assert a.keys() == b.keys() and len(a) >= len(NAMES) - 1
        for name in a:
            assert same_key(a[name]["reason"]) == same_key(b[name]["reason"]), name
            assert (a[name]["accepted"], a[name]["applied"]) == (
                b[name]["accepted"],
                b[name]["applied"],
            )
            if a[name]["score"] is None:
                assert b[name]["score"] is None, name
            else:
                assert a[name]["score"] == pytest.approx(b[name]["score"], rel=1e-6, abs=1e-9)
            assert a[name]["reward"] == pytest.approx(b[name]["reward"], rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("when", ["before decide", "while scoring", "before derive"])
def test_a_shard_changed_after_its_check_is_neither_accepted_nor_rewarded(
    tmp_path, monkeypatch, when
):
    # honest1's shard 1 is replaced after the aggregator checked it. Wherever that is found
    # (the Gram pass, scoring, or deriving: after selection and rewards), the decision must
    # be the one of a round without honest1: the bug was a derive that dropped it while its
    # entry stayed accepted and rewarded.
    key = identity.generate()

    def round_zero(name, pushers):
        world = World(tmp_path / name, HONEST[:4], POLICY, key, shard_bytes=64)
        base = world.base()
        for n in pushers:
            world.push(n, inner(world.tree(base), n, 0))
        return world

    ref = round_zero("ref", ["honest0", "honest2", "honest3"])
    want = by_contributor(close_round(ref))
    world = round_zero("tampered", HONEST[:4])
    plan, agg, done = world.agg.plan, world.agg, []
    assert plan.num_shards == 3

    def tamper():
        if not done:
            twice = jax.tree.map(lambda d: np.float32(2) * d, world.pushed[0]["honest1"])
            body = protocol.encode(plan.split(twice)[1], SPEC)[0].to_bytes()
            world.store.put(protocol.contrib_shard_key(RUN, 0, "honest1", 1), body)
            done.append(when)

    def hooked(name):
        original = getattr(agg, name)

        def call(*args, **kwargs):
            tamper()
            return original(*args, **kwargs)

        monkeypatch.setattr(agg, name, call)

    hooked({"before decide": "decide", "while scoring": "loss_fn", "before derive": "derive"}[when])
    assembled = []
    assemble = protocol.ShardPlan.assemble

    def counted(self, pieces):
        assembled.append(len(pieces))
        return assemble(self, pieces)

    monkeypatch.setattr(protocol.ShardPlan, "assemble", counted)
    decision = close_round(world)
    monkeypatch.setattr(protocol.ShardPlan, "assemble", assemble)
    assert done == [when] and assembled == [3]  # θ_r, once; never a whole Δ
    got = by_contributor(decision)
    bad = got.pop("honest1")
    assert bad["reason"].startswith("invalid: shard 1: ") and "recorded sha256" in bad["reason"]
    assert (bad["accepted"], bad["applied"], bad["score"], bad["reward"]) == (False, False, None, 0)
    assert got.keys() == want.keys()
    for name, entry in got.items():
        for field in ("reason", "accepted", "applied", "score", "reward"):
            assert entry[field] == want[name][field], (name, field)
    assert [a["island"] for a in decision["accepted"]] == ["honest0", "honest2", "honest3"]
    for part in ("params_sha256", "momentum_sha256", "server_ef_sha256"):  # the same version 1
        assert world.agg.state.hashes()[part] == ref.agg.state.hashes()[part]
    assert protocol.verify_run(world.store, RUN, LIKE) == []


def _round_peak(path, n):
    """(accepted, peak traced bytes of the round) of a contributor aggregator closing a
    round of n int8 contributions to a 256K-parameter model (1 MiB) in 32 KiB shards."""
    from near_jax.contrib import registry
    from near_jax.diloco.store import ObjectStore

    like = {f"w{i}": np.zeros((64, 1024), np.float32) for i in range(4)}
    path.mkdir()
    store = ObjectStore.open(str(path))
    # the probe's scores are noise around 0: keep everyone
    policy = dataclasses.replace(POLICY, rule=Rule("mean"), min_score=-1.0, score_batches=2)
    agg = ContribAggregator(
        store,
        RUN,
        like,
        aggregator_key=identity.generate(),
        policy=policy,
        loss_fn=lambda params, seed: float(sum(np.mean(x) for x in params.values()) ** 2),
        ledger_path=str(path / "ledger.sqlite"),
        spec="int8",
        lr=LR,
        momentum=MU,
        quorum=n,
        round_timeout=60.0,
        shard_bytes=1 << 15,
    )
    agg.create({k: np.ones_like(v) for k, v in like.items()}, agg.manifest_fields())
    rng = np.random.default_rng(0)
    for i in range(n):
        name, key = f"c{i:02d}", identity.generate()
        assert registry.register(store, RUN, name, key, 0.0)
        delta = {k: rng.standard_normal(v.shape, dtype=np.float32) * 1e-3 for k, v in like.items()}
        base = protocol.load_version(store, RUN, 0, agg.plan)
        signer = Signer(key, name, CODE, CONFIG)
        protocol.push_contribution(
            store, RUN, name, base, agg.plan, agg.plan.split(delta), "int8", sign=signer
        )
    agg.load()
    tracemalloc.start()
    try:
        stats = agg.run_round()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        agg.close()
    return stats["accepted"], peak


def test_the_validator_memory_stays_bounded_as_contributions_grow(tmp_path):
    """From 4 to 12 contributions the round's peak grows by far less than one model: the
    whole decoded Δs (8 × 1 MiB, held twice before) are never in memory."""
    accepted4, peak4 = _round_peak(tmp_path / "n4", 4)
    accepted12, peak12 = _round_peak(tmp_path / "n12", 12)
    assert (accepted4, accepted12) == (4, 12)
    model = 4 * 64 * 1024 * 4
    print(f"validator peak: N=4 {peak4 / 1e6:.1f} MB, N=12 {peak12 / 1e6:.1f} MB")
    assert peak12 - peak4 < model / 2, (peak4, peak12)


@pytest.mark.parametrize("flood", ["copies", "fresh keys"])
def test_the_quorum_counts_only_screened_contributions_within_the_new_key_cap(tmp_path, flood):
    sybils = [f"sybil{i}" for i in range(6)]
    # a cap below the quorum: newcomers alone can never close a round
    policy = dataclasses.replace(POLICY, new_keys_per_round=2)
    world = World(tmp_path, HONEST[:3] + sybils, policy)
    base = world.tree(world.base())
    for name in HONEST[:3]:  # rounds 0-1: the honest ones become known contributors
        world.push(name, inner(base, name, 0))
    close_round(world)
    base = world.tree(world.base())
    for name in HONEST[:3]:
        world.push(name, inner(base, name, 1))
    close_round(world)
    assert world.agg.known == set(HONEST[:3])
    base, r = world.tree(world.base()), 2
    one = inner(base, "sybil", r)
    for name in sybils:  # they arrive first: copies of one Δ, or 6 fresh keys
        world.push(name, one if flood == "copies" else inner(base, name, r))

    def honest_arrive():
        for name in HONEST[:3]:
            world.push(name, inner(base, name, r))

    world.clock.on_sleep.append(honest_arrive)  # after the first poll
    world.agg.quorum, world.agg.round_timeout = 3, 50.0
    stats = world.agg.run_round()
    assert stats["reason"] == "quorum" and not world.clock.on_sleep  # it waited for them
    entries = by_contributor(stats["decision"])
    assert all(entries[n]["accepted"] for n in HONEST[:3]), [entries[n] for n in HONEST[:3]]
    admitted = [n for n in sybils if not entries[n]["reason"].startswith("deferred")]
    assert len(admitted) == policy.new_keys_per_round  # the first two that committed
    if flood == "copies":  # of those, the first committed is the original
        assert [n for n in admitted if entries[n]["accepted"]] == admitted[:1]
