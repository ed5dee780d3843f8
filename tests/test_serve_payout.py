"""Payout statements (`near_jax.serve.payout`) on a real audited contributor run: conftest's
`world` (tests/contrib_world.py's adversarial run, helpers.ADVERSARIAL_ROUNDS rounds)."""

import csv
import io
import json
import math
from fractions import Fraction

import numpy as np
import pytest
from contrib_world import RUN
from helpers import clone, ledger_copy, rehash, row, sql

from near_jax.contrib import audit, identity, ledger, ledger_mirror
from near_jax.serve import payout

HOST_KEY = identity.generate()
HEAD = "e" * 64
PERIOD = (1_700_000_000.0, 1_700_086_400.0)


def make(store, revenue=123_456_789, host_ppm=100_000, holders_ppm=50_000, **kw):
    return payout.statement(
        store,
        RUN,
        period=PERIOD,
        revenue=revenue,
        requests=42,
        usage_head=HEAD,
        host="host-a",
        host_ppm=host_ppm,
        holders_ppm=holders_ppm,
        identity=HOST_KEY,
        created=1_700_090_000.0,
        **kw,
    )


def ledger_rewards(world, tmp_path) -> dict[str, Fraction]:
    """Each contributor's total reward, read from the ledger directly and summed exactly."""
    with ledger.Ledger.open(str(ledger_copy(world, tmp_path)), RUN) as book:
        entries = book.entries()
    totals: dict[str, Fraction] = {}
    for e in entries:
        totals[e["contributor"]] = totals.get(e["contributor"], Fraction(0)) + Fraction(e["reward"])
    return totals


def test_a_statement_splits_the_revenue_exactly_and_in_proportion(world, tmp_path):
    stmt = make(world.store)
    revenue = 123_456_789
    assert (stmt["host_amount"], stmt["holders_amount"]) == (12_345_678, 6_172_839)
    pool = revenue - 12_345_678 - 6_172_839
    amounts = {p["contributor"]: p["amount"] for p in stmt["contributors"]}
    assert sum(amounts.values()) + stmt["host_amount"] + stmt["holders_amount"] == revenue
    rewards = ledger_rewards(world, tmp_path)
    paid = {name for name, r in rewards.items() if r > 0}
    assert set(amounts) == paid and 0 < len(paid) < len(rewards)  # zero rewards: not listed
    total = sum(rewards.values())
    for name in paid:  # within one micro-unit of the exact proportional share
        assert abs(amounts[name] - pool * rewards[name] / total) < 1, name
        p = next(p for p in stmt["contributors"] if p["contributor"] == name)
        assert math.isclose(p["reward"], float(rewards[name]), rel_tol=1e-15)
        assert p["key_id"] == world.keys[name].key_id
    assert [p["reward"] for p in stmt["contributors"]] == sorted(
        (p["reward"] for p in stmt["contributors"]), reverse=True
    )
    summary = audit.audit(world.store, RUN).summary
    assert stmt["ledger"] == {
        "rounds": summary["rounds"],
        "entries": summary["entries"],
        "head": summary["head"],
        "aggregator_key_id": world.agg_key.key_id,
    }
    assert stmt["period"] == list(PERIOD) and stmt["usage_head"] == HEAD
    assert stmt["signing_key"] == HOST_KEY.public_hex
    again = json.loads(json.dumps(stmt))
    assert payout.verify_statement(again, signing_key=HOST_KEY.public_hex) == []
    assert payout.verify_statement(again, store=world.store) == []


def test_the_csv_has_one_row_per_payee(world):
    stmt = make(world.store)
    rows = list(csv.DictReader(io.StringIO(payout.to_csv(stmt))))
    assert [r["role"] for r in rows[:2]] == ["host", "holders"]
    assert (rows[0]["payee"], rows[1]["payee"]) == ("host-a", "holders")
    assert len(rows) == 2 + len(stmt["contributors"])
    assert sum(int(r["amount"]) for r in rows) == stmt["revenue"]
    for r, p in zip(rows[2:], stmt["contributors"], strict=True):
        assert (r["payee"], r["key_id"], float(r["reward"]), int(r["amount"])) == (
            p["contributor"],
            p["key_id"],
            p["reward"],
            p["amount"],
        )


def test_shares_of_all_or_nothing(world):
    everything = make(world.store, revenue=999, host_ppm=1_000_000, holders_ppm=0)
    assert everything["host_amount"] == 999
    assert all(p["amount"] == 0 for p in everything["contributors"])
    nothing = make(world.store, revenue=0)
    assert nothing["host_amount"] == nothing["holders_amount"] == 0
    assert payout.verify_statement(everything) == payout.verify_statement(nothing) == []


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"host_ppm": 600_000, "holders_ppm": 400_001}, "host_ppm + holders_ppm must be at most"),
        ({"host_ppm": -1}, "host_ppm must be an int in [0, 1000000]"),
        ({"holders_ppm": 0.5}, "holders_ppm must be an int"),
        ({"revenue": -5}, "revenue must be an int >= 0"),
        ({"revenue": 1.5}, "revenue must be an int >= 0"),
    ],
)
def test_bad_arguments_are_one_line_value_errors(world, kw, message):
    with pytest.raises(ValueError) as e:
        make(world.store, **kw)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_a_ledger_that_fails_its_audit_is_refused(world, tmp_path):
    # a local ledger file with one reward edited (its chain breaks)
    path = ledger_copy(world, tmp_path)
    sql(path, f"UPDATE entries SET reward = 0.5 WHERE seq = {row(path, 1, 'poisoner')['seq']}")
    with pytest.raises(payout.PayoutError, match="fails its audit") as e:
        make(world.store, ledger_path=str(path))
    assert "\n" not in str(e.value)
    # the store's ledger rewritten, chain rehashed and its index re-signed with the
    # aggregator's own key: the signed decisions still expose it
    store, _ = clone(world, tmp_path)
    (tmp_path / "fresh").mkdir()
    fresh = ledger_copy(world, tmp_path / "fresh")
    rehash(fresh, row(fresh, 1, "zero")["seq"], reward=0.25)
    ledger_mirror.upload(store, RUN, str(fresh), world.agg_key)
    assert audit.audit(store, RUN).problems
    with pytest.raises(payout.PayoutError, match=r"^the ledger of run 'adv' fails its audit"):
        make(store)
    # and a statement made before the forgery no longer matches the store's ledger
    stmt = make(world.store)
    assert payout.verify_statement(stmt) == []
    problems = payout.verify_statement(stmt, store=store)
    assert problems and all("fails its audit" in p for p in problems)


def test_nobody_with_a_reward_is_refused(world, monkeypatch):
    real = audit.audit(world.store, RUN)
    zeroed = [dict(e, reward=0.0) for e in real.entries]
    monkeypatch.setattr(
        audit, "audit", lambda *a, **k: audit.Audit([], [], real.summary, zeroed, real.latest)
    )
    with pytest.raises(payout.PayoutError, match="no contributor of run 'adv' has a reward"):
        make(world.store)


def test_a_tampered_statement_fails(world):
    stmt = make(world.store)
    first, second = stmt["contributors"][0]["contributor"], stmt["contributors"][1]["contributor"]

    def resigned(s):
        s["signature"] = HOST_KEY.sign(payout.statement_bytes(s))
        return s

    moved = json.loads(json.dumps(stmt))
    moved["contributors"][0]["amount"] -= 1
    moved["contributors"][1]["amount"] += 1
    assert payout.verify_statement(moved) == [
        "the statement's signature does not verify under its signing_key"
    ]
    assert payout.verify_statement(resigned(moved)) == [
        f"{first!r} is paid {stmt['contributors'][0]['amount'] - 1}, its share of the rewards "
        f"is {stmt['contributors'][0]['amount']}",
        f"{second!r} is paid {stmt['contributors'][1]['amount'] + 1}, its share of the rewards "
        f"is {stmt['contributors'][1]['amount']}",
    ]
    skimmed = json.loads(json.dumps(stmt))
    skimmed["contributors"][0]["amount"] -= 1
    assert f"the amounts sum to {stmt['revenue'] - 1}, not the revenue {stmt['revenue']}" in (
        payout.verify_statement(resigned(skimmed))
    )
    greedy = resigned(dict(json.loads(json.dumps(stmt)), host_amount=stmt["host_amount"] + 1))
    assert payout.verify_statement(greedy)[0].startswith("host_amount is")
    # rewards inflated consistently, amounts re-split and re-signed: only the ledger knows
    inflated = json.loads(json.dumps(stmt))
    inflated["contributors"][-1]["reward"] *= 2
    pool = stmt["revenue"] - stmt["host_amount"] - stmt["holders_amount"]
    parts = payout.split(pool, {p["contributor"]: p["reward"] for p in inflated["contributors"]})
    for p in inflated["contributors"]:
        p["amount"] = parts[p["contributor"]]
    resigned(inflated)
    assert payout.verify_statement(inflated) == []
    assert payout.verify_statement(inflated, store=world.store) == [
        "the statement's contributors and rewards are not the ledger's up to its head"
    ]
    other = identity.generate().public_hex
    assert payout.verify_statement(stmt, signing_key=other)[0].startswith("signed by key")
    for field, value, message in (
        ("period", [2, 1], "period must be [start, end] with start < end"),
        ("period", ["0", 1], "period must be [start, end] with start < end"),
        ("usage_head", "x", "usage_head must be 64 lowercase hex characters or ''"),
        ("ledger", None, "ledger must be {rounds: int"),
        ("created", "yesterday", "created must be a time in seconds"),
        ("host", "", "host must be a non-empty string"),
    ):
        problems = payout.verify_statement(resigned(dict(stmt, **{field: value})))
        assert len(problems) == 1 and problems[0].startswith(message), problems
    for garbage in (None, [], {}, dict(stmt, contributors="x"), dict(stmt, revenue=True)):
        problems = payout.verify_statement(garbage)
        assert problems and all(isinstance(p, str) and "\n" not in p for p in problems)


def _reference_split(amount, weights):
    """Hamilton's method in integers: weights as exact ratios, remainders compared by
    cross-multiplication."""
    ratios = {n: w.as_integer_ratio() for n, w in weights.items()}
    den = math.lcm(*(d for _, d in ratios.values()))
    ints = {n: a * (den // d) for n, (a, d) in ratios.items()}
    total = sum(ints.values())
    floors = {n: amount * w // total for n, w in ints.items()}
    rems = {n: amount * w % total for n, w in ints.items()}
    order = sorted(ints, key=lambda n: (-rems[n], n))
    for n in order[: amount - sum(floors.values())]:
        floors[n] += 1
    return floors


def test_split_is_largest_remainder_with_ties_by_name():
    assert payout.split(10, {"c": 1.0, "b": 1.0, "a": 1.0}) == {"a": 4, "b": 3, "c": 3}
    assert payout.split(0, {"a": 0.3}) == {"a": 0}
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(1, 8))
        weights = {f"c{i}": float(rng.random() ** 3) + 1e-12 for i in range(n)}
        if rng.random() < 0.3:  # equal weights: ties
            weights = dict.fromkeys(weights, 0.1)
        amount = int(rng.integers(0, 10**12))
        parts = payout.split(amount, weights)
        assert sum(parts.values()) == amount
        assert parts == _reference_split(amount, weights)
    with pytest.raises(payout.PayoutError):
        payout.split(5, {})
