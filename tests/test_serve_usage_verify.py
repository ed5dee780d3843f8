"""Reading a usage ledger back (`near_jax.serve.usage_verify`): `verify` names every kind of
tampering without writing or raising, and `period_totals` is exact."""

import os
import random
import sqlite3

import pytest
from usage_rows import digest, fields, filled, rows, sql

from near_jax.serve import usage
from near_jax.serve.usage import UsageError, UsageLedger
from near_jax.serve.usage_verify import period_totals, verify

# ------------------------------------------------------------------------------ verify

TAMPERED = [
    ("UPDATE usage SET request_id = 'req-x' WHERE seq = 3", ["row 3: contents do not match"]),
    ("UPDATE usage SET key_name = 'carol' WHERE seq = 3", ["row 3: contents do not match"]),
    ("UPDATE usage SET key_sha256 = '" + "c" * 64 + "' WHERE seq = 3", ["row 3: contents"]),
    ("UPDATE usage SET model = 'other' WHERE seq = 3", ["row 3: contents do not match"]),
    ("UPDATE usage SET prompt_tokens = 1 WHERE seq = 3", ["row 3: contents do not match"]),
    ("UPDATE usage SET completion_tokens = 0 WHERE seq = 3", ["row 3: contents"]),
    ("UPDATE usage SET cost = 0 WHERE seq = 3", ["row 3: contents do not match"]),
    ("UPDATE usage SET finish = 'stop' WHERE seq = 3", ["row 3: contents do not match"]),
    ("UPDATE usage SET created = 0.5 WHERE seq = 3", ["row 3: contents do not match"]),
    (
        "UPDATE usage SET entry_hash = '" + "0" * 64 + "' WHERE seq = 3",
        ["row 3: contents do not match", "row 4: prev_hash does not match row 3"],
    ),
    (
        "UPDATE usage SET prev_hash = '" + "0" * 64 + "' WHERE seq = 3",
        ["row 3: prev_hash does not match row 2", "row 3: contents"],
    ),
    ("UPDATE usage SET cost = -4 WHERE seq = 3", ["row 3: cost -4 is not an int in 0.."]),
    ("UPDATE usage SET cost = 2.5 WHERE seq = 3", ["row 3: cost 2.5 is not an int"]),
    ("UPDATE usage SET prompt_tokens = 'many' WHERE seq = 3", ["row 3: prompt_tokens 'many'"]),
    ("UPDATE usage SET created = 'later' WHERE seq = 3", ["row 3: created 'later' is not a"]),
    ("UPDATE usage SET finish = 'exploded' WHERE seq = 3", ["row 3: finish 'exploded' is not"]),
    ("UPDATE usage SET key_sha256 = 'xyz' WHERE seq = 3", ["row 3: key_sha256 'xyz' is not 64"]),
    (
        "UPDATE usage SET request_id = CAST('req-000003' AS BLOB) WHERE seq = 3",
        ["row 3: request_id b'req-000003' is not text"],
    ),
    (
        "UPDATE usage SET model = CAST(X'6dff' AS TEXT) WHERE seq = 3",
        ["row 3: model 'm\\udcff' is not 1-200 printable"],
    ),
    (
        "DELETE FROM usage WHERE seq = 3",
        ["row 3 is missing (seq jumps 2 → 4)", "row 4: prev_hash does not match row 2"],
    ),
    ("DELETE FROM usage WHERE seq IN (3, 4)", ["rows 3..4 are missing (seq jumps 2 → 5)"]),
    (
        "DELETE FROM usage WHERE seq = 1",
        ["rows 1..1 are missing (seq starts at 2)", "row 2: prev_hash does not match the genesis"],
    ),
    (
        "UPDATE usage SET seq = 0 WHERE seq = 1",
        [
            "row 0: seq out of range (expected 1)",
            "row 0: contents",
            "row 1 is missing (seq jumps 0 → 2)",
        ],
    ),
    ("UPDATE meta SET value = '2' WHERE key = 'format'", ["meta format is '2', expected '1'"]),
    ("DROP TABLE meta", ["the meta table is missing"]),
]


@pytest.mark.parametrize("statement,expected", TAMPERED)
def test_verify_names_each_tampering(tmp_path, statement, expected):
    path = filled(tmp_path)
    sql(path, statement)
    before = digest(path)
    problems = verify(path)
    assert problems, statement
    for want in expected:
        assert any(p.startswith(want) for p in problems), (want, problems)
    assert all("\n" not in p for p in problems)
    assert digest(path) == before  # verify never writes


def test_verify_catches_swapped_rows(tmp_path):
    path = filled(tmp_path)
    sql(
        path,
        "UPDATE usage SET seq = 100 WHERE seq = 3",
        "UPDATE usage SET seq = 3 WHERE seq = 4",
        "UPDATE usage SET seq = 4 WHERE seq = 100",
    )
    problems = verify(path)
    assert "row 3: prev_hash does not match row 2 (deleted, inserted or reordered rows)" in problems
    assert "row 3: contents do not match its hash (edited)" in problems
    assert "row 5: prev_hash does not match row 4 (deleted, inserted or reordered rows)" in problems
    # an edit that also recomputes the row's hash still breaks the next row's link
    os.makedirs(tmp_path / "b")
    path2 = filled(tmp_path / "b")
    conn = sqlite3.connect(path2, isolation_level=None)
    prev = conn.execute("SELECT entry_hash FROM usage WHERE seq = 2").fetchone()[0]
    forged = usage.entry_hash(3, prev, fields(3, cost=0))
    conn.execute("UPDATE usage SET cost = 0, entry_hash = ? WHERE seq = 3", (forged,))
    conn.close()
    assert verify(path2) == [
        "row 4: prev_hash does not match row 3 (deleted, inserted or reordered rows)"
    ]


def test_verify_catches_a_duplicate_request_id_without_the_constraint(tmp_path):
    path = filled(tmp_path)
    sql(
        path,
        "PRAGMA writable_schema = ON",
        "UPDATE sqlite_master SET sql = replace(sql, 'UNIQUE', '') WHERE name = 'usage'",
        "DELETE FROM sqlite_master WHERE name LIKE 'sqlite_autoindex_usage%'",
        "PRAGMA writable_schema = OFF",
        "VACUUM",
    )
    head = rows(path)[-1][-1]
    again = fields(2)
    values = (7, *again.values(), head, usage.entry_hash(7, head, again))
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(f"INSERT INTO usage VALUES ({', '.join('?' * len(values))})", values)
    conn.close()
    assert verify(path) == ["row 7: request_id 'req-000002' is also row 2's"]


def test_verify_never_raises_on_garbage(tmp_path):
    assert verify(str(tmp_path / "nope.sqlite")) == [
        f"no usage ledger file at {tmp_path}/nope.sqlite"
    ]
    garbage = tmp_path / "garbage"
    garbage.write_bytes(bytes(random.Random(0).randrange(256) for _ in range(5000)))
    [problem] = verify(str(garbage))
    assert problem.startswith("not a SQLite database:")
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert verify(str(empty)) == ["the meta table is missing", "the usage table is missing"]
    # a real ledger with its middle pages overwritten
    path = filled(tmp_path, 200)
    with open(path, "r+b") as f:
        f.seek(4096 * 2)
        f.write(b"\x5a" * 4096)
    problems = verify(path)
    assert problems and all(isinstance(p, str) and "\n" not in p for p in problems)
    with pytest.raises(UsageError):
        period_totals(path, 0, 1e9)


# ------------------------------------------------------------------------------ totals


def test_period_totals_are_exact(tmp_path):
    rng = random.Random(1)
    path = str(tmp_path / "usage.sqlite")
    recorded = []
    with UsageLedger(path) as led:
        for i in range(1, 301):
            f = fields(
                i,
                created=float(rng.randrange(0, 100)) + rng.choice([0.0, 0.5]),
                cost=rng.randrange(10**15),
                prompt_tokens=rng.randrange(1 << 40),
                completion_tokens=rng.randrange(1 << 30),
            )
            led.record(**f)
            recorded.append((i, f))
    hashes = {r[0]: r[-1] for r in rows(path)}
    for start, end in [(0, 100), (10, 20), (10.5, 10.5), (20, 20.5), (99.5, 1e9), (-5, 0)]:
        inside = [(seq, f) for seq, f in recorded if start <= f["created"] < end]
        got = period_totals(path, start, end)
        assert got == {
            "requests": len(inside),
            "prompt_tokens": sum(f["prompt_tokens"] for _, f in inside),
            "completion_tokens": sum(f["completion_tokens"] for _, f in inside),
            "revenue": sum(f["cost"] for _, f in inside),
            "first_seq": min((s for s, _ in inside), default=None),
            "last_seq": max((s for s, _ in inside), default=None),
            "head_hash": hashes[max(s for s, _ in inside)] if inside else None,
        }, (start, end)
    assert period_totals(path, 0, 100)["requests"] == 300
    for bad in [(1, 0), (float("nan"), 1), (0, float("inf")), ("0", 1), (True, 1)]:
        with pytest.raises(ValueError):
            period_totals(path, *bad)
    sql(path, "UPDATE usage SET cost = cost + 1 WHERE seq = 7")
    with pytest.raises(UsageError, match="row 7: contents do not match its hash"):
        period_totals(path, 0, 100)
