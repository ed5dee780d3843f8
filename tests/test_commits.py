"""Tests of near_jax.contrib.commits: slots in store order, races, floods, forgeries, arrivals."""

import dataclasses
import hashlib
import threading

import numpy as np
import pytest

from near_jax.contrib import commits, identity
from near_jax.contrib.commits import (
    CommitError,
    arrivals,
    commit,
    commit_key,
    commit_message,
    commits_prefix,
    read_commits,
)
from near_jax.contrib.contributor import Signer
from near_jax.diloco import protocol
from near_jax.diloco.store import ObjectStore, frame

RUN = "crun"


def sha(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


@pytest.fixture
def store(tmp_path):
    return ObjectStore.open(str(tmp_path))


@pytest.fixture(scope="module")
def idents():
    return {name: identity.generate() for name in ("ann", "bob", "eve")}


def keys_of(idents):
    return {name: i.public_hex for name, i in idents.items()}


def signed(ident, **body):
    body["signature"] = ident.sign(commit_message(body))
    return body


def test_slots_follow_the_order_of_commitments(store, idents):
    rng = np.random.default_rng(0)
    order = [str(n) for n in rng.choice(["ann", "bob", "eve"], size=7)]
    hashes = [sha(int(x)) for x in rng.integers(0, 1 << 30, size=7)]
    slots = [commit(store, RUN, 3, n, idents[n], h) for n, h in zip(order, hashes, strict=True)]
    assert slots == list(range(7))
    assert all(commits_prefix(RUN, 3) in k for k in store.list(f"{RUN}/commits/"))
    assert not protocol.contrib_keys(store, RUN, 3)  # never listed as contributions
    got = read_commits(store, RUN, 3, keys_of(idents), limit=100)
    want = {}
    for slot, (n, h) in enumerate(zip(order, hashes, strict=True)):
        want.setdefault((n, h), slot)
    assert got == want
    # Another round's slots start again at 0; a second commitment keeps the earliest slot.
    assert commit(store, RUN, 4, "ann", idents["ann"], hashes[0]) == 0
    again = commit(store, RUN, 3, order[0], idents[order[0]], hashes[0])
    assert (
        again == 7 and read_commits(store, RUN, 3, keys_of(idents), 100)[(order[0], hashes[0])] == 0
    )


def test_the_lowest_free_slot_is_claimed_so_a_planted_high_slot_opens_no_gap(store, idents):
    # Someone plants slot 500 early: the next committer still takes slot 0, so no slot
    # below an original's stays free for a later copy.
    store.put(commit_key(RUN, 1, 500), b"junk")
    store.put(commit_key(RUN, 1, 1) + "/nested", b"junk")  # blocks slot 1's path
    store.put(commit_key(RUN, 1, 2) + ".tmp", b"junk")  # another name: slot 2 is free
    assert commit(store, RUN, 1, "ann", idents["ann"], sha(1)) == 0
    assert commit(store, RUN, 1, "bob", idents["bob"], sha(2)) == 2
    assert commit(store, RUN, 1, "eve", idents["eve"], sha(3)) == 3
    got = read_commits(store, RUN, 1, keys_of(idents), 100)
    assert got == {("ann", sha(1)): 0, ("bob", sha(2)): 2, ("eve", sha(3)): 3}


def test_racing_committers_get_distinct_slots(store, idents):
    n = 8
    names = [f"c{i}" for i in range(n)]
    keys = {name: identity.generate() for name in names}
    start, out, errors = threading.Barrier(n), {}, []

    def run(name):
        start.wait()
        try:
            out[name] = commit(store, RUN, 2, name, keys[name], sha(len(name) + ord(name[-1])))
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(name,)) for name in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(out.values()) == list(range(n))
    got = read_commits(store, RUN, 2, {k: v.public_hex for k, v in keys.items()}, 100)
    assert {name: slot for (name, _), slot in got.items()} == out


def test_lost_races_are_bounded_by_one_line_errors(store, idents, monkeypatch):
    monkeypatch.setattr(ObjectStore, "put_if_absent", lambda self, key, body: False)
    with pytest.raises(CommitError, match="no free slot") as e:
        commit(store, RUN, 0, "ann", idents["ann"], sha(0), attempts=5)
    assert "\n" not in str(e.value) and "lost 5 races" in str(e.value)
    monkeypatch.undo()
    monkeypatch.setattr(commits, "MAX_SLOT", 2)
    for i in range(3):
        assert commit(store, RUN, 0, "ann", idents["ann"], sha(i)) == i
    with pytest.raises(CommitError, match="slots go up to 2"):
        commit(store, RUN, 0, "ann", idents["ann"], sha(9))
    for bad in ({"name": "../x"}, {"payload_sha256": "A" * 64}, {"rnd": -1}, {"rnd": True}):
        args = {"name": "ann", "payload_sha256": sha(1), "rnd": 0, **bad}
        with pytest.raises(ValueError):
            commit(store, RUN, args["rnd"], args["name"], idents["ann"], args["payload_sha256"])


def test_a_flood_is_bounded_and_reading_in_order_stays_sound(store, idents):
    rng = np.random.default_rng(1)
    flood = int(rng.integers(5, 15))
    for slot in range(flood):  # a flood of valid commitments by eve
        assert commit(store, RUN, 5, "eve", idents["eve"], sha(1000 + slot)) == slot
    original = commit(store, RUN, 5, "ann", idents["ann"], sha(1))
    copy = commit(store, RUN, 5, "bob", idents["bob"], sha(2))
    assert (original, copy) == (flood, flood + 1)
    reads = []
    real_get = ObjectStore.get

    def counting_get(self, key, max_bytes=0):
        reads.append((key, max_bytes))
        return real_get(self, key, max_bytes=max_bytes)

    ObjectStore.get = counting_get
    try:
        for limit in range(flood + 3):
            reads.clear()
            got = read_commits(store, RUN, 5, keys_of(idents), limit)
            assert len(reads) == min(limit, flood + 2)
            assert all(m == commits.MAX_COMMIT_BYTES for _, m in reads)
            # Never the copy's commitment without the original's.
            assert (("bob", sha(2)) in got) <= (("ann", sha(1)) in got)
            assert (("ann", sha(1)) in got) == (limit > flood)
    finally:
        ObjectStore.get = real_get
    with pytest.raises(ValueError, match="limit"):
        read_commits(store, RUN, 5, keys_of(idents), -1)


def test_forged_misfiled_and_unsigned_commitments_are_ignored(store, idents, tmp_path):
    keys = keys_of(idents)
    ann = idents["ann"]
    good = {"run": RUN, "round": 7, "contributor": "ann", "payload_sha256": sha(1)}
    planted = {
        0: b"not json",
        1: protocol.dumps([1, 2]),
        2: protocol.dumps({**signed(ann, **good, slot=2), "extra": 1}),
        3: protocol.dumps(signed(ann, **good, slot=9)),  # signed for another slot
        4: protocol.dumps(signed(ann, **{**good, "round": 6}, slot=4)),  # another round
        5: protocol.dumps(signed(ann, **{**good, "run": "other"}, slot=5)),  # another run
        6: protocol.dumps(signed(idents["eve"], **good, slot=6)),  # eve signs as ann
        7: protocol.dumps({**good, "slot": 7, "signature": ""}),  # unsigned
        8: protocol.dumps(signed(identity.generate(), **{**good, "contributor": "zed"}, slot=8)),
        9: protocol.dumps(signed(ann, **{**good, "round": True}, slot=9)),
        10: protocol.dumps(signed(ann, **{**good, "payload_sha256": "x"}, slot=10)),
        11: b"{" * 5000,  # oversized: refused unread
        12: protocol.dumps(signed(ann, **good, slot=12.0)),
    }
    for slot, body in planted.items():
        store.put(commit_key(RUN, 7, slot), body)
    # A damaged object (bad frame) and a key that is not a slot.
    path = tmp_path / commit_key(RUN, 7, 13)
    path.write_bytes(frame(protocol.dumps(signed(ann, **good, slot=13)))[:-3])
    store.put(commits_prefix(RUN, 7) + "14", protocol.dumps(signed(ann, **good, slot=14)))
    assert read_commits(store, RUN, 7, keys, 100) == {}
    assert commit(store, RUN, 7, "ann", ann, sha(1)) == 14  # 13 is taken, if damaged
    assert read_commits(store, RUN, 7, keys, 100) == {("ann", sha(1)): 14}
    # A valid commitment copied to a lower slot does not move it down.
    store.put(commit_key(RUN, 8, 0), store.get(commit_key(RUN, 7, 14)))
    assert read_commits(store, RUN, 8, keys, 100) == {}


@dataclasses.dataclass
class C:
    contributor: str
    payload_sha256: str


def test_arrivals():
    found = {("ann", sha(1)): 4, ("bob", sha(2)): 9, ("eve", sha(3)): 0}
    cands = [
        C("bob", sha(2)),
        C("ann", sha(1)),
        C("eve", sha(9)),
        C("zed", sha(1)),
        C("eve", sha(3)),
    ]
    assert arrivals(found, cands) == [9, 4, 10, 10, 0]  # those without one tie, last
    assert arrivals({}, cands[:3]) == [0, 0, 0]
    assert arrivals(found, []) == []
    assert arrivals({("ann", sha(1)): 4}, [C("bob", sha(2))]) == [0]


def test_the_signer_commits_before_the_payload_exists(store, idents):
    like = {"w": np.zeros(6, np.float32)}
    plan = protocol.plan_shards(like)
    hashes = protocol.write_version0(store, RUN, plan, like)
    base = dataclasses.replace(protocol.load_version(store, RUN, 0, plan, hashes), version=3)
    delta = plan.split({"w": np.arange(6, dtype=np.float32)})
    seen = []

    class Watching(Signer):
        def __call__(self, tag, payload):
            out = super().__call__(tag, payload)
            seen.append(store.exists(protocol.contrib_key(RUN, 3, self.name)))
            return out

    signers = {n: Watching(idents[n], n, "a" * 64, "b" * 64, store=store) for n in ("ann", "bob")}
    for n in ("ann", "bob"):
        assert protocol.push_contribution(
            store, RUN, n, base, plan, delta, "fp32", sign=signers[n]
        )[0]
    assert seen == [False, False]  # committed while the contribution was not there yet
    assert [signers[n].slot for n in ("ann", "bob")] == [0, 1]
    got = read_commits(store, RUN, 3, keys_of(idents), 10)
    for n in ("ann", "bob"):
        tag, data = protocol.split_contribution(store.get(protocol.contrib_key(RUN, 3, n)))
        assert tag["payload_sha256"] == hashlib.sha256(data).hexdigest()
        assert got[(n, tag["payload_sha256"])] == signers[n].slot
    # Without a store the Signer signs as before and commits nothing.
    bare = Signer(idents["eve"], "eve", "a" * 64, "b" * 64)
    bare({"run": RUN, "round": 3, "base_sha256": "c" * 64}, b"payload")
    assert bare.slot is None and len(read_commits(store, RUN, 3, keys_of(idents), 10)) == 2
