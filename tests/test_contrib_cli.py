"""The contributor CLI (`python -m near_jax.contrib`), as processes, on a real adversarial run:
honest islands, a free-rider, a poisoner, a forger, a copier and a replayer
(tests/contrib_world.py, conftest's `world`), three rounds closed by the real aggregator. The
audit itself is tested in-process in test_audit.py."""

import copy
import csv
import io
import json
import subprocess
from concurrent.futures import ThreadPoolExecutor

from contrib_world import ADVERSARIES, HONEST, RUN
from helpers import ADVERSARIAL_ROUNDS as ROUNDS
from helpers import clone, ledger_copy, rehash, row, run_module, sql

from near_jax.contrib import allowlist, audit, identity, ledger_mirror, registry
from near_jax.contrib.rewards import Standing
from near_jax.diloco import protocol
from near_jax.diloco.store import ObjectStore

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

    out, agg_key = tmp_path / "promoted.json", tmp_path / "agg.key"
    identity.save(world.agg_key, agg_key)
    good = ledger_copy(world, tmp_path)  # audited against the decisions, and accepted
    promoted = cli(
        "promote",
        store,
        f"--run={RUN}",
        "--top=3",
        f"--out={out}",
        f"--ledger={good}",
        f"--key={agg_key}",
    )
    assert promoted.returncode == 0, promoted.stderr
    assert f"signed by key id {world.agg_key.key_id}" in promoted.stdout
    doc = json.loads(out.read_text())
    assert doc["kind"] == "near_jax/promotion" and doc["from_run"] == RUN and doc["top"] == 3
    chosen = doc["contributors"]
    verified = allowlist.read_promotion(out, expected_signer=world.agg_key.public_hex)
    assert verified.keys == {c["contributor"]: c["public_key"] for c in chosen}
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
    assert "keygen, register, verify, leaderboard, promote, admit, codehash" in unknown.stderr


def test_cli_refuses_a_forged_ledger_copy_with_a_valid_chain(world, tmp_path):
    """The ledger mirror replaced by a valid chain that pays the poisoner, its index signed
    by the aggregator key itself (a store writer without the key is refused at the index):
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
    ledger_mirror.upload(ObjectStore.open(str(path)), RUN, str(forged), world.agg_key)
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


def test_promote_signs_with_the_aggregator_key_and_admit_admits(world, tmp_path):
    store, path = clone(world, tmp_path)
    run = (f"--store={path}", f"--run={RUN}")
    agg_key, stranger_key, out = tmp_path / "agg.key", tmp_path / "x.key", tmp_path / "p.json"
    identity.save(world.agg_key, agg_key)
    stranger = identity.generate()
    identity.save(stranger, stranger_key)
    newbie = identity.generate()
    # An allowlisted run of the same store: the world's manifest, with an allowlist added.
    manifest = protocol.read_json(store, protocol.manifest_key(RUN))
    manifest["contrib"]["allowlist"] = {"from_run": "r0", "signer": "", "sha256": "", "keys": {}}
    store.put(protocol.manifest_key(RUN), protocol.dumps(manifest))
    no_key, wrong_key, signed, open_run, both, bad_public = cli_all(
        ("promote", *run, "--top=2", f"--out={out}"),
        ("promote", *run, "--top=2", f"--out={out}", f"--key={stranger_key}"),
        ("promote", *run, "--top=2", f"--out={out}", f"--key={agg_key}"),
        (
            "admit",
            f"--store={world.path}",
            f"--run={RUN}",
            f"--key={agg_key}",
            "--name=n",
            f"--public_key={newbie.public_hex}",
        ),
        ("admit", *run, f"--key={agg_key}", "--name=n", f"--promotion={out}"),
        ("admit", *run, f"--key={agg_key}", "--name=n", "--public_key=abc"),
    )
    for p, phrase in (
        (no_key, "needs --key=AGG_KEY"),
        (
            wrong_key,
            f"is key id {stranger.key_id}, not run {RUN}'s aggregator key (key id "
            f"{world.agg_key.key_id})",
        ),
        (open_run, "is open (no allowlist)"),
        (both, "either --name=NAME --public_key=HEX or --promotion=PATH"),
        (bad_public, "bad public key"),
    ):
        err = p.stderr.strip()
        assert p.returncode == 2 and phrase in err and len(err.splitlines()) == 1, err
    assert signed.returncode == 0, signed.stderr
    promoted = allowlist.read_promotion(out, expected_signer=world.agg_key.public_hex)
    assert len(promoted.keys) == 2 and set(promoted.keys) <= set(HONEST)
    # A promotion "from" this run signed by another key: its manifest says otherwise.
    forged = tmp_path / "forged.json"
    rows = [{"contributor": "n2", "public_key": newbie.public_hex}]
    doc = allowlist.sign_promotion(stranger, RUN, rows, window=0, top=1, issued_at=0)
    forged.write_text(json.dumps(doc))
    again, fake = cli_all(
        ("admit", *run, f"--key={stranger_key}", "--name=n", f"--public_key={newbie.public_hex}"),
        ("admit", *run, f"--key={agg_key}", f"--promotion={forged}"),
    )
    assert again.returncode == 2 and "not run" in again.stderr
    assert fake.returncode == 2 and (
        f"signed by key id {stranger.key_id}, but the aggregator key of run {RUN!r} is key "
        f"id {world.agg_key.key_id}" in fake.stderr
    ), fake.stderr
    assert allowlist.admitted(store, RUN, manifest) == ({}, "")
    one = ("--name=newbie", f"--public_key={newbie.public_hex}")
    for args, seq in ((one, 1), ((f"--promotion={out}",), 2), (one, 2)):
        p = cli("admit", *run, f"--key={agg_key}", *args)
        assert p.returncode == 0 and f"at seq {seq}" in p.stdout, p.stdout + p.stderr
    assert "already admitted: 1 of 1" in p.stdout
    got, problem = allowlist.admitted(store, RUN, manifest)
    assert problem == "" and got == {"newbie": newbie.public_hex, **promoted.keys}
    taken = cli(
        "admit", *run, f"--key={agg_key}", "--name=newbie", f"--public_key={stranger.public_hex}"
    )
    assert taken.returncode == 2 and "newbie is already admitted with key id" in taken.stderr
