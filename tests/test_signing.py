"""What the aggregator's key signs (`near_jax.contrib.signing`): round seeds (commit, then
reveal) and decisions; direct round trips and tamper checks, and the seeds of a real run.
"""

import random

from contrib_world import RUN

from near_jax.contrib import identity, signing
from near_jax.diloco import protocol


def test_seeds_are_committed_before_and_revealed_after_each_round(adversarial_run):
    world, decisions = adversarial_run
    manifest = protocol.read_json(world.store, protocol.manifest_key(RUN))
    public = manifest["contrib"]["aggregator_key"]
    commitment = manifest["contrib"]["seed_commitment"]
    seeds = set()
    for d in decisions:
        reveal = d["contrib"]["seed_signature"]
        assert signing.check_seed(public, RUN, d["round"], reveal, commitment) == ""
        assert signing.check_seed(public, RUN, d["round"] + 1, reveal, commitment) != ""
        seeds.add(signing.seed_from_signature(reveal))
        commitment = d["contrib"]["next_seed_commitment"]
    assert len(seeds) == len(decisions)  # a fresh validation draw every round


def _random_run(rng: random.Random) -> str:
    return "".join(rng.choice("abcdefghij0123456789") for _ in range(rng.randint(1, 12)))


def test_seed_commit_reveal_check_round_trips_on_random_rounds():
    rng = random.Random(0)
    key, other = identity.generate(), identity.generate()
    seeds = set()
    for _ in range(20):
        run, rnd = _random_run(rng), rng.randrange(1 << 20)
        signature = signing.seed_signature(key, run, rnd)
        assert signing.seed_signature(key, run, rnd) == signature  # deterministic
        commitment = signing.seed_commitment(signature)
        assert len(commitment) == 64 and signature not in commitment  # hides the seed
        assert signing.check_seed(key.public_hex, run, rnd, signature, commitment) == ""
        seed = signing.seed_from_signature(signature)
        assert 0 <= seed < 2**31
        seeds.add(seed)
        # the wrong key, round, run, commitment or a flipped bit: each is refused
        wrong_key = signing.check_seed(other.public_hex, run, rnd, signature, commitment)
        assert wrong_key == f"round {rnd}: the seed is not signed by the run's aggregator key"
        assert signing.check_seed(key.public_hex, run, rnd + 1, signature, commitment)
        assert signing.check_seed(key.public_hex, run + "x", rnd, signature, commitment)
        flipped = f"{int(signature[0], 16) ^ 1:x}" + signature[1:]
        assert signing.check_seed(key.public_hex, run, rnd, flipped, commitment)
        stale = signing.seed_commitment(signing.seed_signature(key, run, rnd + 1))
        assert signing.check_seed(key.public_hex, run, rnd, signature, stale) == (
            f"round {rnd}: the revealed seed does not match its commitment"
        )
    assert len(seeds) == 20


def test_decision_signature_round_trip_and_tamper_detection():
    rng = random.Random(1)
    key, other = identity.generate(), identity.generate()
    for _ in range(10):
        decision = {
            "round": rng.randrange(1000),
            "accepted": [{"island": _random_run(rng)} for _ in range(rng.randint(0, 4))],
            "contrib": {"base_loss": rng.random(), "entries": [rng.random() for _ in range(3)]},
        }
        body = signing.decision_bytes(decision)
        assert body.startswith(b"near_jax/decision/v1\n")
        signed = {**decision, "signature": key.sign(body)}
        assert signing.decision_bytes(signed) == body  # the signature is not signed
        assert signing.check_decision(key.public_hex, signed)
        assert not signing.check_decision(other.public_hex, signed)
        assert not signing.check_decision(key.public_hex, decision)  # unsigned
        for tampered in (
            {**signed, "round": signed["round"] + 1},
            {**signed, "accepted": [*signed["accepted"], {"island": "mallory"}]},
            {**signed, "contrib": {**signed["contrib"], "base_loss": -1.0}},
            {**signed, "extra": 1},
            {**signed, "signature": "0" * 128},
        ):
            assert not signing.check_decision(key.public_hex, tampered)
