"""`verify_chain` (`near_jax.contrib.ledger_verify`): every kind of tampering with a ledger
file is found, against optional anchors, without modifying the file or ever raising.
"""

import json
import os
import random
import sqlite3

import pytest
from contrib_world import RUN as WORLD_RUN
from ledger_rows import ROUND1, RUN, entry, file_digest, sqlite_exec

from near_jax.contrib import ledger as ledger_lib
from near_jax.contrib import ledger_mirror, ledger_verify
from near_jax.contrib.ledger import ENTRY_FIELDS, Ledger
from near_jax.contrib.ledger_verify import verify_chain


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
        ["meta format is '7', expected '2'"],
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


def test_tampering_with_the_stored_ledger_is_detected(adversarial_run, tmp_path):
    world, _ = adversarial_run
    path = tmp_path / "ledger.sqlite"
    assert ledger_mirror.download(world.store, WORLD_RUN, str(path), world.agg_key.public_hex)
    con = sqlite3.connect(path)
    con.execute("UPDATE entries SET reward = 0.5 WHERE contributor = 'zero' AND round = 2")
    con.commit()
    con.close()
    problems = ledger_verify.verify_chain(str(path), WORLD_RUN)
    assert problems and "edited" in json.dumps(problems)
