"""The contributor audit (`near_jax.contrib.audit`) and CLI (`python -m near_jax.contrib`), on
a real adversarial run: honest islands, a free-rider, a poisoner, a forger, a copier and a
replayer (tests/test_contrib.py), three rounds closed by the real aggregator."""

import csv
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from near_jax.contrib import audit, identity, ledger, validator
from near_jax.contrib.rewards import Standing
from near_jax.diloco import rounds
from near_jax.diloco.store import ObjectStore
from tests.test_contrib import ADVERSARIES, HONEST, NAMES, POLICY, RUN, World, adversarial_round

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 3


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = World(tmp_path_factory.mktemp("contrib_cli") / "store", NAMES, POLICY)
    for _ in range(ROUNDS):
        adversarial_round(w)
    w.agg.close()
    return w


def clone(world, tmp_path) -> tuple[ObjectStore, Path]:
    """A copy of the run's store that a test may damage."""
    path = tmp_path / "store"
    shutil.copytree(world.path, path, ignore=shutil.ignore_patterns("local"))
    return ObjectStore.open(str(path)), path


def ledger_copy(world, tmp_path) -> Path:
    path = tmp_path / "ledger.sqlite"
    assert ledger.download(world.store, RUN, str(path))
    return path


def sql(path: Path, *statements: str) -> None:
    con = sqlite3.connect(path)
    for s in statements:
        con.execute(s)
    con.commit()
    con.close()


def rehash(path: Path, seq: int, **changes) -> None:
    """Changes entry `seq` and recomputes its hash and every later one: a forgery that
    leaves the chain itself valid."""
    with ledger.Ledger.open(str(path), RUN) as book:
        entries = book.entries()
    con = sqlite3.connect(path)
    prev = None
    for e in entries:
        if e["seq"] < seq:
            prev = e["entry_hash"]
            continue
        fields = {f: e[f] for f in ledger.ENTRY_FIELDS}
        if e["seq"] == seq:
            fields.update(changes)
        h = ledger.entry_hash(e["seq"], prev, fields)
        sets = ", ".join(f"{k} = ?" for k in fields)
        con.execute(
            f"UPDATE entries SET {sets}, prev_hash = ?, entry_hash = ? WHERE seq = ?",
            (*fields.values(), prev, h, e["seq"]),
        )
        prev = h
    con.commit()
    con.close()
    assert ledger.verify_chain(str(path), RUN) == []


def row(path: Path, rnd: int, contributor: str) -> dict:
    with ledger.Ledger.open(str(path), RUN) as book:
        return next(e for e in book.entries(rnd, rnd) if e["contributor"] == contributor)


# ------------------------------------------------------------------------------- audit


def test_the_adversarial_run_verifies(world, tmp_path):
    problems, summary = audit.verify(world.store, RUN)
    assert problems == []
    n = ROUNDS * (len(NAMES)) - 1  # no replayer in round 0: nothing to replay yet
    with ledger.Ledger.open(str(ledger_copy(world, tmp_path)), RUN) as book:
        head = book.head()
    assert summary == {"rounds": ROUNDS, "entries": n, "contributors": len(NAMES),
                       "accepted": ROUNDS * len(HONEST), "rejected": n - ROUNDS * len(HONEST),
                       "head": head}  # fmt: skip
    assert audit.verify(world.store, RUN, ledger_path=str(tmp_path / "ledger.sqlite")) == (
        [],
        summary,
    )


@pytest.mark.parametrize("attack", ["edit", "delete", "swap"])
def test_a_tampered_ledger_copy_is_found(world, tmp_path, attack):
    path = ledger_copy(world, tmp_path)
    zero = row(path, 1, "poisoner")["seq"]
    if attack == "edit":
        sql(path, f"UPDATE entries SET reward = 0.5 WHERE seq = {zero}")
    elif attack == "delete":
        sql(path, f"DELETE FROM entries WHERE seq = {zero}")
    else:
        sql(path, f"UPDATE entries SET seq = -1 WHERE seq = {zero}",
            f"UPDATE entries SET seq = {zero} WHERE seq = {zero + 1}",
            f"UPDATE entries SET seq = {zero + 1} WHERE seq = -1")  # fmt: skip
    before = path.read_bytes()
    problems, _ = audit.verify(world.store, RUN, ledger_path=str(path))
    assert path.read_bytes() == before  # the evidence is left as it was
    text = "\n".join(problems)
    expected = {"edit": ["(edited)", "round 1: ledger entry", "rejected, yet rewarded 0.5"],
                "delete": ["is missing", "round 1: the decision lists 11 contributions, the "
                           "ledger 10"],
                "swap": ["reordered", "round 1: ledger entry"]}[attack]  # fmt: skip
    for phrase in expected:
        assert phrase in text, (phrase, problems)


def test_a_truncated_tail_passes_the_chain_but_not_the_decisions(world, tmp_path):
    path = ledger_copy(world, tmp_path)
    sql(path, f"DELETE FROM entries WHERE round = {ROUNDS - 1}")
    assert ledger.verify_chain(str(path), RUN) == []  # a shorter chain is still a chain
    problems, summary = audit.verify(world.store, RUN, ledger_path=str(path))
    assert problems == [
        f"round {ROUNDS - 1}: the decision lists {len(NAMES)} contributions, the ledger 0"
    ]
    assert summary["entries"] == (ROUNDS - 1) * len(NAMES) - 1


@pytest.mark.parametrize("forgery", ["signature", "framed"])
def test_a_rehashed_forgery_fails_the_signature_check(world, tmp_path, forgery):
    """A store writer rewrites a row, its hash chain and the decision that lists it: every
    hash agrees, but the contributor's signature does not."""
    store, _ = clone(world, tmp_path)
    path = ledger_copy(world, tmp_path)
    victim = row(path, 1, "honest1")
    if forgery == "signature":  # credit a payload the contributor never signed
        changes = {"signature": identity.generate().sign(b"whatever")}
        expected = "accepted, but its signature does not verify"
    else:  # frame an honest contributor as a forger (disqualifying them)
        changes = {"accepted": False, "applied": False, "reward": 0.0, "score": None,
                   "reason": f"bad signature (key id {victim['key_id']})"}  # fmt: skip
        expected = "rejected as a bad signature, but it verifies"
    rehash(path, victim["seq"], **changes)
    decision = rounds.read_json(store, rounds.decision_key(RUN, 1))
    for e in decision["contrib"]["entries"]:
        if e["contributor"] == "honest1":
            e.update(changes)
    store.put(rounds.decision_key(RUN, 1), rounds.dumps(decision))
    ledger.upload(store, RUN, str(path))
    problems, _ = audit.verify(store, RUN)
    assert len(problems) == 1 and expected in problems[0], problems
    assert f"ledger entry {victim['seq']} (round 1, 'honest1')" in problems[0]


def test_an_altered_seed_reveal_is_found(world, tmp_path):
    store, _ = clone(world, tmp_path)
    decision = rounds.read_json(store, rounds.decision_key(RUN, 1))
    # a genuine aggregator signature, but of another round: the seed would be reused
    decision["contrib"]["seed_signature"] = validator.seed_signature(world.agg_key, RUN, 0)
    store.put(rounds.decision_key(RUN, 1), rounds.dumps(decision))
    problems, _ = audit.verify(store, RUN)
    assert problems == ["round 1: the seed is not signed by the run's aggregator key"]


def test_damaged_store_objects_are_problems_not_crashes(world, tmp_path):
    store, path = clone(world, tmp_path)
    (path / rounds.decision_key(RUN, 0)).write_bytes(b"not a framed object")
    (path / ledger.store_key(RUN)).write_bytes(b"garbage")
    problems, summary = audit.verify(store, RUN)
    assert any(p.startswith("round 0: the decision is unreadable") for p in problems), problems
    assert any("ledger copy is damaged" in p for p in problems), problems
    assert summary["rounds"] == ROUNDS and summary["entries"] == 0
    assert audit.verify(store, "nosuchrun")[0] == [
        "run 'nosuchrun' has no manifest nosuchrun/run.json (unknown run)"
    ]


# --------------------------------------------------------------------------------- CLI


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "near_jax.contrib", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip


def test_cli(world, tmp_path):
    _, path = clone(world, tmp_path)
    store = f"--store={path}"
    key = tmp_path / "newbie.key"

    made = cli("keygen", f"--out={key}")
    assert made.returncode == 0, made.stderr
    public = (tmp_path / "newbie.key.pub").read_text().strip()
    assert f"public key {public}" in made.stdout
    assert f"key id {identity.key_id(public)}" in made.stdout
    again = cli("keygen", f"--out={key}")
    assert again.returncode == 2 and len(again.stderr.strip().splitlines()) == 1
    assert "exists" in again.stderr and identity.load(key).public_hex == public

    reg = cli("register", f"--key={key}", "--name=newbie", store, f"--run={RUN}")
    assert reg.returncode == 0, reg.stderr
    assert (
        reg.stdout.strip() == f"registered newbie (key id {identity.key_id(public)}) in run {RUN}"
    )

    ok = cli("verify", store, f"--run={RUN}")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.splitlines()[-1] == "OK: everything checks out"

    board = cli("leaderboard", store, f"--run={RUN}", "--csv=-")
    assert board.returncode == 0, board.stderr
    table = list(csv.DictReader(io.StringIO(board.stdout)))
    assert list(table[0]) == list(Standing("").row())
    names = [r["contributor"] for r in table]
    assert set(names[: len(HONEST)]) == set(HONEST) and set(names[len(HONEST) :]) == set(
        ADVERSARIES
    )
    assert f"rounds 0–{ROUNDS - 1}" in board.stderr

    out = tmp_path / "promoted.json"
    promoted = cli("promote", store, f"--run={RUN}", "--top=3", f"--out={out}")
    assert promoted.returncode == 0, promoted.stderr
    chosen = json.loads(out.read_text())
    assert [c["contributor"] for c in chosen] == names[:3]
    for c in chosen:
        assert c["contributor"] in HONEST and c["rounds"] == ROUNDS
        assert c["public_key"] == world.keys[c["contributor"]].public_hex
        assert c["key_id"] == identity.key_id(c["public_key"])

    tampered = ledger_copy(world, tmp_path)
    sql(tampered, "UPDATE entries SET reward = 1.0 WHERE contributor = 'poisoner'")
    refused = cli("leaderboard", store, f"--run={RUN}", f"--ledger={tampered}")
    assert refused.returncode == 1 and refused.stdout == ""
    assert len(refused.stderr.strip().splitlines()) == 1 and "refusing" in refused.stderr

    missing = cli("verify", store)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert "--run is required" in missing.stderr
    unknown = cli("audit", store, f"--run={RUN}")
    assert unknown.returncode == 2 and "unknown command 'audit'" in unknown.stderr
    assert "keygen, register, verify, leaderboard, promote, codehash" in unknown.stderr
