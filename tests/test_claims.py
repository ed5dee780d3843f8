"""An island's claim on its name: one live island per name, a killed one can restart."""

import json
import socket
import subprocess
import sys

import pytest
from helpers import FakeClock

from near_jax.diloco.claims import Claim, NameTaken, claim_key
from near_jax.diloco.store import ObjectStore


@pytest.fixture
def store(tmp_path):
    return ObjectStore.open(str(tmp_path))


def test_a_second_island_with_a_live_name_is_refused_naming_the_holder(store):
    clock = FakeClock()
    first = Claim(store, "demo", "eu-1", clock=clock, holder="hostA:1:aa")
    first.acquire()
    second = Claim(store, "demo", "eu-1", clock=clock, holder="hostB:2:bb")
    clock.t += 30
    with pytest.raises(NameTaken, match="'eu-1' is held by hostA:1:aa") as info:
        second.acquire()
    assert len(str(info.value).splitlines()) == 1
    Claim(store, "demo", "eu-2", clock=clock, holder="hostB:2:bb").acquire()  # other names: fine
    assert first.renew() and not first.lost  # the holder renews its own claim


def test_a_stale_claim_is_taken_over_and_its_old_holder_learns_it(store):
    clock = FakeClock()
    first = Claim(store, "demo", "eu-1", clock=clock, holder="hostA:1:aa", lease=60)
    first.acquire()
    clock.t += 61  # no heartbeat for a lease: the holder was killed
    Claim(store, "demo", "eu-1", clock=clock, holder="hostB:2:bb").acquire()
    assert not first.renew() and first.lost == "hostB:2:bb"


def test_a_dead_process_on_this_host_is_taken_over_at_once(store):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Claim(store, "demo", "eu-1", holder=f"{socket.gethostname()}:{dead}:aa").acquire()
    again = Claim(store, "demo", "eu-1")
    again.acquire()
    assert json.loads(store.get(claim_key("demo", "eu-1")))["holder"] == again.holder
    again.release()
    assert store.get(claim_key("demo", "eu-1")) is None


def test_an_unreadable_claim_is_replaced(store, tmp_path):
    (tmp_path / "demo" / "claims").mkdir(parents=True)
    (tmp_path / "demo" / "claims" / "eu-1").write_bytes(b"garbage")
    claim = Claim(store, "demo", "eu-1")
    claim.acquire()
    assert claim.renew()


@pytest.mark.parametrize("renewed_at", ["soon", None, [1], "nan", 1e400])
def test_a_claim_with_a_junk_time_counts_as_stale(store, renewed_at):
    """A claim is written by another party: a time that is not a number never crashes."""
    store.put(
        claim_key("demo", "eu-1"),
        json.dumps({"holder": "hostA:1:aa", "renewed_at": renewed_at}).encode(),
    )
    Claim(store, "demo", "eu-1", clock=FakeClock(), holder="hostB:2:bb").acquire()
