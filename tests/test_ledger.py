"""The contribution ledger (`near_jax.contrib.ledger`): round-trips, appends, kill -9 safety."""

import hashlib
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from helpers import REPO
from ledger_rows import ROUND0, ROUND1, RUN, entry, fields, file_digest, sqlite_exec

from near_jax.contrib import ledger as ledger_lib
from near_jax.contrib.ledger import Ledger, LedgerError
from near_jax.contrib.ledger_verify import verify_chain

# ------------------------------------------------------------------------------ append


def test_append_reopen_and_read_back_exactly(tmp_path):
    path = str(tmp_path / "ledger.sqlite")
    with Ledger.open(path, RUN) as led:
        genesis = led.head()
        assert genesis == hashlib.sha256(b"near_jax/ledger/v1\n" + RUN.encode()).hexdigest()
        assert led.last_round() is None and led.count() == 0 and led.entries() == []
        assert led.append_round(0, ROUND0)
        head0 = led.head()
        assert led.append_round(1, ROUND1)
        head1 = led.head()
        assert len({genesis, head0, head1}) == 3
    with Ledger.open(path, RUN) as led:  # reopened: everything came from the file
        assert led.last_round() == 1 and led.count() == 5 and led.head() == head1
        got = led.entries()
        assert [e["seq"] for e in got] == [1, 2, 3, 4, 5]
        expected = [{"round": 0, **e} for e in ROUND0] + [{"round": 1, **e} for e in ROUND1]
        expected[2]["score"] = 0.0  # -0.0 is normalized (SQLite may store it as integer 0)
        assert [fields(e) for e in got] == expected
        for g, x in zip(got, expected, strict=True):  # bit-exact floats and real bools
            for name in ("score", "reward"):
                assert type(g[name]) is type(x[name]) and repr(g[name]) == repr(x[name])
            assert type(g["accepted"]) is bool and type(g["applied"]) is bool
        assert got[0]["score"] == 0.1 + 0.2 != 0.3 and got[3]["reward"] == 2.0**62
        # the chain links: genesis → 1 → 2 → … and each hash covers seq, prev and fields
        prev = genesis
        for g in got:
            assert g["prev_hash"] == prev
            assert g["entry_hash"] == ledger_lib.entry_hash(g["seq"], prev, fields(g))
            prev = g["entry_hash"]
        assert prev == head1 and got[2]["entry_hash"] == head0
        assert [e["contributor"] for e in led.entries(1, 1)] == ["alice", "dave"]
        assert [e["seq"] for e in led.entries(first_round=1)] == [4, 5]
        assert [e["seq"] for e in led.entries(last_round=0)] == [1, 2, 3]
        assert led.entries(2) == []
    assert verify_chain(path, RUN) == []


def test_append_is_idempotent_ordered_and_validated(ledger_path):
    with Ledger.open(ledger_path, RUN) as led:
        head, before = led.head(), led.entries()
        # a restarted aggregator re-appending a recorded round: a no-op, even with other data
        assert led.append_round(1, ROUND1) is False
        assert led.append_round(0, [entry("mallory")]) is False
        assert led.append_round(0, []) is False
        assert led.entries() == before and led.head() == head
        assert led.append_round(5, [entry("a")])  # gaps are fine (rounds with no entries)
        head = led.head()
        with pytest.raises(LedgerError, match="round 3 is not after the ledger's last round 5"):
            led.append_round(3, [entry("b")])  # never recorded, but older than the last
        with pytest.raises(LedgerError, match="round 4 is not after"):
            led.append_round(4, [])
        assert led.count() == 6 and led.last_round() == 5 and led.head() == head
        assert led.append_round(6, []) is True and led.count() == 6  # nothing to record
    assert verify_chain(ledger_path, RUN) == []


def test_an_entry_without_detail_records_it_empty(ledger_path):
    # decisions written before format 2 have no detail: they still record
    old = {k: v for k, v in entry("old").items() if k != "detail"}
    with Ledger.open(ledger_path, RUN) as led:
        assert led.append_round(7, [old])
        assert led.entries(7, 7)[0]["detail"] == ""


def test_malformed_entries_raise_before_writing(ledger_path):
    good = entry("zed")
    bad = [
        {**good, "extra": 1},  # unknown field
        {k: v for k, v in good.items() if k != "reward"},  # missing field
        {**good, "round": 3},  # names another round
        {**good, "round": True},
        {**good, "score": "0.5"},
        {**good, "score": True},  # bool is not a number here
        {**good, "score": float("nan")},
        {**good, "reward": float("inf")},
        {**good, "reward": -1.0},
        {**good, "accepted": 1},  # bools must be bools
        {**good, "contributor": ""},
        {**good, "key_id": None},
        {**good, "statement": "{not json"},
        {**good, "statement": '{"b": 1, "a": 2}'},  # JSON but not canonical
        {**good, "detail": "{not json"},
        {**good, "detail": "[1, 2]"},  # not an object
        {**good, "detail": '{"b": 1, "a": 2}'},  # not canonical
        {**good, "detail": None},
        {**good, "accepted": False, "applied": True, "reason": "x"},
        ["not", "a", "dict"],
    ]
    with Ledger.open(ledger_path, RUN) as led:
        head = led.head()
        for b in bad:
            # the good entry first: nothing of the round may be written when a later one fails
            with pytest.raises(ValueError):
                led.append_round(2, [good, b])
        for r in (-1, True, 2.0):
            with pytest.raises(ValueError):
                led.append_round(r, [good])
        assert led.count() == 5 and led.head() == head and led.last_round() == 1
        assert led.append_round(2, [good, {**good, "contributor": "z2", "score": 3, "round": 2}])
        assert led.entries(2)[1]["score"] == 3.0 and type(led.entries(2)[1]["score"]) is float
    assert verify_chain(ledger_path, RUN) == []


def test_open_checks_run_format_and_file(ledger_path, tmp_path):
    with pytest.raises(LedgerError, match="belongs to run 'demo', not 'other'"):
        Ledger.open(ledger_path, "other")
    sqlite_exec(ledger_path, "UPDATE meta SET value = '1' WHERE key = 'format'")
    with pytest.raises(LedgerError, match="format '1'"):
        Ledger.open(ledger_path, RUN)
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not a database at all\n" * 200)
    with pytest.raises(LedgerError, match="cannot open ledger"):
        Ledger.open(str(garbage), RUN)
    other = str(tmp_path / "other.sqlite")
    sqlite_exec(other, "CREATE TABLE t (x)")
    with pytest.raises(LedgerError, match="not a ledger"):
        Ledger.open(other, RUN)
    with pytest.raises(ValueError):
        Ledger.open(str(tmp_path / "x.sqlite"), "bad/run")


def test_payload_seen_finds_the_earliest(ledger_path):
    with Ledger.open(ledger_path, RUN) as led:
        alice = hashlib.sha256(b"alice").hexdigest()
        assert led.payload_seen(alice) == (0, "alice")
        # replayed by someone else in a later round: still reports the first sighting
        assert led.append_round(4, [entry("eve", payload_sha256=alice)])
        assert led.payload_seen(alice) == (0, "alice")
        assert led.payload_seen("f" * 64) == (1, "alice")
        assert led.payload_seen("0" * 64) is None
        assert led.payload_seen("") is None  # "" means unknown, not a payload


# --------------------------------------------------------------------------- kill -9

CHILD = r"""
import os, signal, sys
from near_jax.contrib.ledger import Ledger
from near_jax.diloco.protocol import dumps

path, mode = sys.argv[1], sys.argv[2]
pad = "x" * 2000  # ~100 KB a round: more than the page cache below, so pages spill
with Ledger.open(path, "crash") as led:
    if mode == "mid":
        # deterministic kill inside round 3's transaction, after pages reached the file
        led._conn.execute("PRAGMA cache_size = 10")
        inserts = [0]
        def trace(sql):
            if sql.startswith("INSERT INTO entries"):
                inserts[0] += 1
                if inserts[0] == 3 * 50 + 40:
                    os.kill(os.getpid(), signal.SIGKILL)
        led._conn.set_trace_callback(trace)
    r = 0
    while True:
        entries = [
            {"contributor": f"island{i:02d}", "key_id": "", "payload_sha256": f"{r:08d}{i:056d}",
             "statement": dumps({"pad": pad, "r": r}).decode(), "signature": "",
             "score": r + i / 7, "accepted": i % 5 != 0, "applied": i % 5 > 1,
             "reason": "" if i % 5 else "rejected", "reward": i / 3}
            for i in range(50)
        ]
        assert led.append_round(r, entries)
        r += 1
"""


def read_count(path) -> int:
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            return conn.execute("SELECT count(*) FROM entries").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error:  # not created yet, or momentarily locked
        return 0


def check_after_crash(path) -> int:
    """All-or-nothing rounds, an intact chain, and the ledger continues; the rounds kept."""
    digest = file_digest(path)
    assert verify_chain(path, "crash") == []
    assert file_digest(path) == digest  # verifying did not roll the journal back in place
    with Ledger.open(path, "crash") as led:  # a read-write open rolls back a hot journal
        rounds = [e["round"] for e in led.entries()]
        kept = sorted(set(rounds))
        assert kept == list(range(len(kept))) and len(kept) >= 3
        assert all(rounds.count(r) == 50 for r in kept), [rounds.count(r) for r in kept]
        assert led.append_round(len(kept), [entry("after-restart")])
        assert led.append_round(len(kept) - 1, [entry("x")]) is False
        count = led.count()
    assert verify_chain(path, "crash", count=count, last_round=len(kept)) == []
    return len(kept)


def test_kill_9_leaves_whole_rounds(tmp_path):
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    started = time.time()
    for i, delay in enumerate([rng.uniform(0.0, 0.05), rng.uniform(0.1, 0.3)]):
        path = str(tmp_path / f"kill{i}.sqlite")
        child = subprocess.Popen([sys.executable, "-c", CHILD, path, "loop"], cwd=REPO)
        try:
            deadline = time.time() + 60
            while read_count(path) < 3 * 50:  # a few rounds recorded
                assert child.poll() is None, f"child exited with {child.returncode}"
                assert time.time() < deadline, "the child never appended 3 rounds"
                time.sleep(0.02)
            time.sleep(delay)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        assert child.returncode == -signal.SIGKILL
        check_after_crash(path)
    assert time.time() - started < 30, f"seed {seed}"


def test_kill_9_inside_a_transaction(tmp_path):
    path = str(tmp_path / "mid.sqlite")
    child = subprocess.run([sys.executable, "-c", CHILD, path, "mid"], cwd=REPO, timeout=60)
    assert child.returncode == -signal.SIGKILL
    # killed with a hot journal: the file itself holds part of round 3 until rolled back
    assert os.path.getsize(path + "-journal") > 0
    # the file without its journal is torn (part of round 3 reached it): the kill did land
    # mid-write, and only the rollback makes it whole
    torn = str(tmp_path / "torn.sqlite")
    shutil.copyfile(path, torn)
    assert verify_chain(torn, "crash")
    assert check_after_crash(path) == 3
    assert not os.path.exists(path + "-journal")  # Ledger.open rolled it back
