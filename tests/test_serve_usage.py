"""The usage ledger's writer (`near_jax.serve.usage`): the chain, idempotency, refused values,
spend totals, threads, and kill -9 safety."""

import hashlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
from usage_rows import SHA_A, SHA_B, digest, fields, filled, rows, sql

from near_jax.serve.usage import FIELDS, UsageError, UsageLedger
from near_jax.serve.usage_verify import verify

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------ record


def test_chain_verifies_and_matches_the_documented_hash(tmp_path):
    path = str(tmp_path / "usage.sqlite")
    with UsageLedger(path) as led:
        genesis = led.head()
        assert genesis == hashlib.sha256(b"near_jax/usage/v1\n").hexdigest()
        assert led.count() == 0 and led.spent(SHA_A) == 0
        for i in range(1, 7):
            assert led.record(**fields(i))
        head = led.head()
        assert led.count() == 6
    assert verify(path) == [] and verify(path, head=head) == []
    prev = genesis
    for seq, i in zip(range(1, 7), range(1, 7), strict=True):
        row = rows(path)[seq - 1]
        assert dict(zip(FIELDS, row[1:-2], strict=True)) == fields(i)
        text = json.dumps(
            {"seq": seq, "prev_hash": prev, **fields(i)}, sort_keys=True, separators=(",", ":")
        )
        assert row[-2] == prev and row[-1] == hashlib.sha256(text.encode()).hexdigest()
        prev = row[-1]
    assert prev == head
    # a truncated tail is a valid shorter chain: only the head anchor catches it
    sql(path, "DELETE FROM usage WHERE seq = 6")
    assert verify(path) == []
    assert verify(path, head=head) == [
        f"the head is {rows(path)[-1][-1][:16]}…, expected {head[:16]}… "
        "(truncated or rewritten tail)"
    ]


def test_record_is_idempotent_and_refuses_a_conflicting_rerecord(tmp_path):
    path = filled(tmp_path, 3)
    with UsageLedger(path) as led:
        assert led.record(**fields(2)) is False
        assert led.record(**fields(2, created=1000 + 2 / 4)) is False  # same value, as a float
        for name, value in [
            ("cost", 0),
            ("finish", "error"),
            ("created", 1.0),
            ("key_sha256", SHA_B),
            ("completion_tokens", 5),
        ]:
            with pytest.raises(
                UsageError, match=f"'req-000002' is already recorded with other {name}$"
            ):
                led.record(**fields(2, **{name: value}))
        with pytest.raises(UsageError, match="other model, cost$"):
            led.record(**fields(2, model="m", cost=0))
        assert led.count() == 3
    assert verify(path) == []


@pytest.mark.parametrize(
    "name,value",
    [
        ("request_id", ""),
        ("request_id", "x" * 201),
        ("request_id", "a\nb"),
        ("request_id", 5),
        ("key_name", "-bad"),
        ("key_sha256", "A" * 64),
        ("model", ""),
        ("prompt_tokens", -1),
        ("prompt_tokens", True),
        ("completion_tokens", 1.0),
        ("completion_tokens", 1 << 41),
        ("cost", -1),
        ("cost", 10**16),
        ("finish", "done"),
        ("created", -1.0),
        ("created", float("nan")),
        ("created", float("inf")),
        ("created", "1"),
        ("created", 10**400),
        ("created", -1),
    ],
)
def test_record_refuses_bad_values_writing_nothing(tmp_path, name, value):
    path = filled(tmp_path, 2)
    before = digest(path)
    with UsageLedger(path) as led, pytest.raises(ValueError, match=f"^{name} .*: not"):
        led.record(**fields(9, **{name: value}))
    assert digest(path) == before


def test_spent_survives_reopen_and_sees_other_writers(tmp_path):
    path = filled(tmp_path, 9)
    want_a = sum(fields(i)["cost"] for i in range(1, 10) if i % 3)
    want_b = sum(fields(i)["cost"] for i in range(1, 10) if not i % 3)
    with UsageLedger(path) as led, UsageLedger(path) as other:
        assert led.spent(SHA_A) == want_a and led.spent(SHA_B) == want_b
        assert led.spent("c" * 64) == 0
        assert led.record(**fields(10))  # alice
        assert led.spent(SHA_A) == want_a + fields(10)["cost"]
        assert other.record(**fields(12))  # bob, through another connection
        assert led.spent(SHA_B) == want_b + fields(12)["cost"]
        assert led.spent(SHA_A) == want_a + fields(10)["cost"]
    with UsageLedger(path) as led:
        assert led.spent(SHA_B) == want_b + fields(12)["cost"]


def test_open_refuses_other_files(tmp_path):
    other = str(tmp_path / "other.sqlite")
    sql(other, "CREATE TABLE x (a)")
    with pytest.raises(UsageError, match="is a SQLite database but not a usage ledger"):
        UsageLedger(other)
    path = filled(tmp_path, 1)
    sql(path, "UPDATE meta SET value = '9' WHERE key = 'format'")
    with pytest.raises(UsageError, match="has format '9', this reader: 1"):
        UsageLedger(path)
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"not a database at all" * 100)
    with pytest.raises(UsageError, match="cannot open usage ledger .*garbage"):
        UsageLedger(str(garbage))


# ----------------------------------------------------------------------------- threads


def test_records_from_8_threads_keep_the_chain(tmp_path):
    path = str(tmp_path / "usage.sqlite")
    errors = []
    with UsageLedger(path) as led:

        def work(t):
            try:
                for j in range(25):
                    i = 1000 * (t + 1) + j
                    assert led.record(**fields(i))
                    assert led.record(**fields(i)) is False
                    led.spent(SHA_A)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        ids = [1000 * (t + 1) + j for t in range(8) for j in range(25)]
        assert led.count() == 200
        assert led.spent(SHA_A) == sum(fields(i)["cost"] for i in ids if i % 3)
        assert led.spent(SHA_B) == sum(fields(i)["cost"] for i in ids if not i % 3)
    assert verify(path) == []
    assert sorted(r[1] for r in rows(path)) == sorted(fields(i)["request_id"] for i in ids)


# ------------------------------------------------------------------------------ submit


def test_submit_commits_waiting_records_together(tmp_path):
    path = str(tmp_path / "usage.sqlite")
    commits = []
    with UsageLedger(path) as led:
        led._conn.set_trace_callback(lambda s: commits.append(s) if s == "COMMIT" else None)
        with led._lock:  # the writer blocks on its first record; 39 more queue behind it
            futures = [led.submit(**fields(i)) for i in range(1, 41)]
            time.sleep(0.1)
            assert not any(f.done() for f in futures)
        assert [f.result(timeout=30) for f in futures] == [True] * 40
        assert len(commits) <= 2  # 40 rows, at most 2 transactions
        assert led.count() == 40
        assert led.spent(SHA_A) == sum(fields(i)["cost"] for i in range(1, 41) if i % 3)
    assert verify(path) == []
    assert [r[1] for r in rows(path)] == [fields(i)["request_id"] for i in range(1, 41)]


def test_submit_resolves_each_row_of_a_group_on_its_own(tmp_path):
    path = filled(tmp_path, 2)
    with UsageLedger(path) as led:
        with led._lock:  # one group: a rerecord, a conflict, two new rows
            same = led.submit(**fields(1))
            conflict = led.submit(**fields(2, cost=999))
            new = [led.submit(**fields(i)) for i in (3, 4)]
            twice = led.submit(**fields(3))
        assert same.result(timeout=30) is False
        with pytest.raises(UsageError, match="req-000002.*already recorded with other cost"):
            conflict.result(timeout=30)
        assert [f.result(timeout=30) for f in new] == [True, True]
        assert twice.result(timeout=30) is False
        with pytest.raises(ValueError, match="prompt_tokens -1"):
            led.submit(**fields(5, prompt_tokens=-1))  # at once, queueing nothing
    assert verify(path) == []
    assert [r[1] for r in rows(path)] == [fields(i)["request_id"] for i in (1, 2, 3, 4)]


def test_close_commits_what_was_submitted_and_then_refuses(tmp_path):
    path = str(tmp_path / "usage.sqlite")
    led = UsageLedger(path)
    futures = [led.submit(**fields(i)) for i in range(1, 21)]
    led.close()
    assert all(f.result(timeout=0) is True for f in futures)
    with pytest.raises(UsageError, match="closed"):
        led.submit(**fields(21))
    assert verify(path) == [] and len(rows(path)) == 20


def test_a_failed_group_fails_every_future_and_the_writer_goes_on(tmp_path):
    path = str(tmp_path / "usage.sqlite")
    with UsageLedger(path) as led:
        blocker = sqlite3.connect(path, isolation_level=None, timeout=0)
        led._conn.execute("PRAGMA busy_timeout = 0")
        blocker.execute("BEGIN EXCLUSIVE")  # another process holds the file
        failed = [led.submit(**fields(i)) for i in (1, 2)]
        for f in failed:
            with pytest.raises(UsageError, match="cannot record to .*locked"):
                f.result(timeout=30)
        blocker.execute("ROLLBACK")
        blocker.close()
        assert led.submit(**fields(1)).result(timeout=30) is True
    assert verify(path) == [] and len(rows(path)) == 1


# ----------------------------------------------------------------------------- kill -9

CHILD = r"""
import os, signal, sqlite3, sys
sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
from usage_rows import fields
from near_jax.serve.usage import UsageLedger

path, mode = sys.argv[1], sys.argv[2]
if mode == "mid":
    # small pages and a tiny cache: a record's pages spill to the file before COMMIT
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA page_size = 512")
    conn.execute("VACUUM")
    conn.close()
led = UsageLedger(path)
if mode == "mid":
    led._conn.execute("PRAGMA cache_size = 1")
    def trace(sql):
        # killed inside record 5's transaction once the spill made the journal hot
        if sql == "COMMIT" and n >= 5 and os.path.exists(path + "-journal"):
            os.kill(os.getpid(), signal.SIGKILL)
    led._conn.set_trace_callback(trace)
def row(n):
    return fields(n, request_id=f"req-{n:06d}" + "r" * 180, model="m" * 190)
n = 0
while mode == "group":  # group commits of 8 rows on the writer thread
    for future in [led.submit(**row(n + k)) for k in range(1, 9)]:
        assert future.result() is True
    n += 8
while True:
    n += 1
    led.record(**row(n))
"""


def count_rows(path: str) -> int:
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            return conn.execute("SELECT count(*) FROM usage").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error:  # not created yet, momentarily locked, or a hot journal
        return 0


def check_after_crash(path: str) -> int:
    """Every row whole and in order, verify passes without writing, reopening rolls back
    and the ledger continues; the number of rows kept."""
    before = digest(path)
    assert verify(path) == []
    assert digest(path) == before  # verify did not roll the journal back in place
    with UsageLedger(path) as led:  # a read-write open rolls back a hot journal
        kept = rows(path)
        assert [r[0] for r in kept] == list(range(1, len(kept) + 1))
        for r in kept:
            want = fields(r[0], request_id=f"req-{r[0]:06d}" + "r" * 180, model="m" * 190)
            assert dict(zip(FIELDS, r[1:-2], strict=True)) == want
        assert led.record(**fields(10**5))
        assert led.spent(SHA_A) + led.spent(SHA_B) == sum(r[7] for r in rows(path))
    assert verify(path) == []
    return len(kept)


@pytest.mark.parametrize("mode", ["loop", "group"])
def test_kill_9_while_recording_leaves_whole_rows(tmp_path, mode):
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    started = time.time()
    for i, delay in enumerate([0.0, rng.uniform(0.0, 0.02), rng.uniform(0.02, 0.1)]):
        path = str(tmp_path / f"kill{i}.sqlite")
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, path, mode],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": REPO},
        )
        try:
            deadline = time.time() + 30
            while count_rows(path) < 5:
                assert child.poll() is None, f"child exited with {child.returncode}"
                assert time.time() < deadline, "the child never recorded 5 rows"
                time.sleep(0.01)
            time.sleep(delay)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        assert child.returncode == -signal.SIGKILL
        assert check_after_crash(path) >= 5, f"seed {seed}"
    assert time.time() - started < 30, f"seed {seed}"


def test_kill_9_inside_a_record_leaves_it_absent(tmp_path):
    path = str(tmp_path / "mid.sqlite")
    child = subprocess.run(
        [sys.executable, "-c", CHILD, path, "mid"],
        cwd=REPO,
        timeout=60,
        env={**os.environ, "PYTHONPATH": REPO},
    )
    assert child.returncode == -signal.SIGKILL
    # killed with a hot journal: a read-only open cannot read the file until it is rolled back
    assert os.path.getsize(path + "-journal") > 0
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            conn.execute("SELECT count(*) FROM usage").fetchone()
        finally:
            conn.close()
    torn = str(tmp_path / "torn.sqlite")
    shutil.copyfile(path, torn)
    assert check_after_crash(path) == 4  # record 5 is absent, 1..4 whole
    assert not os.path.exists(path + "-journal")  # the open rolled it back
    # the kill landed mid-write: part of record 5 had reached the file, and only the
    # rollback took it out again
    with open(torn, "rb") as f, open(path, "rb") as g:
        assert f.read() != g.read()
