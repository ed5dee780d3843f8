"""Metering (`near_jax.serve.metering`): authorization, holds against spend limits, settling."""

import random
import threading

import pytest

from near_jax.serve.keys import ANONYMOUS, KeyRing, add_key, request_cost
from near_jax.serve.metering import Meter, MeterError, OverLimit, Unauthorized
from near_jax.serve.usage import UsageError, UsageLedger
from near_jax.serve.usage_verify import period_totals, verify

PRICE_P, PRICE_C = 1_000_000, 2_000_000  # 1 and 2 micro-units a token: costs easy to follow


@pytest.fixture
def setup(tmp_path):
    """(meter, secrets by name, ledger path) with alice limited to 1000 and bob unlimited."""
    keys = str(tmp_path / "keys.json")
    secrets = {
        "alice": add_key(keys, "alice", PRICE_P, PRICE_C, 1000),
        "bob": add_key(keys, "bob", 3, 5, None),
    }
    path = str(tmp_path / "usage.sqlite")
    ledger = UsageLedger(path)
    yield Meter(KeyRing.load(keys), ledger), secrets, path
    ledger.close()


def test_authorize(setup):
    meter, secrets, _ = setup
    assert meter.authorize(secrets["alice"]).name == "alice"
    assert meter.authorize(secrets["bob"]).name == "bob"
    wrong = secrets["alice"] + "x"
    for secret, match in [
        (None, "missing"),
        ("", "missing"),
        (wrong, "unknown"),
        ("nj-x", "unknown"),
    ]:
        with pytest.raises(Unauthorized, match=match) as info:
            meter.authorize(secret)
        assert info.value.status == 401 and isinstance(info.value, MeterError)
        assert "\n" not in str(info.value) and secrets["alice"] not in str(info.value)


def test_open_keyring_accepts_anyone_for_free(tmp_path):
    with UsageLedger(str(tmp_path / "u.sqlite")) as ledger:
        meter = Meter(KeyRing.open(), ledger)
        for secret in (None, "", "whatever"):
            key = meter.authorize(secret)
            assert key.name == ANONYMOUS and key.limit is None
        r = meter.reserve(key, 10**6, 10**6)
        assert r.worst == 0
        assert meter.settle(r, "r1", "m", 10**6, 5, "stop", 1.0) == 0
        assert ledger.spent(key.sha256) == 0 and ledger.count() == 1  # still recorded
        assert meter.remaining(key) is None
        # Several free requests in flight at once: each hold of 0 comes and goes.
        holds = [meter.reserve(key, 3, 4) for _ in range(3)]
        for i, hold in enumerate(holds):
            meter.settle(hold, f"f{i}", "m", 3, 4, "stop", 1.0)
        meter.release(holds[0])
        assert meter.held(key) == 0 and ledger.count() == 4


def test_reserve_holds_the_worst_case_and_refuses_past_the_limit(setup):
    meter, secrets, path = setup
    alice = meter.authorize(secrets["alice"])
    r1 = meter.reserve(alice, 100, 200)  # worst 100 + 400 = 500
    assert r1.worst == 500 and meter.held(alice) == 500 and meter.remaining(alice) == 500
    r2 = meter.reserve(alice, 100, 200)  # exactly at the limit: allowed
    assert meter.held(alice) == 1000 and meter.remaining(alice) == 0
    with pytest.raises(OverLimit, match="key 'alice' would exceed its limit of 1000") as info:
        meter.reserve(alice, 1, 0)
    assert info.value.status == 402 and "\n" not in str(info.value)
    assert "spent 0, held by requests in flight 1000, this request up to 1" in str(info.value)
    # settling charges the actual usage and frees the rest of the hold
    assert meter.settle(r1, "req-1", "m", 100, 50, "stop", 10.0) == 200
    assert meter.held(alice) == 500 and meter.remaining(alice) == 300
    meter.reserve(alice, 100, 100)  # 300: fits exactly
    with pytest.raises(OverLimit, match="spent 200, held by requests in flight 800"):
        meter.reserve(alice, 1, 0)
    # release drops a hold without recording
    meter.release(r2)
    meter.release(r2)  # twice: nothing more
    assert meter.held(alice) == 300 and meter.remaining(alice) == 500
    assert period_totals(path, 0, 100)["revenue"] == 200 and verify(path) == []
    # unlimited keys are never refused
    bob = meter.authorize(secrets["bob"])
    assert meter.reserve(bob, 10**9, 10**9).worst == request_cost(10**9, 10**9, bob)
    assert meter.remaining(bob) is None


def test_settle_is_idempotent_and_checks_the_usage_fits(setup):
    meter, secrets, _ = setup
    alice = meter.authorize(secrets["alice"])
    r = meter.reserve(alice, 10, 20)
    with pytest.raises(ValueError, match="does not fit the reservation"):
        meter.settle(r, "req-1", "m", 10, 21, "length", 1.0)
    with pytest.raises(ValueError, match="does not fit the reservation"):
        meter.settle(r, "req-1", "m", 11, 0, "length", 1.0)
    assert meter.held(alice) == 50 and meter.ledger.count() == 0  # nothing recorded
    assert meter.settle(r, "req-1", "m", 10, 20, "length", 1.0) == 50
    assert meter.settle(r, "req-1", "m", 10, 20, "length", 1.0) == 50  # again: no change
    assert meter.held(alice) == 0 and meter.ledger.count() == 1
    assert meter.ledger.spent(alice.sha256) == 50


def test_a_failed_settle_keeps_the_hold_until_released(setup):
    meter, secrets, _ = setup
    alice = meter.authorize(secrets["alice"])
    r = meter.reserve(alice, 10, 20)
    with pytest.raises(ValueError, match="finish"):
        meter.settle(r, "req-1", "m", 10, 5, "bogus", 1.0)
    assert meter.held(alice) == 50
    meter.release(r)
    assert meter.held(alice) == 0


def test_settle_later_drops_the_hold_once_committed(setup):
    meter, secrets, path = setup
    alice = meter.authorize(secrets["alice"])
    r1, r2 = meter.reserve(alice, 10, 20), meter.reserve(alice, 5, 5)
    with pytest.raises(ValueError, match="does not fit the reservation"):
        meter.settle_later(r1, "req-1", "m", 10, 21, "length", 1.0)
    with meter.ledger._lock:  # the commit cannot happen yet: both holds stay
        later = [
            meter.settle_later(r1, "req-1", "m", 10, 20, "length", 1.0),
            meter.settle_later(r2, "req-2", "m", 5, 3, "stop", 2.0),
        ]
        assert meter.held(alice) == 65 and not any(f.done() for f in later)
    assert [f.result(timeout=30) for f in later] == [50, 11]
    assert meter.held(alice) == 0 and meter.ledger.spent(alice.sha256) == 61
    assert meter.remaining(alice) == 1000 - 61
    # a conflicting re-record fails its future and keeps the hold
    r3 = meter.reserve(alice, 10, 20)
    failed = meter.settle_later(r3, "req-1", "m", 10, 19, "length", 1.0)
    with pytest.raises(UsageError, match="already recorded with other"):
        failed.result(timeout=30)
    assert meter.held(alice) == 50
    assert verify(path) == []


def test_concurrent_reservations_never_overspend(setup):
    meter, secrets, path = setup
    alice = meter.authorize(secrets["alice"])
    errors, settled, refused = [], [], [0]
    lock = threading.Lock()

    def client(t):
        rng = random.Random(t)
        try:
            for j in range(40):
                prompt, max_tokens = rng.randrange(1, 20), rng.randrange(0, 30)
                try:
                    r = meter.reserve(alice, prompt, max_tokens)
                except OverLimit:
                    with lock:
                        refused[0] += 1
                    continue
                # in flight: what is held plus spent never passes the limit
                assert meter.ledger.spent(alice.sha256) + meter.held(alice) <= 1000
                if rng.random() < 0.2:
                    meter.release(r)
                    continue
                cost = meter.settle(
                    r, f"t{t}-{j}", "m", prompt, rng.randrange(max_tokens + 1), "stop", float(t)
                )
                with lock:
                    settled.append(cost)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(t,)) for t in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert refused[0] > 0 and settled  # the limit was actually reached
    spent = meter.ledger.spent(alice.sha256)
    assert spent == sum(settled) <= 1000
    assert meter.held(alice) == 0
    assert verify(path) == [] and period_totals(path, 0, 100)["revenue"] == spent


def test_limits_hold_across_a_reopen_of_the_ledger(setup, tmp_path):
    meter, secrets, path = setup
    alice = meter.authorize(secrets["alice"])
    r = meter.reserve(alice, 100, 400)
    assert meter.settle(r, "req-1", "m", 100, 400, "length", 1.0) == 900
    meter.ledger.close()
    with UsageLedger(path) as ledger:  # a restarted server
        meter2 = Meter(KeyRing.load(str(tmp_path / "keys.json")), ledger)
        alice = meter2.authorize(secrets["alice"])
        assert meter2.remaining(alice) == 100
        with pytest.raises(OverLimit, match="spent 900, held by requests in flight 0"):
            meter2.reserve(alice, 50, 26)  # 50 + 52 = 102 > 100
        r = meter2.reserve(alice, 50, 25)  # exactly 100
        assert meter2.settle(r, "req-2", "m", 50, 25, "stop", 2.0) == 100
        assert ledger.spent(alice.sha256) == 1000 and meter2.remaining(alice) == 0
        with pytest.raises(OverLimit):
            meter2.reserve(alice, 1, 0)
        assert meter2.reserve(alice, 0, 0).worst == 0  # a free request still fits
