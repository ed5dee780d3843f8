"""The contributor audit (`near_jax.contrib.audit`) and CLI (`python -m near_jax.contrib`), on
a real adversarial run: honest islands, a free-rider, a poisoner, a forger, a copier and a
replayer (tests/contrib_world.py), three rounds closed by the real aggregator."""

import copy
import csv
import io
import json
import shutil
import sqlite3
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from contrib_world import ADVERSARIES, HONEST, NAMES, POLICY, RUN, World, adversarial_round
from helpers import run_module

from near_jax.contrib import (
    audit,
    identity,
    ledger,
    ledger_mirror,
    ledger_verify,
    registry,
    signing,
)
from near_jax.contrib.rewards import Standing
from near_jax.diloco import protocol
from near_jax.diloco.store import ObjectStore

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
    assert ledger_mirror.download(world.store, RUN, str(path))
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
    assert ledger_verify.verify_chain(str(path), RUN) == []


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
    assert summary == {
        "aggregator_key_id": world.agg_key.key_id,
        "rounds": ROUNDS,
        "entries": n,
        "contributors": len(NAMES),
        "accepted": ROUNDS * len(HONEST),
        "rejected": n - ROUNDS * len(HONEST),
        "head": head,
        "warnings": [],
    }
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
        sql(
            path,
            f"UPDATE entries SET seq = -1 WHERE seq = {zero}",
            f"UPDATE entries SET seq = {zero} WHERE seq = {zero + 1}",
            f"UPDATE entries SET seq = {zero + 1} WHERE seq = -1",
        )
    before = path.read_bytes()
    problems, _ = audit.verify(world.store, RUN, ledger_path=str(path))
    assert path.read_bytes() == before  # the evidence is left as it was
    text = "\n".join(problems)
    expected = {
        "edit": ["(edited)", "round 1: ledger entry", "rejected, yet rewarded 0.5"],
        "delete": ["is missing", "round 1: the decision lists 11 contributions, the ledger 10"],
        "swap": ["reordered", "round 1: ledger entry"],
    }[attack]
    for phrase in expected:
        assert phrase in text, (phrase, problems)


def test_a_truncated_tail_passes_the_chain_but_not_the_decisions(world, tmp_path):
    path = ledger_copy(world, tmp_path)
    sql(path, f"DELETE FROM entries WHERE round = {ROUNDS - 1}")
    assert ledger_verify.verify_chain(str(path), RUN) == []  # a shorter chain is still a chain
    problems, summary = audit.verify(world.store, RUN, ledger_path=str(path))
    assert problems == [
        f"round {ROUNDS - 1}: the decision lists {len(NAMES)} contributions, the ledger 0"
    ]
    assert summary["entries"] == (ROUNDS - 1) * len(NAMES) - 1


def sign(world, decision: dict) -> dict:
    """The decision signed by the run's aggregator key (a genuine, or a dishonest,
    aggregator)."""
    decision["signature"] = world.agg_key.sign(signing.decision_bytes(decision))
    return decision


UNSIGNED = "round 1: the decision is not signed by the run's aggregator key"


@pytest.mark.parametrize(
    "forgery, by_aggregator", [("signature", False), ("signature", True), ("framed", False)]
)
def test_a_rehashed_forgery_fails_the_signatures(world, tmp_path, forgery, by_aggregator):
    """A store writer rewrites a row, its hash chain and the decision that lists it: every
    hash agrees, but the decision is no longer the aggregator's, and the contributor's
    signature does not match. Even the aggregator (re-signing its decision) cannot credit
    a contributor with a payload it never signed."""
    store, _ = clone(world, tmp_path)
    path = ledger_copy(world, tmp_path)
    victim = row(path, 1, "honest1")
    if forgery == "signature":  # credit a payload the contributor never signed
        changes = {"signature": identity.generate().sign(b"whatever")}
    else:  # frame an honest contributor as a poisoner (disqualifying them)
        changes = {
            "accepted": False,
            "applied": False,
            "reward": 0.0,
            "reason": "norm outlier: 9.9x the median norm",
        }
    rehash(path, victim["seq"], **changes)
    decision = protocol.read_json(store, protocol.decision_key(RUN, 1))
    for e in decision["contrib"]["entries"]:
        if e["contributor"] == "honest1":
            e.update(changes)
    if by_aggregator:
        sign(world, decision)
    store.put(protocol.decision_key(RUN, 1), protocol.dumps(decision))
    ledger_mirror.upload(store, RUN, str(path))
    problems, _ = audit.verify(store, RUN)
    expected = [] if by_aggregator else [UNSIGNED]
    if forgery == "signature":
        expected.append(
            f"ledger entry {victim['seq']} (round 1, 'honest1'): accepted, but its "
            "signature does not verify under 'honest1''s registered key"
        )
    assert sorted(problems) == sorted(expected)


def test_an_altered_seed_reveal_is_found(world, tmp_path):
    store, _ = clone(world, tmp_path)
    decision = protocol.read_json(store, protocol.decision_key(RUN, 1))
    # a genuine aggregator signature, but of another round: the seed would be reused
    decision["contrib"]["seed_signature"] = signing.seed_signature(world.agg_key, RUN, 0)
    store.put(protocol.decision_key(RUN, 1), protocol.dumps(sign(world, decision)))
    problems, _ = audit.verify(store, RUN)
    assert problems == ["round 1: the seed is not signed by the run's aggregator key"]
    del decision["signature"]  # and a decision nobody signed
    store.put(protocol.decision_key(RUN, 1), protocol.dumps(decision))
    assert audit.verify(store, RUN)[0][0] == UNSIGNED
    # a genuine decision of round 0, filed as round 1's
    store.put(protocol.decision_key(RUN, 1), store.get(protocol.decision_key(RUN, 0)))
    assert "round 1: the decision names round 0" in audit.verify(store, RUN)[0]


def test_damaged_store_objects_are_problems_not_crashes(world, tmp_path):
    store, path = clone(world, tmp_path)
    (path / protocol.decision_key(RUN, 0)).write_bytes(b"not a framed object")
    (path / ledger_mirror.store_key(RUN)).write_bytes(b"garbage")
    problems, summary = audit.verify(store, RUN)
    assert any(p.startswith("round 0: the decision is unreadable") for p in problems), problems
    assert any("ledger copy is damaged" in p for p in problems), problems
    assert summary["rounds"] == ROUNDS and summary["entries"] == 0
    assert audit.verify(store, "nosuchrun")[0] == [
        "run 'nosuchrun' has no manifest nosuchrun/run.json (unknown run)"
    ]


def set_latest(store: ObjectStore, version: int) -> None:
    """Moves `latest` to `version` (back, as it was before a round was published)."""
    info = protocol.read_latest(store, RUN)
    store.put(protocol.latest_key(RUN), protocol.dumps({**info, "version": version}))


def upload_rounds_before(world, tmp_path, store: ObjectStore, rnd: int) -> Path:
    """Uploads the ledger as it was before round `rnd` was recorded; returns the full one."""
    full = ledger_copy(world, tmp_path)
    short = tmp_path / "short.sqlite"
    shutil.copyfile(full, short)
    sql(short, f"DELETE FROM entries WHERE round >= {rnd}")
    ledger_mirror.upload(store, RUN, str(short))
    return full


@pytest.mark.parametrize("closing", [1, 2])
@pytest.mark.parametrize("when", ["before", "after"])
def test_rounds_closing_during_the_audit_are_no_problem(
    world, tmp_path, monkeypatch, closing, when
):
    """`closing` rounds are recorded (ledger mirror), then published (`latest`) just
    before or just after the audit reads the ledger."""
    store, _ = clone(world, tmp_path)
    set_latest(store, ROUNDS - closing)
    full = upload_rounds_before(world, tmp_path, store, ROUNDS - closing)
    read_ledger = audit.read_ledger

    def racing(*args, **kwargs):
        if when == "after":
            out = read_ledger(*args, **kwargs)
        ledger_mirror.upload(store, RUN, str(full))
        set_latest(store, ROUNDS)
        return out if when == "after" else read_ledger(*args, **kwargs)

    monkeypatch.setattr(audit, "read_ledger", racing)
    problems, summary = audit.verify(store, RUN)
    assert problems == []
    # ledger rows past the `latest` read first make the audit read it again
    moved_on = when == "before" and closing > 1
    assert summary["rounds"] == (ROUNDS if moved_on else ROUNDS - closing)


def test_the_latest_round_may_be_recorded_before_it_is_published(world, tmp_path):
    store, _ = clone(world, tmp_path)
    last = ROUNDS - 1
    set_latest(store, last)  # round `last` committed and recorded, `latest` not moved yet
    problems, summary = audit.verify(store, RUN)
    assert problems == [] and summary["rounds"] == last
    n = len(NAMES)
    store.delete(protocol.decision_key(RUN, last))  # ... but not without its decision
    assert audit.verify(store, RUN)[0] == [
        f"round {last}: the ledger has {n} entries of round {last}, which has no decision "
        f"(the latest version is {last})"
    ]
    decision = world.store.get(protocol.decision_key(RUN, last))
    store.put(protocol.decision_key(RUN, last), decision)
    set_latest(store, last - 1)  # and never a round after `latest`
    assert audit.verify(store, RUN)[0] == [
        f"the ledger has {n} entries of round(s) {last}, past the latest version {last - 1}: "
        "no decision lists them"
    ]
    bad = protocol.read_json(store, protocol.decision_key(RUN, last))
    bad["contrib"]["entries"][0]["reward"] = 0.25  # nor with a decision that differs
    store.put(protocol.decision_key(RUN, last), protocol.dumps(bad))
    set_latest(store, last)
    problems = audit.verify(store, RUN)[0]
    assert problems[0] == f"round {last}: the decision is not signed by the run's aggregator key"
    assert len(problems) == 2 and "differs from the decision in reward" in problems[1]
    set_latest(store, last)  # committed, not recorded yet (killed in between): fine too
    store.put(protocol.decision_key(RUN, last), decision)
    upload_rounds_before(world, tmp_path, store, last)
    assert audit.verify(store, RUN)[0] == []


def test_junk_in_the_registry_is_a_warning_unless_the_name_signed(world, tmp_path):
    store, _ = clone(world, tmp_path)
    store.put(registry.registry_key(RUN, "nobody"), b'{"name": "nobody"}')
    store.put(registry.registry_key(RUN, "deep"), b"[" * 30000 + b"]" * 30000)
    problems, summary = audit.verify(store, RUN)
    assert problems == []
    assert len(summary["warnings"]) == 2
    assert all(w.startswith("registry entry") for w in summary["warnings"]), summary
    assert "deep" in summary["warnings"][0] and "nobody" in summary["warnings"][1]
    # a name that signed work: its key became unreadable, its signatures uncheckable
    store.put(registry.registry_key(RUN, "honest1"), b'{"name": "honest1"}')
    problems, summary = audit.verify(store, RUN)
    assert len(summary["warnings"]) == 2
    assert any(
        p.startswith(f"registry entry {RUN}/registry/honest1 has fields name")
        and p.endswith("yet 'honest1' signed entries in the ledger")
        for p in problems
    ), problems
    assert any("accepted, but contributor 'honest1' is not registered" in p for p in problems)


def test_messages_name_the_given_ledger_not_a_copy(world, tmp_path):
    path = tmp_path / "mine.sqlite"
    path.write_bytes(b"not a ledger at all")
    problems, _ = audit.verify(world.store, RUN, ledger_path=str(path))
    text = "\n".join(problems)
    assert str(path) in text and "near_jax-audit-" not in text, problems
    other = tmp_path / "other.sqlite"
    with ledger.Ledger.open(str(other), "otherrun"):
        pass
    problems, _ = audit.verify(world.store, RUN, ledger_path=str(other))
    assert problems and all("near_jax-audit-" not in p for p in problems), problems
    assert any(str(other) in p for p in problems), problems


def test_deeply_nested_store_objects_are_problems(world, tmp_path):
    store, _ = clone(world, tmp_path)
    store.put(protocol.decision_key(RUN, 1), b"[" * 30000 + b"]" * 30000)
    store.put(
        protocol.decision_key(RUN, 2),
        protocol.dumps({"x": [[]] * 3}).replace(b"[[],[],[]]", b"[" * 900 + b"]" * 900),
    )
    problems, _ = audit.verify(store, RUN)
    assert problems[0].startswith("round 1: the decision is unreadable: "), problems
    assert any(p.startswith("round 2: ") for p in problems), problems
    store.put(protocol.manifest_key(RUN), b"{" + b'"a":{' * 30000 + b"}" * 30001)
    assert audit.verify(store, RUN)[0][0].startswith(
        f"the run manifest {RUN}/run.json is unreadable"
    )


# --------------------------------------------------------------------------------- CLI


def cli(*args: str) -> subprocess.CompletedProcess:
    return run_module("near_jax.contrib", *args, timeout=120)


def cli_all(*calls: tuple[str, ...]) -> list[subprocess.CompletedProcess]:
    """cli(*args) of each call, run side by side (each mostly waits on imports)."""
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        return list(pool.map(lambda args: cli(*args), calls))


def one_line_error(p: subprocess.CompletedProcess, *phrases: str) -> None:
    assert p.returncode == 1 and p.stdout == "", (p.stdout, p.stderr)
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr, p.stderr
    for phrase in phrases:
        assert phrase in p.stderr, (phrase, p.stderr)


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

    ObjectStore.open(str(path)).put(registry.registry_key(RUN, "junk"), b"{}")
    ok = cli("verify", store, f"--run={RUN}")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    lines = ok.stdout.splitlines()
    assert lines[0].startswith(f"run {RUN} (aggregator key id {world.agg_key.key_id}): ")
    assert lines[1].startswith(f"warning: registry entry {RUN}/registry/junk has fields")
    assert lines[-1] == "OK: everything checks out"

    board = cli("leaderboard", store, f"--run={RUN}", "--csv=-")
    assert board.returncode == 0, board.stderr
    table = list(csv.DictReader(io.StringIO(board.stdout)))
    assert list(table[0]) == list(Standing("").row())
    names = [r["contributor"] for r in table]
    assert set(names[: len(HONEST)]) == set(HONEST) and set(names[len(HONEST) :]) == set(
        ADVERSARIES
    )
    assert f"rounds 0–{ROUNDS - 1}" in board.stderr
    assert f"warning: registry entry {RUN}/registry/junk" in board.stderr

    out = tmp_path / "promoted.json"
    good = ledger_copy(world, tmp_path)  # audited against the decisions, and accepted
    promoted = cli("promote", store, f"--run={RUN}", "--top=3", f"--out={out}", f"--ledger={good}")
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
    one_line_error(refused, f"refusing to rank run {RUN}: its audit fails: ", "more)")

    missing = cli("verify", store)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert "--run is required" in missing.stderr
    unknown = cli("audit", store, f"--run={RUN}")
    assert unknown.returncode == 2 and "unknown command 'audit'" in unknown.stderr
    assert "keygen, register, verify, leaderboard, promote, codehash" in unknown.stderr


def test_cli_refuses_a_forged_ledger_copy_with_a_valid_chain(world, tmp_path):
    """A store writer replaces the ledger mirror with a valid chain that pays the poisoner:
    the chain checks out, the signed decisions do not agree."""
    _, path = clone(world, tmp_path)
    forged = ledger_copy(world, tmp_path)
    for rnd in range(ROUNDS):
        rehash(
            forged,
            row(forged, rnd, "poisoner")["seq"],
            accepted=True,
            applied=True,
            reason="",
            reward=1.0,
            score=9.0,
        )
    ledger_mirror.upload(ObjectStore.open(str(path)), RUN, str(forged))
    run = (f"--store={path}", f"--run={RUN}")
    board, promoted = cli_all(("leaderboard", *run), ("promote", *run, "--top=1"))
    for p in (board, promoted):
        one_line_error(p, f"refusing to rank run {RUN}: its audit fails: ", "more)")


def test_cli_gives_one_line_for_absurd_store_objects(world, tmp_path):
    deep = b"[" * 30000 + b"]" * 30000
    store, path = clone(world, tmp_path)
    store.put(protocol.decision_key(RUN, 1), deep)
    store.put(registry.registry_key(RUN, "deep"), deep)
    other, other_path = clone(world, tmp_path / "other")
    other.put(protocol.manifest_key(RUN), deep)
    calls = [
        (command, f"--store={p}", f"--run={RUN}", *extra)
        for p in (path, other_path)
        for command, *extra in (("verify",), ("leaderboard",), ("promote", "--top=2"))
    ]
    verify, board, promoted, *manifest = cli_all(*calls)
    assert verify.returncode == 1 and "Traceback" not in verify.stdout + verify.stderr
    assert f"warning: registry entry {RUN}/registry/deep: " in verify.stdout
    assert "\nround 1: the decision is unreadable: " in verify.stdout, verify.stdout
    for p in (board, promoted):
        one_line_error(p, "its audit fails: round 1: the decision is unreadable")
    for p in manifest:
        one_line_error(p, f"the run manifest is unreadable: {RUN}/run.json is not JSON")


def test_the_window_counts_back_from_the_latest_closed_round(world, tmp_path):
    """A round nobody contributed to still counts: a window of 2 is that round and the one
    before, not the last two rounds with contributions."""
    store, path = clone(world, tmp_path)
    here = copy.copy(world)
    here.store, here.path = store, path
    agg = here.make_aggregator()
    agg.load()  # rebuilds the ledger from the decisions
    agg.quorum, agg.round_timeout = 100, 2.0
    assert agg.run_round()["decision"]["contrib"]["entries"] == []
    agg.close()
    problems, summary = audit.verify(store, RUN)
    assert problems == [] and summary["rounds"] == ROUNDS + 1
    board = cli("leaderboard", f"--store={path}", f"--run={RUN}", "--window=2", "--csv=-")
    assert board.returncode == 0, board.stderr
    assert f"rounds {ROUNDS - 1}–{ROUNDS}" in board.stderr
    table = {r["contributor"]: r for r in csv.DictReader(io.StringIO(board.stdout))}
    assert all(table[name]["rounds"] == "1" for name in HONEST), table


def test_cli_refuses_impossible_requests_up_front(tmp_path):
    """Usage mistakes caught before any work: exit 2, one line."""
    store = tmp_path / "store"
    store.mkdir()
    cases = [
        (["promote", "--top=1", "--window=1", "--min_rounds=2"], "can never be met"),
        (["leaderboard", f"--csv={tmp_path}/no/such/dir/x.csv"], "not a writable directory"),
    ]
    for args, message in cases:
        proc = cli(*args, f"--store={store}", "--run=r")
        err = proc.stderr.strip()
        assert proc.returncode == 2 and message in err and len(err.splitlines()) == 1, err
