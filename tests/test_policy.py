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
    assert extra == set() and "not signed" in problem
    assert world.agg.allow_code([new_code]) == [new_code]
    assert extra_allowed_code(world.store, RUN, world.agg_key.public_hex) == (
        {new_code},
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
    assert extra_allowed_code(store, RUN, key.public_hex) == (set(), "")  # none published
    for n in (1, 2, 5):
        hashes = _random_hashes(rng, n)
        signed = signed_allowed_code(key, RUN, hashes)
        store.put(allowed_code_key(RUN), protocol.dumps(signed))
        assert extra_allowed_code(store, RUN, key.public_hex) == (set(hashes), "")
        refused = (set(), f"{allowed_code_key(RUN)} is not signed by the run's aggregator")
        assert extra_allowed_code(store, RUN, other.public_hex) == refused
        for tampered in (
            {**signed, "hashes": [*hashes, _random_hashes(rng, 1)[0]]},
            {**signed, "hashes": hashes[1:]},
            {**signed, "run": RUN + "x"},
            {**signed, "signature": other.sign(b"anything")},
            {**signed, "hashes": [h.upper() for h in hashes]},
        ):
            store.put(allowed_code_key(RUN), protocol.dumps(tampered))
            assert extra_allowed_code(store, RUN, key.public_hex) == refused
    store.put(allowed_code_key(RUN), b"not json")
    extra, problem = extra_allowed_code(store, RUN, key.public_hex)
    assert extra == set() and problem.startswith(f"{allowed_code_key(RUN)} is unreadable")
