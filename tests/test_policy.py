"""What a contributor run accepts (`near_jax.contrib.policy`): the policy's JSON form, the
recipe hash contributors sign, and code hashes the aggregator allows mid-run.
"""

import json
import random
import re

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

from near_jax import config
from near_jax.contrib import identity
from near_jax.contrib.contributor import Signer
from near_jax.contrib.policy import (
    CodeList,
    Policy,
    allowed_code_key,
    extra_allowed_code,
    recipe_sha256,
    signed_allowed_code,
)
from near_jax.diloco import protocol
from near_jax.diloco.robust import Rule
from near_jax.diloco.store import ObjectStore


def test_new_code_can_be_allowed_mid_run_by_the_aggregator_only(tmp_path):
    world = World(tmp_path, HONEST[:2], POLICY)
    base = world.base()
    new_code = "e" * 64
    world.push("honest0", inner(world.tree(base), "honest0", 0))
    upgraded = Signer(world.keys["honest1"], "honest1", new_code, CONFIG)
    plan = world.agg.plan
    delta = plan.split(inner(world.tree(base), "h1", 0))
    protocol.push_contribution(world.store, RUN, "honest1", base, plan, delta, SPEC, sign=upgraded)
    entries = by_contributor(close_round(world, quorum=2))
    assert entries["honest1"]["reason"].startswith("attestation: code hash eeeeeeeeeeee")
    # Anyone can write a list; only the aggregator's signed one counts.
    forged = {"run": RUN, "hashes": [new_code], "signature": "0" * 128}
    world.store.put(allowed_code_key(RUN), protocol.dumps(forged))
    extra, problem = extra_allowed_code(world.store, RUN, world.agg_key.public_hex)
    assert extra == CodeList() and "not signed" in problem
    assert world.agg.allow_code([new_code]) == [new_code]
    assert extra_allowed_code(world.store, RUN, world.agg_key.public_hex) == (
        CodeList(frozenset({new_code}), frozenset(), 1),
        "",
    )
    base = world.base()
    old_code = Signer(world.keys["honest0"], "honest0", CODE, CONFIG)
    for name, signer in (("honest0", old_code), ("honest1", upgraded)):
        delta = plan.split(inner(world.tree(base), name, 1))
        protocol.push_contribution(world.store, RUN, name, base, plan, delta, SPEC, sign=signer)
    entries = by_contributor(close_round(world, quorum=2))
    assert entries["honest1"]["applied"] and entries["honest0"]["applied"]


def _random_hashes(rng: random.Random, n: int) -> list[str]:
    return [f"{rng.getrandbits(256):064x}" for _ in range(n)]


def test_policy_json_round_trips_through_the_manifest():
    rng = random.Random(0)
    rules = (Rule("mean"), Rule("median"), Rule("trimmed_mean", trim_fraction=0.3))
    for rule in (*rules, Rule("top_g", top_g=rng.randint(1, 9))):
        policy = Policy(
            rule=rule,
            screen=rng.random() < 0.5,
            max_norm_ratio=1 + 10 * rng.random(),
            duplicate_cosine=rng.random(),
            score_batches=rng.randint(1, 8),
            allowed_code=tuple(_random_hashes(rng, rng.randint(0, 3))),
            config_sha256=_random_hashes(rng, 1)[0],
        )
        stored = json.loads(protocol.dumps(policy.to_json()))  # as read back from the manifest
        assert Policy.from_json(stored) == policy


def test_recipe_sha256_covers_the_run_fixed_settings_only():
    cfg = config.default_config()
    recipe = recipe_sha256(cfg)
    assert (
        re.fullmatch(r"[0-9a-f]{64}", recipe)
        and recipe_sha256(cfg.copy_and_resolve_references()) == recipe
    )
    rng = random.Random(2)
    for section, key, value in (
        ("model", "n_layers", cfg.model.n_layers + rng.randint(1, 8)),
        ("model", "d_model", cfg.model.d_model * 2),
        ("model", "dtype", "float32"),
        ("data", "seq_len", cfg.data.seq_len + rng.randint(1, 64)),
    ):
        changed = cfg.copy_and_resolve_references()
        changed[section][key] = value
        assert recipe_sha256(changed) != recipe, (section, key)
    for section, key, value in (
        ("train", "steps", cfg.train.steps + rng.randint(1, 100)),
        ("data", "shuffle", not cfg.data.shuffle),
        ("contrib", "score_batches", cfg.contrib.score_batches + 1),
        ("optim", "lr", 0.5),
    ):
        changed = cfg.copy_and_resolve_references()
        changed[section][key] = value
        assert recipe_sha256(changed) == recipe, (section, key)


def test_signed_allowed_code_round_trips_and_tampering_is_refused(tmp_path):
    rng = random.Random(3)
    store = ObjectStore.open(str(tmp_path), must_exist=False)
    key, other = identity.generate(), identity.generate()
    assert extra_allowed_code(store, RUN, key.public_hex) == (CodeList(), "")  # none published
    for n in (1, 2, 5):
        hashes, revoked = _random_hashes(rng, n), _random_hashes(rng, n - 1)
        seq = rng.randint(1, 1000)
        signed = signed_allowed_code(key, RUN, hashes, seq=seq, revoked=revoked)
        store.put(allowed_code_key(RUN), protocol.dumps(signed))
        got = CodeList(frozenset(hashes), frozenset(revoked), seq)
        assert extra_allowed_code(store, RUN, key.public_hex) == (got, "")
        refused = (CodeList(), f"{allowed_code_key(RUN)} is not signed by the run's aggregator")
        assert extra_allowed_code(store, RUN, other.public_hex) == refused
        for tampered in (
            {**signed, "hashes": [*hashes, _random_hashes(rng, 1)[0]]},
            {**signed, "hashes": hashes[1:]},
            {**signed, "revoked": [*revoked, hashes[0]]},
            {**signed, "seq": seq + 1},
            {**signed, "seq": True},
            {**signed, "run": RUN + "x"},
            {**signed, "signature": other.sign(b"anything")},
            {**signed, "hashes": [h.upper() for h in hashes]},
        ):
            store.put(allowed_code_key(RUN), protocol.dumps(tampered))
            assert extra_allowed_code(store, RUN, key.public_hex) == refused
            # a caller keeps what it knew
            assert extra_allowed_code(store, RUN, key.public_hex, known=got)[0] == got
    store.put(allowed_code_key(RUN), b"not json")
    extra, problem = extra_allowed_code(store, RUN, key.public_hex)
    assert extra == CodeList() and problem.startswith(f"{allowed_code_key(RUN)} is unreadable")
    store.put(allowed_code_key(RUN), b"[" * 100 + b"1" * (1 << 20))  # bounded: not read whole
    extra, problem = extra_allowed_code(store, RUN, key.public_hex)
    assert extra == CodeList() and problem.startswith(f"{allowed_code_key(RUN)} is unreadable")


def test_a_list_from_before_seqs_still_counts_as_seq_0(tmp_path):
    """Lists signed before seqs and revocation existed ({"run", "hashes"}, domain v1)."""
    store = ObjectStore.open(str(tmp_path), must_exist=False)
    key, hashes = identity.generate(), _random_hashes(random.Random(4), 3)
    body = {"run": RUN, "hashes": hashes}
    body["signature"] = key.sign(b"near_jax/allowed_code/v1\n" + protocol.dumps(body))
    store.put(allowed_code_key(RUN), protocol.dumps(body))
    assert extra_allowed_code(store, RUN, key.public_hex) == (CodeList(frozenset(hashes)), "")
    code, problem = extra_allowed_code(store, RUN, key.public_hex, min_seq=1)
    assert code == CodeList() and "older than seq 1" in problem


def test_revoked_code_is_refused_and_an_older_list_cannot_undo_it(tmp_path):
    world = World(tmp_path, HONEST[:3], POLICY)
    newer, plan = "e" * 64, world.agg.plan
    assert world.agg.allow_code([newer]) == [newer]
    before = world.store.get(allowed_code_key(RUN))  # seq 1: CODE and newer allowed
    assert world.agg.revoke_code([CODE]) == [CODE]
    assert world.agg.code.seq == 2 and world.agg.code.allowed(POLICY.allowed_code) == {newer}
    base = world.base()
    for name, code in (("honest0", CODE), ("honest1", newer)):
        signer = Signer(world.keys[name], name, code, CONFIG)
        delta = plan.split(inner(world.tree(base), name, 0))
        protocol.push_contribution(world.store, RUN, name, base, plan, delta, SPEC, sign=signer)
    entries = by_contributor(close_round(world, quorum=2))
    assert entries["honest0"]["reason"] == (
        f"attestation: code hash {CODE[:12]} was revoked in this run"
    )
    assert entries["honest1"]["applied"]
    # Someone re-puts the list from before the revocation: a rollback, refused.
    world.store.put(allowed_code_key(RUN), before)
    code, problem = extra_allowed_code(world.store, RUN, world.agg_key.public_hex, min_seq=2)
    assert code == CodeList() and "has seq 1, older than seq 2" in problem
    logged = []
    world.agg.log = logged.append
    world.agg.load()  # a reload keeps the newest list it saw
    assert world.agg.code.seq == 2 and world.agg.checker.revoked == {CODE}
    assert any("older than seq 2" in m for m in logged), logged
    # The next change starts from the newest list seen, not the re-put one.
    assert world.agg.allow_code([CODE]) == sorted({CODE, newer})
    assert extra_allowed_code(world.store, RUN, world.agg_key.public_hex)[0].seq == 3
    base = world.base()
    signer = Signer(world.keys["honest0"], "honest0", CODE, CONFIG)
    delta = plan.split(inner(world.tree(base), "honest0", 1))
    protocol.push_contribution(world.store, RUN, "honest0", base, plan, delta, SPEC, sign=signer)
    assert by_contributor(close_round(world, quorum=1))["honest0"]["applied"]


def test_code_list_changes():
    rng = random.Random(5)
    manifest, extra = _random_hashes(rng, 3), _random_hashes(rng, 2)
    code = CodeList().allowing(extra)
    assert code.seq == 1 and code.allowed(tuple(manifest)) == set(manifest + extra)
    code = code.revoking([manifest[0], extra[0]])
    assert code.seq == 2 and code.allowed(tuple(manifest)) == {manifest[1], manifest[2], extra[1]}
    code = code.allowing([manifest[0]])
    assert code.seq == 3 and manifest[0] in code.allowed(tuple(manifest))
    assert code.revoked == {extra[0]}
