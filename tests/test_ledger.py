"""The contribution ledger: round-trips, tamper detection, the store mirror, kill -9 safety."""

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

from near_jax.contrib import ledger as ledger_lib
from near_jax.contrib.ledger import ENTRY_FIELDS, Ledger, LedgerError
from near_jax.contrib.ledger_mirror import download, store_key, upload
from near_jax.contrib.ledger_verify import verify_chain
from near_jax.diloco.protocol import dumps
from near_jax.diloco.store import ObjectStore

RUN = "demo"


def entry(contributor: str, **overrides) -> dict:
    base = {
        "contributor": contributor,
        "key_id": f"key-{contributor}",
        "payload_sha256": hashlib.sha256(contributor.encode()).hexdigest(),
        "statement": dumps({"island": contributor, "round": 0}).decode(),
        "signature": "c2ln",
        "score": 0.1,
        "accepted": True,
        "applied": True,
        "reason": "",
        "reward": 1.0 / 3.0,
    }
    return {**base, **overrides}


ROUND0 = [
    entry("alice", score=0.1 + 0.2, reward=1e-300),
    entry("bob", score=None, accepted=False, applied=False, reason="non-finite delta", reward=0.0),
    entry("carol", score=-0.0, reward=5e-324, applied=False, reason="outlier"),
]
ROUND1 = [
    entry("alice", payload_sha256="f" * 64, score=1e300, reward=2.0**62),
    entry("dave", key_id="", payload_sha256="", statement="", signature="", score=-12.5),
]


def fields(e: dict) -> dict:
    return {f: e[f] for f in ENTRY_FIELDS if f in e}


def sqlite_exec(path, *statements) -> None:
    """Raw edits, as an attacker with write access to the file would make them."""
    conn = sqlite3.connect(path)
    with conn:
        for s in statements:
            if isinstance(s, tuple):
                conn.execute(*s)
            else:
                conn.execute(s)
    conn.close()


@pytest.fixture
def ledger_path(tmp_path):
    """A ledger with rounds 0 and 1 (5 entries)."""
    path = str(tmp_path / "ledger.sqlite")
    with Ledger.open(path, RUN) as led:
        assert led.append_round(0, ROUND0) and led.append_round(1, ROUND1)
    return path


def file_digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


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
    sqlite_exec(ledger_path, "UPDATE meta SET value = '2' WHERE key = 'format'")
    with pytest.raises(LedgerError, match="format '2'"):
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


# ------------------------------------------------------------------------------ verify


def rehash_row(path, seq: int) -> None:
    """An attacker who edits a row and recomputes its entry_hash to match."""
    conn = sqlite3.connect(path)
    cols = ", ".join(ENTRY_FIELDS)
    row = conn.execute(f"SELECT {cols}, prev_hash FROM entries WHERE seq = ?", (seq,)).fetchone()
    f = dict(zip(ENTRY_FIELDS, row[:-1], strict=True))
    f["accepted"], f["applied"] = bool(f["accepted"]), bool(f["applied"])
    h = ledger_lib.entry_hash(seq, row[-1], f)
    with conn:
        conn.execute("UPDATE entries SET entry_hash = ? WHERE seq = ?", (h, seq))
    conn.close()


def swap_rows(path, a: int, b: int) -> None:
    sqlite_exec(
        path,
        ("UPDATE entries SET seq = -1 WHERE seq = ?", (a,)),
        ("UPDATE entries SET seq = ? WHERE seq = ?", (a, b)),
        ("UPDATE entries SET seq = ? WHERE seq = -1", (b,)),
    )


def swap_contents(path, a: int, b: int) -> None:
    """Swaps the hashed fields of two rows, leaving seq and the hashes in place."""
    conn = sqlite3.connect(path)
    cols = ", ".join(ENTRY_FIELDS)
    ra = conn.execute(f"SELECT {cols} FROM entries WHERE seq = ?", (a,)).fetchone()
    rb = conn.execute(f"SELECT {cols} FROM entries WHERE seq = ?", (b,)).fetchone()
    sets = ", ".join(f"{c} = ?" for c in ENTRY_FIELDS)
    with conn:
        conn.execute(f"UPDATE entries SET {sets} WHERE seq = ?", (*rb, a))
        conn.execute(f"UPDATE entries SET {sets} WHERE seq = ?", (*ra, b))
    conn.close()


def forge_last(path, prev: str) -> None:
    """Appends a forged entry 6 with a correct entry_hash for its contents."""
    f = {"round": 2, **entry("mallory", reward=100.0)}
    h = ledger_lib.entry_hash(6, prev, f)
    vals = [int(v) if isinstance(v, bool) else v for v in f.values()]
    cols = ", ".join(f)
    qs = ", ".join("?" * (len(f) + 3))
    sql = f"INSERT INTO entries (seq, {cols}, prev_hash, entry_hash) VALUES ({qs})"
    sqlite_exec(path, (sql, (6, *vals, prev, h)))


TAMPERS = {
    "edit score": (
        lambda p: sqlite_exec(p, "UPDATE entries SET score = 0.75 WHERE seq = 3"),
        ["entry 3: contents do not match its hash (edited)"],
    ),
    "edit reason": (
        lambda p: sqlite_exec(p, "UPDATE entries SET reason = '' WHERE seq = 2"),
        ["entry 2: contents do not match its hash (edited)"],
    ),
    "edit accepted": (
        lambda p: sqlite_exec(p, "UPDATE entries SET accepted = 0 WHERE seq = 1"),
        ["entry 1: contents do not match its hash (edited)"],
    ),
    "edit reward tiny": (  # one ulp more money
        lambda p: sqlite_exec(p, "UPDATE entries SET reward = reward * (1 + 2e-16) WHERE seq = 5"),
        ["entry 5: contents do not match its hash (edited)"],
    ),
    "edit and rehash": (
        lambda p: (
            sqlite_exec(p, "UPDATE entries SET reward = 50.0 WHERE seq = 3"),
            rehash_row(p, 3),
        ),
        ["entry 4: prev_hash does not match entry 3 (deleted, inserted or reordered rows)"],
    ),
    "delete row": (
        lambda p: sqlite_exec(p, "DELETE FROM entries WHERE seq = 4"),
        [
            "entry 4 is missing (seq jumps 3 → 5)",
            "entry 5: prev_hash does not match entry 3 (deleted, inserted or reordered rows)",
        ],
    ),
    "delete first row": (
        lambda p: sqlite_exec(p, "DELETE FROM entries WHERE seq = 1"),
        ["entries 1..1 are missing (seq starts at 2)", "entry 2: prev_hash does not match the"],
    ),
    "reorder rows": (
        lambda p: swap_rows(p, 2, 3),
        [
            "entry 2: prev_hash does not match entry 1",
            "entry 2: contents do not match its hash (edited)",
            "entry 4: prev_hash does not match entry 3",
        ],
    ),
    "swap contents": (
        lambda p: swap_contents(p, 1, 2),
        ["entry 1: contents do not match its hash", "entry 2: contents do not match its hash"],
    ),
    "forged row, wrong prev_hash": (
        lambda p: forge_last(p, "0" * 64),
        ["entry 6: prev_hash does not match entry 5 (deleted, inserted or reordered rows)"],
    ),
    "round goes back": (
        lambda p: sqlite_exec(p, "UPDATE entries SET round = 0 WHERE seq = 5"),
        ["entry 5: contents do not match", "entry 5: round 0 after round 1 (rounds must not"],
    ),
    "infinite score": (
        lambda p: sqlite_exec(p, "UPDATE entries SET score = 9e999 WHERE seq = 1"),
        ["entry 1: score is inf, not finite"],
    ),
    "NaN score (SQLite stores NULL)": (
        lambda p: sqlite_exec(p, ("UPDATE entries SET score = ? WHERE seq = 1", (float("nan"),))),
        ["entry 1: contents do not match its hash (edited)"],
    ),
    "text reward": (
        lambda p: sqlite_exec(p, "UPDATE entries SET reward = 'lots' WHERE seq = 1"),
        ["entry 1: reward is 'lots', not a float"],
    ),
    "bool 2": (
        lambda p: sqlite_exec(p, "UPDATE entries SET applied = 2 WHERE seq = 1"),
        ["entry 1: applied is 2, not 0 or 1"],
    ),
    "meta run": (
        lambda p: sqlite_exec(p, "UPDATE meta SET value = 'other' WHERE key = 'run'"),
        ["meta run is 'other', expected 'demo'"],
    ),
    "meta format": (
        lambda p: sqlite_exec(p, "UPDATE meta SET value = '7' WHERE key = 'format'"),
        ["meta format is '7', expected '1'"],
    ),
    "meta dropped": (
        lambda p: sqlite_exec(p, "DROP TABLE meta"),
        ["the meta table is missing"],
    ),
}


@pytest.mark.parametrize("name", list(TAMPERS))
def test_verify_detects_tampering_without_modifying_the_file(ledger_path, name):
    assert verify_chain(ledger_path, RUN) == []
    tamper, expected = TAMPERS[name]
    tamper(ledger_path)
    digest = file_digest(ledger_path)
    problems = verify_chain(ledger_path, RUN)
    assert problems, name
    for want in expected:
        assert any(p.startswith(want) for p in problems), (want, problems)
    assert all("\n" not in p for p in problems)
    assert file_digest(ledger_path) == digest  # read-only
    assert not os.path.exists(ledger_path + "-journal")


def test_verify_without_run_uses_meta_and_still_catches_a_renamed_run(ledger_path):
    assert verify_chain(ledger_path) == []
    sqlite_exec(ledger_path, "UPDATE meta SET value = 'other' WHERE key = 'run'")
    # the chain was rooted in the original run's genesis hash
    problems = verify_chain(ledger_path)
    assert problems == [
        "entry 1: prev_hash does not match the genesis hash of run 'other' "
        "(another run, or rows deleted at the start)"
    ]


def test_truncated_tail_needs_an_anchor(ledger_path):
    with Ledger.open(ledger_path, RUN) as led:
        head, count, last = led.head(), led.count(), led.last_round()
    anchors = {"head": head, "count": count, "last_round": last}
    assert verify_chain(ledger_path, RUN, **anchors) == []
    sqlite_exec(ledger_path, "DELETE FROM entries WHERE round = 1")  # the whole last round
    assert verify_chain(ledger_path, RUN) == []  # a valid, shorter chain
    problems = verify_chain(ledger_path, RUN, **anchors)
    assert len(problems) == 3
    assert "5" in problems[0] and "expected 1" in problems[1] and "tail" in problems[2]
    with Ledger.open(ledger_path, RUN) as led:
        assert led.append_round(1, ROUND1)  # re-extended: the same round, the same head
        assert led.head() == head
    # a forged last row with the right prev_hash and its own hash extends a valid chain too
    forge_last(ledger_path, head)
    assert verify_chain(ledger_path, RUN) == []
    with Ledger.open(ledger_path, RUN) as led:
        forged_head = led.head()
    problems = verify_chain(ledger_path, RUN, **anchors)
    assert [p.split(",")[0] for p in problems] == [
        "the ledger has 6 entries",
        "the last round is 2",
        f"the head is {forged_head[:16]}…",
    ]


def test_verify_never_raises_on_damaged_files(ledger_path, tmp_path):
    garbage = tmp_path / "garbage"
    garbage.write_bytes(os.urandom(4096))
    problems = verify_chain(str(garbage), RUN)
    assert len(problems) == 1 and problems[0].startswith("not a SQLite database: ")
    assert verify_chain(str(tmp_path / "absent"), RUN) == [f"no ledger file at {tmp_path}/absent"]
    raw = open(ledger_path, "rb").read()
    half = tmp_path / "half.sqlite"
    half.write_bytes(raw[: len(raw) // 2])
    assert verify_chain(str(half), RUN)
    rng = random.Random(0)
    for i in range(20):  # bit rot in the pages holding the rows and indexes
        damaged = bytearray(raw)
        for _ in range(8):
            damaged[rng.randrange(100, len(raw))] ^= 1 << rng.randrange(8)
        path = tmp_path / f"rot{i}.sqlite"
        path.write_bytes(bytes(damaged))
        problems = verify_chain(str(path), RUN)
        assert isinstance(problems, list) and all(isinstance(p, str) for p in problems)


# ------------------------------------------------------------------------------- store


def test_store_round_trip_and_damage(ledger_path, tmp_path):
    store = ObjectStore.open(str(tmp_path / "store"), must_exist=False)
    assert store_key(RUN) == "demo/ledger.sqlite"
    target = str(tmp_path / "copy" / "ledger.sqlite")
    os.makedirs(os.path.dirname(target))
    assert download(store, RUN, target) is False and not os.path.exists(target)
    n = upload(store, RUN, ledger_path)
    assert n == store.bytes_written and n > 0
    assert download(store, RUN, target) is True
    assert verify_chain(target, RUN) == []
    with Ledger.open(ledger_path, RUN) as a, Ledger.open(target, RUN) as b:
        assert a.entries() == b.entries() and a.head() == b.head()
        assert a.append_round(2, [entry("late")])
    upload(store, RUN, ledger_path)  # replaces the copy
    assert download(store, RUN, target)
    with Ledger.open(target, RUN) as b:
        assert b.count() == 6
    assert os.listdir(os.path.dirname(target)) == ["ledger.sqlite"]  # no temp files left
    with pytest.raises(LedgerError, match="belongs to run 'demo', not 'other'"):
        upload(store, "other", ledger_path)
    with pytest.raises(LedgerError, match="no ledger file"):
        upload(store, RUN, str(tmp_path / "absent.sqlite"))

    good = file_digest(target)
    obj = tmp_path / "store" / "demo" / "ledger.sqlite"
    raw = bytearray(obj.read_bytes())
    raw[-100] ^= 0xFF  # a torn or bit-flipped object
    obj.write_bytes(bytes(raw))
    with pytest.raises(LedgerError, match="damaged"):
        download(store, RUN, target)
    assert file_digest(target) == good  # the local file is untouched

    # intact framing but tampered contents: refused, local file kept
    sqlite_exec(ledger_path, "UPDATE entries SET reward = 99.0 WHERE seq = 6")
    sqlite_exec(ledger_path, "UPDATE meta SET value = 'demo' WHERE key = 'run'")
    upload(store, RUN, ledger_path)
    with pytest.raises(LedgerError, match="fails verification: entry 6: contents"):
        download(store, RUN, target)
    assert file_digest(target) == good
    store.put(store_key(RUN), b"not sqlite")
    with pytest.raises(LedgerError, match="not a SQLite database"):
        download(store, RUN, target)


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
