"""Tests of near_jax.contrib.admission: the new-key cap, commitment order, ledger entries."""

import hashlib
import json
import math

import numpy as np
import pytest

from near_jax.contrib import admission, identity, judging, ledger, ratings
from near_jax.contrib.checks import Candidate
from near_jax.contrib.commits import commit, commit_key
from near_jax.diloco import protocol
from near_jax.diloco.store import ObjectStore

RUN = "arun"
VALID = object()  # any manifest makes a candidate valid


def sha(*parts) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def candidate(name, *, valid=True, key_id="k", payload=None, **fields):
    return Candidate(
        f"{RUN}/contrib/{name}",
        name,
        sha(name),
        VALID if valid else None,
        "" if valid else "bad signature",
        contributor=name,
        key_id=key_id,
        payload_sha256=payload or sha("payload", name),
        **fields,
    )


class FakeChecker:
    """What arrival_order asks of a Checker: each contributor's registered public key."""

    def __init__(self, keys):
        self.keys, self.asked = keys, []

    def public_key(self, name):
        self.asked.append(name)
        return self.keys.get(name)


@pytest.fixture
def store(tmp_path):
    return ObjectStore.open(str(tmp_path))


# ----------------------------------------------------------------------------- over_cap


def test_no_cap_caps_nothing():
    rng = np.random.default_rng(1)
    cands = [candidate(f"n{i}") for i in range(12)]
    arrival = {id(c): int(rng.integers(5)) for c in cands}
    for cap in (0, -1, -int(rng.integers(2, 100))):
        assert admission.over_cap(cands, arrival, set(), cap) == []


def test_over_cap_takes_new_contributors_past_the_cap_in_commitment_order():
    rng = np.random.default_rng(2)
    for _ in range(60):
        n = int(rng.integers(1, 25))
        names = [f"c{int(x):04d}" for x in rng.choice(10_000, size=n, replace=False)]
        cands = [candidate(name, valid=bool(rng.random() < 0.8)) for name in names]
        known = {name for name in names if rng.random() < 0.3}
        arrival = {id(c): int(rng.integers(0, 6)) for c in cands}  # ties: islands decide
        cap = int(rng.integers(1, 8))
        order = [int(i) for i in rng.permutation(n)]  # the listing order does not matter
        over = admission.over_cap([cands[i] for i in order], arrival, known, cap)
        new = [c for c in cands if c.valid and c.contributor not in known]
        assert len(over) == max(0, len(new) - cap)
        assert all(c.valid and c.contributor not in known for c in over)
        admitted = [c for c in new if all(c is not o for o in over)]
        assert len(admitted) == min(cap, len(new))
        rank = {id(c): (arrival[id(c)], c.island) for c in cands}
        if over and admitted:
            assert max(rank[id(c)] for c in admitted) < min(rank[id(c)] for c in over)
        assert [rank[id(c)] for c in over] == sorted(rank[id(c)] for c in over)


def test_known_and_invalid_contributors_are_never_capped():
    rng = np.random.default_rng(3)
    known = [candidate(f"old{i}") for i in range(6)]
    invalid = [candidate(f"bad{i}", valid=False) for i in range(4)]
    new = [candidate(f"new{i}") for i in range(5)]
    cands = known + invalid + new
    # the known and the invalid came first, the new ones late: still not counted
    arrival = {id(c): i for i, c in enumerate(cands)}
    over = admission.over_cap(cands, arrival, {c.contributor for c in known}, 2)
    assert over == new[2:]
    # arrival first, then the island name
    arrival = {id(c): 0 for c in cands}
    shuffled = [cands[int(i)] for i in rng.permutation(len(cands))]
    assert admission.over_cap(shuffled, arrival, {c.contributor for c in known}, 3) == new[3:]


# ------------------------------------------------------------------------ arrival_order


def test_arrival_order_ranks_by_commitment_slot(store):
    rng = np.random.default_rng(4)
    names = [f"isl{i}" for i in range(7)]
    idents = {n: identity.generate() for n in names}
    cands = [candidate(n) for n in names]
    committed = [names[int(i)] for i in rng.permutation(len(names))[:5]]
    r = int(rng.integers(1, 50))
    slots = {n: commit(store, RUN, r, n, idents[n], sha("payload", n)) for n in committed}
    assert sorted(slots.values()) == list(range(5))  # in the order they committed
    checker = FakeChecker({n: i.public_hex for n, i in idents.items()})
    ranks = admission.arrival_order(store, RUN, r, cands, checker)
    assert set(ranks) == {id(c) for c in cands}
    for c in cands:
        assert ranks[id(c)] == slots.get(c.contributor, 5)  # without: tied after all
    # the cap follows: the first committed new ones are admitted
    over = admission.over_cap(cands, ranks, set(), 3)
    assert {c.contributor for c in over} == set(names) - set(committed[:3])


def test_a_commitment_only_counts_signed_by_the_registered_key_for_this_payload(store):
    rng = np.random.default_rng(5)
    names = ["ann", "bob", "eve", "joe", "kim"]
    idents = {n: identity.generate() for n in names}
    r = int(rng.integers(0, 10))
    checker = FakeChecker({n: idents[n].public_hex for n in names})
    commit(store, RUN, r, "eve", identity.generate(), sha("payload", "eve"))  # not eve's key
    commit(store, RUN, r, "joe", idents["joe"], sha("another payload"))  # another payload
    commit(store, RUN, r + 1, "kim", idents["kim"], sha("payload", "kim"))  # another round
    commit(store, RUN, r, "bob", idents["bob"], sha("payload", "bob"))
    commit(store, RUN, r, "ann", idents["ann"], sha("payload", "ann"))
    commit(store, RUN, r, "kim", idents["kim"], sha("payload", "kim"))
    cands = [candidate(n) for n in names]
    ranks = admission.arrival_order(store, RUN, r, cands, checker)
    got = {c.contributor: ranks[id(c)] for c in cands}
    assert got == {"bob": 2, "ann": 3, "kim": 4, "eve": 5, "joe": 5}
    # an unsigned candidate (no key id) has no key looked up: no commitment counts
    unsigned = [candidate(n, key_id="") for n in names]
    ranks = admission.arrival_order(store, RUN, r, unsigned, FakeChecker({}))
    assert set(ranks.values()) == {0}  # all tie: nothing committed that counts
    checker.asked.clear()
    admission.arrival_order(store, RUN, r, unsigned, checker)
    assert checker.asked == []
    # an unregistered contributor's commitment does not count either
    ranks = admission.arrival_order(store, RUN, r, cands, FakeChecker({"ann": None}))
    assert set(ranks.values()) == {0}


def test_a_commitment_refiled_elsewhere_does_not_count(store):
    ann, bob = identity.generate(), identity.generate()
    commit(store, RUN, 3, "bob", bob, sha("payload", "bob"))  # slot 0
    slot = commit(store, RUN, 3, "ann", ann, sha("payload", "ann"))  # slot 1
    body = json.loads(store.get(commit_key(RUN, 3, slot)))
    # ann's signed body re-filed at the lowest slot of the next round
    assert store.put_if_absent(commit_key(RUN, 4, 0), protocol.dumps(body))
    cands = [candidate("ann"), candidate("bob")]
    checker = FakeChecker({"ann": ann.public_hex, "bob": bob.public_hex})
    ranks = admission.arrival_order(store, RUN, 4, cands, checker)
    assert list(ranks.values()) == [0, 0]


# -------------------------------------------------------------------------------- entry


def canonical(text):
    return protocol.dumps(json.loads(text)).decode() == text


def judged_candidate(rng, name, accepted):
    c = candidate(
        name,
        valid=accepted,
        statement=protocol.dumps({"run": RUN, "contributor": name}).decode(),
        signature="ab" * 64,
        score=float(rng.standard_normal()),
        accepted=accepted,
        reward=float(rng.uniform(0, 1)) if accepted else 0.0,
    )
    if not accepted:
        c.reason = "lazy: x"
    return c


def test_entry_records_the_judged_detail_as_canonical_json():
    rng = np.random.default_rng(6)
    for i in range(20):
        accepted = bool(rng.random() < 0.6)
        c = judged_candidate(rng, f"c{i}", accepted)
        rating = ratings.Rating(float(rng.uniform(0, 50)), float(rng.uniform(0, 9)))
        v = judging.Verdict(
            validated=True,
            score=c.score,
            reason="" if accepted else "lazy: x",
            performance=float(rng.standard_normal()),
            assigned={"margin": math.nan, "pass": False, "batches": [0, 2]},
            rating=rating,
            weight=float(rng.uniform(0, 4)),
        )
        r = int(rng.integers(0, 1000))
        e = admission.entry(c, r, v, None)
        assert {k: e[k] for k in e if k != "detail"} == c.entry(r)
        assert canonical(e["detail"])
        assert json.loads(e["detail"]) == v.detail()
        assert json.loads(e["detail"])["assigned"]["margin"] is None
        assert ledger.normalize_entry(e, r)["detail"] == e["detail"]
        got = ratings.detail_of(e)
        assert got["rating"] == rating and got["validated"]
        assert got["performance"] == (v.performance if accepted else -math.inf)


def test_entry_of_an_unjudged_contribution():
    rng = np.random.default_rng(7)
    rating = ratings.Rating(float(rng.uniform(0, 50)), float(rng.uniform(0, 9)))
    r = int(rng.integers(0, 1000))
    signed = judged_candidate(rng, "signed", False)
    e = admission.entry(signed, r, None, rating)
    assert canonical(e["detail"])
    assert json.loads(e["detail"]) == {
        "validated": False,
        "weight": 0.0,
        "rating": [rating.mu, rating.sigma],
    }
    assert ratings.detail_of(e)["rating"] == rating
    # a signed newcomer carries the default rating
    e = admission.entry(signed, r, None, None)
    assert ratings.detail_of(e)["rating"] == ratings.DEFAULT
    # an unsigned one carries none, whatever rating its name has
    unsigned = candidate("anon", valid=False, key_id="")
    e = admission.entry(unsigned, r, None, rating)
    assert json.loads(e["detail"]) == {"validated": False, "weight": 0.0}
    assert canonical(e["detail"]) and ratings.detail_of(e)["rating"] is None
    for c in (signed, unsigned):
        ledger.normalize_entry(admission.entry(c, r, None, rating), r)


def test_late_entry():
    rng = np.random.default_rng(8)
    for _ in range(10):
        late_round = int(rng.integers(0, 100))
        r = late_round + int(rng.integers(1, 5))
        name = f"isl{int(rng.integers(1000))}"
        e = admission.late_entry({"island": name, "round": late_round, "key": "x"}, r)
        assert e["round"] == r and e["contributor"] == name
        assert e["key_id"] == "" and e["payload_sha256"] == "" and e["signature"] == ""
        assert not e["accepted"] and not e["applied"] and e["reward"] == 0 and e["score"] is None
        assert e["reason"].startswith(f"late: pushed to round {late_round}")
        assert canonical(e["detail"])
        assert json.loads(e["detail"]) == {"validated": False, "weight": 0.0}
        assert ledger.normalize_entry(e, r) == e
        assert ratings.detail_of(e)["rating"] is None
        with pytest.raises(ValueError):
            ledger.normalize_entry(e, r + 1)  # filed in its own round only
