"""Tests of near_jax.contrib.audit, in-process (`audit.verify`), on a real adversarial run:
honest islands, a free-rider, a poisoner, a forger, a copier and a replayer
(tests/contrib_world.py, conftest's `world`), three rounds closed by the real aggregator. The
CLI that runs it (`python -m near_jax.contrib`) is tested as processes in test_contrib_cli.py."""

import shutil
from pathlib import Path

import pytest
from contrib_world import HONEST, NAMES, RUN
from helpers import ADVERSARIAL_ROUNDS as ROUNDS
from helpers import clone, ledger_copy, rehash, row, sql

from near_jax.contrib import (
    audit,
    identity,
    ledger,
    ledger_mirror,
    ledger_verify,
    registry,
    signing,
)
from near_jax.diloco import protocol
from near_jax.diloco.store import ObjectStore


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
    # the mirror's index signed with the aggregator's own key (the strongest forger: a
    # store writer without it is refused outright, see test_a_forged_ledger_index_...)
    ledger_mirror.upload(store, RUN, str(path), world.agg_key)
    problems, _ = audit.verify(store, RUN)
    expected = [] if by_aggregator else [UNSIGNED]
    if forgery == "signature":
        expected.append(
            f"ledger entry {victim['seq']} (round 1, 'honest1'): accepted, but its "
            "signature does not verify under 'honest1''s registered key"
        )
    if forgery == "framed":  # the ratings replay sees it too: its rating and weights differ
        extra = [p for p in problems if p not in expected]
        assert extra and all("round 1" in p for p in extra), extra
        problems = [p for p in problems if p in expected]
    assert sorted(problems) == sorted(expected)


def test_an_aggregator_paying_a_friend_more_than_the_ratings_give_is_found(world, tmp_path):
    """The aggregator itself moves reward between two accepted contributors (the round still
    pays one unit, every signature holds): the replayed ratings and shares expose it."""
    store, _ = clone(world, tmp_path)
    path = ledger_copy(world, tmp_path)
    decision = protocol.read_json(store, protocol.decision_key(RUN, 1))
    paid = sorted(
        (e for e in decision["contrib"]["entries"] if e["accepted"]), key=lambda e: e["reward"]
    )
    poor, rich = paid[0], paid[-1]
    moved = poor["reward"] + rich["reward"]
    for e, reward in ((rich, 0.0), (poor, moved)):
        e["reward"] = reward
        rehash(path, row(path, 1, e["contributor"])["seq"], reward=reward)
    store.put(protocol.decision_key(RUN, 1), protocol.dumps(sign(world, decision)))
    ledger_mirror.upload(store, RUN, str(path), world.agg_key)
    problems, _ = audit.verify(store, RUN)
    assert problems and all("round 1" in p and "reward" in p for p in problems), problems


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
    (path / ledger_mirror.index_key(RUN)).write_bytes(b"garbage")
    problems, summary = audit.verify(store, RUN)
    assert any(p.startswith("round 0: the decision is unreadable") for p in problems), problems
    assert (
        f"ledger: the store's ledger index {RUN}/ledger/index is damaged: truncated"
        in "\n".join(problems)
    ), problems
    assert summary["rounds"] == ROUNDS and summary["entries"] == 0
    assert audit.verify(store, "nosuchrun")[0] == [
        "run 'nosuchrun' has no manifest nosuchrun/run.json (unknown run)"
    ]


def test_a_forged_ledger_index_or_segment_is_a_problem(world, tmp_path):
    store, path = clone(world, tmp_path)
    forged = ledger_copy(world, tmp_path)
    ledger_mirror.upload(store, RUN, str(forged), identity.generate())  # not the run's key
    problems, summary = audit.verify(store, RUN)
    assert problems[0] == (
        f"ledger: the store's ledger index {RUN}/ledger/index is not signed by the aggregator key"
    )
    assert summary["entries"] == 0
    store, _ = clone(world, tmp_path / "again")
    segment = ledger_mirror.segment_key(RUN, 1)
    store.put(segment, store.get(segment).replace(b'"reward":0.0', b'"reward":0.5', 1))
    problems, _ = audit.verify(store, RUN)
    assert problems[0].startswith(f"ledger: the store's ledger segment {segment}, entry "), problems
    assert problems[0].endswith("does not match its hash (edited)"), problems


def set_latest(store: ObjectStore, version: int) -> None:
    """Moves `latest` to `version` (back, as it was before a round was published)."""
    info = protocol.read_latest(store, RUN)
    store.put(protocol.latest_key(RUN), protocol.dumps({**info, "version": version}))


def upload_rounds_before(world, tmp_path, store: ObjectStore, rnd: int) -> Path:
    """Puts the store's ledger copy as it was before round `rnd` was recorded (no segments
    from round `rnd` on); returns the full ledger."""
    full = ledger_copy(world, tmp_path)
    short = tmp_path / "short.sqlite"
    shutil.copyfile(full, short)
    sql(short, f"DELETE FROM entries WHERE round >= {rnd}")
    for r in range(rnd, ROUNDS):
        store.delete(ledger_mirror.segment_key(RUN, r))
    ledger_mirror.upload(store, RUN, str(short), world.agg_key, last_round=rnd - 1)
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
        ledger_mirror.upload(store, RUN, str(full), world.agg_key)
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


# ---------------------------------------------------------- audit() and read_ledger()


def test_audit_hands_back_the_entries_latest_and_registry(world, tmp_path):
    result = audit.audit(world.store, RUN)
    assert (result.problems, result.warnings) == ([], [])
    assert result.summary == audit.verify(world.store, RUN)[1]
    assert result.latest == ROUNDS
    assert len(result.entries) == result.summary["entries"]
    assert {e["contributor"] for e in result.entries} == set(NAMES)
    assert result.registry == {name: key.public_hex for name, key in world.keys.items()}


def test_read_ledger_reads_the_store_copy_or_a_given_file(world, tmp_path):
    entries, problems = audit.read_ledger(world.store, RUN)
    assert problems == [] and len(entries) == ROUNDS * len(NAMES) - 1
    path = ledger_copy(world, tmp_path)
    assert audit.read_ledger(world.store, RUN, str(path)) == (entries, [])
    missing = str(tmp_path / "nope.sqlite")
    assert audit.read_ledger(world.store, RUN, missing) == (None, [f"no ledger file at {missing}"])
    store, _ = clone(world, tmp_path)
    assert audit.read_ledger(store, RUN, None, world.agg_key.public_hex) == (entries, [])
    store.delete(ledger_mirror.index_key(RUN))
    assert audit.read_ledger(store, RUN) == (
        None,
        [f"no ledger in the store (no {ledger_mirror.index_key(RUN)})"],
    )
