"""The store's copy of the ledger (`near_jax.contrib.ledger_mirror`): round segments and a
signed index; flat upload bytes per round, and every damaged, forged, missing or rolled-back
object refused with the local file kept.
"""

import json
import os
import random

import pytest
from ledger_rows import RUN, entry, file_digest

from near_jax.contrib import identity, ledger_mirror
from near_jax.contrib.ledger import ENTRY_FIELDS, Ledger, LedgerError, genesis_hash
from near_jax.contrib.ledger_mirror import (
    download,
    index_key,
    read_index,
    segment_body,
    segment_key,
    upload,
    upload_rounds,
)
from near_jax.contrib.ledger_verify import verify_chain
from near_jax.diloco import protocol
from near_jax.diloco.protocol import dumps
from near_jax.diloco.store import ObjectStore

KEY = identity.generate()


def random_rows(rng: random.Random, rnd: int, n: int) -> list[dict]:
    return [
        entry(
            f"c{rnd}-{i}",
            score=rng.uniform(-5, 5),
            reward=rng.random(),
            payload_sha256=f"{rng.getrandbits(256):064x}",
            accepted=(ok := rng.random() < 0.7),
            applied=ok and rng.random() < 0.8,
            reason="" if ok else "outlier",
        )
        for i in range(n)
    ]


def recorded(tmp_path, rounds: int, seed: int = 0, per_round=None):
    """(store, ledger path, key) with `rounds` random rounds recorded and uploaded one by
    one (some rounds empty)."""
    rng = random.Random(seed)
    store = ObjectStore.open(str(tmp_path / "store"), must_exist=False)
    path = str(tmp_path / "src.sqlite")
    with Ledger.open(path, RUN) as book:
        for rnd in range(rounds):
            n = rng.choice([0, 1, 3, 6]) if per_round is None else per_round
            assert book.append_round(rnd, random_rows(rng, rnd, n))
            upload_rounds(store, book, rnd, rnd, KEY)
    return store, path


def test_keys_and_an_empty_store():
    assert segment_key(RUN, 7) == "demo/ledger/rounds/00000007"
    assert index_key(RUN) == "demo/ledger/index"
    with pytest.raises(ValueError):
        index_key("../x")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_ledgers_round_trip(tmp_path, seed):
    target = str(tmp_path / "copy" / "ledger.sqlite")
    os.makedirs(os.path.dirname(target))
    empty = ObjectStore.open(str(tmp_path / "empty"), must_exist=False)
    assert download(empty, RUN, target, KEY.public_hex) is False
    assert not os.path.exists(target)
    rounds = random.Random(seed).randint(1, 12)
    store, path = recorded(tmp_path, rounds, seed)
    assert download(store, RUN, target, KEY.public_hex) is True
    assert verify_chain(target, RUN) == []
    with Ledger.open(path, RUN) as a, Ledger.open(target, RUN) as b:
        assert a.entries() == b.entries() and a.head() == b.head()
    assert os.listdir(os.path.dirname(target)) == ["ledger.sqlite"]  # no temp files left
    # every round has a segment holding exactly Ledger.entries(r, r), fields generic
    with Ledger.open(path, RUN) as a:
        for rnd in range(rounds):
            seg = json.loads(store.get(segment_key(RUN, rnd)))
            assert seg == {"format": 1, "run": RUN, "round": rnd, "entries": a.entries(rnd, rnd)}
            assert all(
                set(e) == {*ENTRY_FIELDS, "seq", "prev_hash", "entry_hash"} for e in seg["entries"]
            )
        index = read_index(store, RUN, KEY.public_hex)
        assert (index["last_round"], index["entries"], index["head"]) == (
            rounds - 1,
            a.count(),
            a.head(),
        )


def test_an_empty_ledger_and_a_whole_file_upload(tmp_path, ledger_path):
    store = ObjectStore.open(str(tmp_path / "store"), must_exist=False)
    target = str(tmp_path / "t.sqlite")
    with Ledger.open(str(tmp_path / "fresh.sqlite"), RUN) as fresh:
        upload_rounds(store, fresh, 0, -1, KEY)  # nothing recorded yet: an index only
    assert read_index(store, RUN, KEY.public_hex)["head"] == genesis_hash(RUN)
    assert download(store, RUN, target, KEY.public_hex)
    with Ledger.open(target, RUN) as b:
        assert b.count() == 0
    n = upload(store, RUN, ledger_path, KEY)
    assert n > 0 and download(store, RUN, target, KEY.public_hex)
    with Ledger.open(ledger_path, RUN) as a, Ledger.open(target, RUN) as b:
        assert a.entries() == b.entries()
    with pytest.raises(LedgerError, match="belongs to run 'demo', not 'other'"):
        upload(store, "other", ledger_path, KEY)
    with pytest.raises(LedgerError, match="no ledger file"):
        upload(store, RUN, str(tmp_path / "absent.sqlite"), KEY)


def test_upload_bytes_per_round_stay_flat(tmp_path):
    rng = random.Random(5)
    store = ObjectStore.open(str(tmp_path / "store"), must_exist=False)
    path = str(tmp_path / "src.sqlite")
    sizes = []
    with Ledger.open(path, RUN) as book:
        for rnd in range(60):
            assert book.append_round(rnd, random_rows(rng, rnd, 8))
            before = store.bytes_written
            n = upload_rounds(store, book, rnd, rnd, KEY)
            assert n == store.bytes_written - before
            sizes.append(n)
    early, late = sizes[:10], sizes[-10:]
    # only the digits of seq and round grow; the whole file is many rounds' worth
    assert max(late) <= max(early) * 1.03, (early, late)
    assert min(late) >= min(early) * 0.97, (early, late)
    assert os.path.getsize(path) > 10 * max(late)


def rewrite(store, rnd: int, change, key_round: int | None = None) -> None:
    """Rewrites round `rnd`'s segment through change(segment dict), under round
    `key_round`'s key (default: its own)."""
    seg = json.loads(store.get(segment_key(RUN, rnd)))
    change(seg)
    store.put(segment_key(RUN, rnd if key_round is None else key_round), dumps(seg))


def renumbered(seg: dict) -> None:
    """Round 2's segment relabelled as round 1's, entries and all."""
    seg["round"] = 1
    for e in seg["entries"]:
        e["round"] = 1


def flip(tmp_path, key) -> None:
    """A torn or bit-flipped object, as the filesystem holds it."""
    obj = tmp_path / "store" / key
    raw = bytearray(obj.read_bytes())
    raw[-3] ^= 0x10
    obj.write_bytes(bytes(raw))


def roll_back(store, tmp_path) -> None:
    """Puts the genuinely signed index of round 1 back (a replay of an old index)."""
    with Ledger.open(str(tmp_path / "src.sqlite"), RUN) as book:
        upload_rounds(store, book, 2, 1, KEY)


SEG0, SEG1, SEG2 = (f"segment {segment_key(RUN, r)}" for r in range(3))
ATTACKS = {  # attack: (damage(store, tmp_path), what the error says)
    "reward": (
        lambda s, t: rewrite(s, 2, lambda g: g["entries"][0].update(reward=0.75)),
        f"{SEG2}, entry 0 (seq 5) does not match its hash (edited)",
    ),
    "missing": (lambda s, t: s.delete(segment_key(RUN, 1)), f"{SEG1} is missing"),
    "reordered": (
        lambda s, t: s.put(segment_key(RUN, 1), s.get(segment_key(RUN, 2))),
        f"{SEG1} says format 1, run 'demo', round 2",
    ),
    "renamed": (
        lambda s, t: rewrite(s, 2, renumbered, key_round=1),
        f"{SEG1}, entry 0 breaks the chain: seq 5 after 2",
    ),
    "swapped": (
        lambda s, t: rewrite(s, 2, lambda g: g["entries"].reverse()),
        f"{SEG2}, entry 0 breaks the chain",
    ),
    "dropped": (
        lambda s, t: rewrite(s, 3, lambda g: g["entries"].pop()),
        "index demo/ledger/index says 8 entries",
    ),
    "forged": (
        lambda s, t: s.put(
            index_key(RUN), ledger_mirror.index_body(RUN, 3, 8, "0" * 64, identity.generate())
        ),
        "index demo/ledger/index is not signed by the aggregator key",
    ),
    "rolled-back": (roll_back, "index demo/ledger/index is rolled back: segment "),
    "field": (
        lambda s, t: rewrite(s, 0, lambda g: g["entries"][0].update(bonus=1)),
        f"{SEG0}, entry 0 does not have the fields",
    ),
    "nested": (lambda s, t: s.put(segment_key(RUN, 1), b"[" * 30000), f"{SEG1} is not JSON"),
    "torn": (lambda s, t: flip(t, segment_key(RUN, 0)), f"{SEG0} is damaged: sha256"),
    "other run": (
        lambda s, t: s.put(index_key(RUN), s.get(index_key(RUN)).replace(b'"demo"', b'"demx"')),
        "index demo/ledger/index is format 1 of run 'demx'",
    ),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_damaged_or_forged_copies_are_refused(tmp_path, attack):
    rng = random.Random(attack)
    store = ObjectStore.open(str(tmp_path / "store"), must_exist=False)
    path = str(tmp_path / "src.sqlite")
    with Ledger.open(path, RUN) as book:
        for rnd in range(4):  # 2 entries per round: 8 in all, seq 5 opens round 2
            assert book.append_round(rnd, random_rows(rng, rnd, 2))
            upload_rounds(store, book, rnd, rnd, KEY)
    target = str(tmp_path / "copy.sqlite")
    assert download(store, RUN, target, KEY.public_hex)
    good = file_digest(target)
    damage, message = ATTACKS[attack]
    damage(store, tmp_path)
    with pytest.raises(LedgerError) as err:
        download(store, RUN, target, KEY.public_hex)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert file_digest(target) == good  # the local file is kept
    assert sorted(os.listdir(tmp_path)) == ["copy.sqlite", "src.sqlite", "store"]


def same_json(a: bytes, b: bytes) -> bool:
    try:
        return json.loads(a) == json.loads(b)
    except ValueError:
        return False


def test_any_mangled_segment_is_a_one_line_ledger_error(tmp_path):
    """Segments rewritten with random byte changes (intact framing: a store writer's work)
    and absurd statements: always LedgerError, never another exception."""
    store, _ = recorded(tmp_path, 3, per_round=3)
    target = str(tmp_path / "t.sqlite")
    rng = random.Random(11)
    originals = {r: store.get(segment_key(RUN, r)) for r in range(3)}
    changed = 0
    while changed < 60:
        r = rng.randrange(3)
        body = bytearray(originals[r])
        for _ in range(rng.randint(1, 3)):
            body[rng.randrange(len(body))] = rng.choice(b'{}[]":,0123456789abcdefxyz\\ ')
        if same_json(bytes(body), originals[r]):
            continue  # a no-op change (the same byte, or a digit past double precision)
        changed += 1
        store.put(segment_key(RUN, r), bytes(body))
        with pytest.raises(LedgerError) as err:
            download(store, RUN, target, KEY.public_hex)
        assert "\n" not in str(err.value)
        store.put(segment_key(RUN, r), originals[r])
    deep = "[" * 5000 + "]" * 5000
    rewrite(store, 1, lambda g: g["entries"][0].update(statement=deep))
    with pytest.raises(LedgerError, match="entry 0 is malformed"):
        download(store, RUN, target, KEY.public_hex)
    assert not os.path.exists(target)


def test_an_oversized_segment_or_index_is_not_read(tmp_path, monkeypatch):
    store, _ = recorded(tmp_path, 3, per_round=4)
    target = str(tmp_path / "t.sqlite")
    monkeypatch.setattr(ledger_mirror, "MAX_SEGMENT_BYTES", 1000)
    with pytest.raises(LedgerError, match="segment demo/ledger/rounds/00000000 is over 1000 bytes"):
        download(store, RUN, target, KEY.public_hex)
    with (
        Ledger.open(str(tmp_path / "src.sqlite"), RUN) as book,
        pytest.raises(LedgerError, match="round 1's ledger segment is .* over the 1000-byte limit"),
    ):
        upload_rounds(store, book, 1, 1, KEY)  # an unreadable segment is never written
    monkeypatch.undo()
    store.put(index_key(RUN), b" " * 5000)
    with pytest.raises(LedgerError, match="index demo/ledger/index is over 4096 bytes"):
        download(store, RUN, target, KEY.public_hex)
    assert not os.path.exists(target)


def test_a_planted_future_segment_is_ignored_then_overwritten(tmp_path):
    store, path = recorded(tmp_path, 3, per_round=2)
    rng = random.Random(9)
    target = str(tmp_path / "t.sqlite")
    # junk, and a well-formed segment with a foreign chain, in the next round's slot
    store.put(segment_key(RUN, 3), segment_body(RUN, 3, [{"seq": 1}]))
    assert download(store, RUN, target, KEY.public_hex)
    with Ledger.open(path, RUN) as book:
        assert book.append_round(3, random_rows(rng, 3, 2))
        upload_rounds(store, book, 3, 3, KEY)  # the aggregator's copy wins
        want = book.entries()
    assert json.loads(store.get(segment_key(RUN, 3)))["entries"] == want[-2:]
    assert download(store, RUN, target, KEY.public_hex)
    with Ledger.open(target, RUN) as b:
        assert b.entries() == want


def test_a_reader_between_the_aggregators_two_writes(tmp_path, monkeypatch):
    """The next segment is there, the index not yet: the reader re-reads the index and
    gets the newer one (a stale index that never moves is refused, as rolled back)."""
    store, path = recorded(tmp_path, 3, per_round=2)
    with Ledger.open(path, RUN) as book:
        assert book.append_round(3, random_rows(random.Random(1), 3, 2))
        store.put(segment_key(RUN, 3), segment_body(RUN, 3, book.entries(3, 3)))
        real, calls = ledger_mirror.read_index, []

        def racing(*args):
            calls.append(1)
            if len(calls) == 2:  # the aggregator's second write lands now
                upload_rounds(store, book, 4, 3, KEY)
            return real(*args)

        monkeypatch.setattr(ledger_mirror, "read_index", racing)
        target = str(tmp_path / "t.sqlite")
        assert download(store, RUN, target, KEY.public_hex)
        with Ledger.open(target, RUN) as b:
            assert b.entries() == book.entries()
    assert len(calls) == 2


def test_the_default_key_is_the_manifests(tmp_path):
    store, path = recorded(tmp_path, 2, per_round=1)
    target = str(tmp_path / "t.sqlite")
    with pytest.raises(LedgerError, match="no usable aggregator key in demo/run.json"):
        download(store, RUN, target)
    manifest = {"contrib": {"aggregator_key": KEY.public_hex}}
    store.put(protocol.manifest_key(RUN), dumps(manifest))
    assert download(store, RUN, target)
    store.put(
        protocol.manifest_key(RUN),
        dumps({"contrib": {"aggregator_key": identity.generate().public_hex}}),
    )
    with pytest.raises(LedgerError, match="not signed by the aggregator key"):
        download(store, RUN, target)
