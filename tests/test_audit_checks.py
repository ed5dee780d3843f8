"""The audit's checks (`near_jax.contrib.audit_checks`) on single ledger entries: signed
statements that verify or not, and rewards that add up or not."""

import json
import random

from near_jax.contrib import audit_checks, identity

RUN = "audited"


def _hex(rng: random.Random) -> str:
    return f"{rng.getrandbits(256):064x}"


def _signed_entry(rng: random.Random, key: identity.Identity, name: str, rnd: int) -> dict:
    """A ledger entry whose statement `key` signed, as the validator records it."""
    fields = {
        "run": RUN,
        "round": rnd,
        "contributor": name,
        "base_sha256": _hex(rng),
        "payload_sha256": _hex(rng),
        "code_sha256": _hex(rng),
        "config_sha256": _hex(rng),
    }
    return {
        "seq": rng.randint(1, 100),
        "round": rnd,
        "contributor": name,
        "key_id": key.key_id,
        "payload_sha256": fields["payload_sha256"],
        "statement": json.dumps(fields),
        "signature": identity.sign_statement(key, fields),
        "accepted": True,
        "reason": "",
        "reward": 0.5,
    }


def test_signature_problem_accepts_genuine_entries_and_names_each_forgery():
    rng = random.Random(0)
    keys = {f"c{i}": identity.generate() for i in range(3)}
    registered = {name: key.public_hex for name, key in keys.items()}
    for _ in range(10):
        name = rng.choice(sorted(keys))
        e = _signed_entry(rng, keys[name], name, rng.randrange(50))
        assert audit_checks.signature_problem(e, registered, RUN) == ""
        assert audit_checks.signature_problems(e, registered, RUN) == []
        other = next(n for n in sorted(keys) if n != name)
        cases = {
            "its statement names run": audit_checks.signature_problem(e, registered, "other"),
            "its statement names round": audit_checks.signature_problem(
                {**e, "round": e["round"] + 1}, registered, RUN
            ),
            "its statement names payload_sha256": audit_checks.signature_problem(
                {**e, "payload_sha256": _hex(rng)}, registered, RUN
            ),
            "its signature does not verify": audit_checks.signature_problem(
                e, {**registered, name: registered[other]}, RUN
            ),
            "is not registered": audit_checks.signature_problem(e, {}, RUN),
            "it has no signed statement": audit_checks.signature_problem(
                {**e, "statement": ""}, registered, RUN
            ),
            "its statement is not JSON": audit_checks.signature_problem(
                {**e, "statement": e["statement"][:-1]}, registered, RUN
            ),
        }
        for want, got in cases.items():
            assert want in got, (want, got)
        forged = {**e, "signature": keys[other].sign(b"x")}
        (problem,) = audit_checks.signature_problems(forged, registered, RUN)
        assert problem.startswith(f"ledger entry {e['seq']} (round {e['round']}, ")
        assert "accepted, but its signature does not verify" in problem
        wrong_id = {**e, "key_id": keys[other].key_id}
        (problem,) = audit_checks.signature_problems(wrong_id, registered, RUN)
        assert f"the registered key's is {keys[name].key_id}" in problem
        rejected = {**e, "accepted": False, "reason": "bad signature: ...", "key_id": ""}
        (problem,) = audit_checks.signature_problems(rejected, registered, RUN)
        assert problem.endswith("rejected as a bad signature, but it verifies")


def test_reward_problems_find_overpaid_rounds_and_paid_rejections():
    rng = random.Random(1)
    for _ in range(10):
        n = rng.randint(1, 6)
        shares = [rng.random() for _ in range(n)]
        rewards = [s / sum(shares) for s in shares]  # one unit, as the validator pays
        rows = [
            {"seq": i + 1, "round": 3, "contributor": f"c{i}", "accepted": True, "reward": r}
            for i, r in enumerate(rewards)
        ]
        assert audit_checks.reward_problems(rows) == []
        over = [*rows[:-1], {**rows[-1], "reward": rows[-1]["reward"] + 0.01}]
        (problem,) = audit_checks.reward_problems(over)
        assert problem.startswith("round 3: rewards sum to ") and "one unit" in problem
        paid = {"seq": n + 1, "round": 4, "contributor": "x", "accepted": False, "reward": 0.25}
        (problem,) = audit_checks.reward_problems([*rows, paid])
        assert problem == f"ledger entry {n + 1} (round 4, 'x'): rejected, yet rewarded 0.25"
