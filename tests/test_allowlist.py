"""Allowlisted runs (`near_jax.contrib.allowlist`): signed promotions, admissions made later,
and a run that takes admitted contributors only."""

import json
import random

import pytest
from contrib_world import (
    HONEST,
    POLICY,
    RUN,
    World,
    allowlist_of,
    by_contributor,
    close_round,
    inner,
)

from near_jax.contrib import allowlist, identity, rewards
from near_jax.contrib.allowlist import Additions, Admissions, admit, admitted
from near_jax.diloco import protocol
from near_jax.diloco.protocol import ProtocolError
from near_jax.diloco.store import ObjectStore


def rows(rng: random.Random, n: int) -> tuple[list[dict], dict[str, identity.Identity]]:
    """promote's rows for `n` random contributors, and their keys."""
    keys = {f"c{i}-{rng.getrandbits(20):x}": identity.generate() for i in range(n)}
    out = [
        {
            "contributor": name,
            "key_id": key.key_id,
            "public_key": key.public_hex,
            "reward": rng.random(),
            "rounds": rng.randint(1, 9),
        }
        for name, key in keys.items()
    ]
    return out, keys


def signed(rng, n=4, **kwargs):
    agg = identity.generate()
    r, keys = rows(rng, n)
    doc = allowlist.sign_promotion(
        agg, "rung0", r, window=rng.randint(0, 9), top=n, issued_at=1e9 * rng.random(), **kwargs
    )
    return agg, doc, keys


def test_a_signed_promotion_round_trips(tmp_path):
    rng = random.Random(0)
    for n in (0, 1, 5):
        agg, doc, keys = signed(rng, n)
        text = json.dumps(doc, indent=rng.choice([None, 2]))
        path = tmp_path / f"p{n}.json"
        path.write_text(text)
        for source in (path, str(path), text.encode()):
            p = allowlist.read_promotion(source, expected_signer=agg.public_hex)
            assert p.from_run == "rung0" and p.signer == agg.public_hex
            assert p.keys == {name: k.public_hex for name, k in keys.items()}
            assert len(p.sha256) == 64 and p.sha256 == protocol.sha256(text.encode())
        assert allowlist.read_promotion(path).manifest_entry() == {
            "from_run": "rung0",
            "signer": agg.public_hex,
            "sha256": p.sha256,
            "keys": dict(sorted(p.keys.items())),
        }


def _refusal(tmp_path, rng, case):
    agg, doc, _ = signed(rng, 3)
    other = identity.generate()
    source, expected = json.dumps(doc).encode(), None
    if case == "missing":
        source = tmp_path / "nope.json"
    elif case == "oversized":
        source = b" " * (allowlist.MAX_PROMOTION_BYTES + 1)
    elif case == "not JSON":
        source = b"{not json"
    elif case == "not an object":
        source = b"[1, 2]"
    elif case == "wrong kind":
        source = json.dumps({**doc, "kind": "near_jax/other"}).encode()
    elif case == "wrong format":
        source = json.dumps({**doc, "format": 2}).encode()
    elif case == "extra field":
        source = json.dumps({**doc, "extra": 1}).encode()
    elif case == "malformed signer key":
        source = json.dumps({**doc, "aggregator_key": "ab" * 31}).encode()
    elif case == "malformed contributor key":
        bad = [dict(doc["contributors"][0], public_key="Z" * 64), *doc["contributors"][1:]]
        source = json.dumps({**doc, "contributors": bad}).encode()
    elif case == "listed twice":
        twice = doc["contributors"] + doc["contributors"][:1]
        source = json.dumps(
            allowlist.sign_promotion(agg, "rung0", [], window=0, top=1, issued_at=0)
            | {"contributors": twice}
        ).encode()
    elif case == "tampered":
        more = [dict(doc["contributors"][0], reward=99.0), *doc["contributors"][1:]]
        source = json.dumps({**doc, "contributors": more}).encode()
    elif case == "added key":
        row = {"contributor": "mallory", "key_id": other.key_id, "public_key": other.public_hex}
        source = json.dumps({**doc, "contributors": [*doc["contributors"], row]}).encode()
    elif case == "NaN":
        source = json.dumps({**doc, "issued_at": float("nan")}).encode()
    elif case == "nested":
        source = (
            json.dumps({**doc, "window": 1})
            .encode()
            .replace(b'"window": 1', b'"window": ' + b"[" * 900 + b"]" * 900)
        )
    elif case == "other signer":
        expected = other.public_hex
    with pytest.raises(ValueError) as e:
        allowlist.read_promotion(source, expected_signer=expected)
    return str(e.value)


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "cannot read promotion file"),
        ("oversized", f"is over {allowlist.MAX_PROMOTION_BYTES} bytes"),
        ("not JSON", "is not JSON"),
        ("not an object", "is not a JSON object"),
        ("wrong kind", "expected kind 'near_jax/promotion' format 1"),
        ("wrong format", "format 2; expected kind"),
        ("extra field", "has fields"),
        ("malformed signer key", "bad public key"),
        ("malformed contributor key", "bad public key"),
        ("listed twice", "a contributor is listed twice"),
        ("tampered", "the signature does not verify"),
        ("added key", "the signature does not verify"),
        ("NaN", "has values JSON does not allow"),
        ("nested", "does not verify"),
        ("other signer", "not the expected"),
    ],
)
def test_read_promotion_refuses_with_one_line(tmp_path, case, message):
    text = _refusal(tmp_path, random.Random(case), case)
    assert message in text and "\n" not in text, text


def test_sign_promotion_refuses_bad_rows():
    rng = random.Random(1)
    r, _ = rows(rng, 2)
    for bad in ([dict(r[0], public_key="")], [r[0], r[0]], [dict(r[0], contributor="a b")]):
        with pytest.raises(ValueError):
            allowlist.sign_promotion(
                identity.generate(), "rung0", bad, window=0, top=1, issued_at=0
            )


def _manifest(agg, keys):
    entry = {"from_run": "rung0", "signer": "", "sha256": "", "keys": keys}
    return {"contrib": {"aggregator_key": agg.public_hex, "allowlist": entry}}


def test_admitted_counts_additions_only_when_the_aggregator_signed_them(tmp_path):
    rng = random.Random(2)
    store = ObjectStore.open(str(tmp_path), must_exist=False)
    agg, other = identity.generate(), identity.generate()
    _, keys = rows(rng, 5)
    public = {name: k.public_hex for name, k in keys.items()}
    names = sorted(public)
    manifest = _manifest(agg, {n: public[n] for n in names[:2]})
    assert admitted(store, RUN, {"contrib": {"aggregator_key": agg.public_hex}}) == (None, "")
    assert admitted(store, RUN, manifest) == ({n: public[n] for n in names[:2]}, "")
    more = {n: public[n] for n in names[2:4]}
    key = allowlist.additions_key(RUN)
    for body, why in (
        (allowlist.signed_additions(other, RUN, 1, more), "not signed"),
        (allowlist.signed_additions(agg, RUN + "x", 1, more), "not signed"),
        ({"run": RUN, "seq": 1, "keys": more, "signature": "0" * 128}, "not signed"),
        ({"run": RUN, "seq": 1, "keys": more}, "not signed"),
        ({**allowlist.signed_additions(agg, RUN, 1, more), "seq": 2}, "not signed"),
        (allowlist.signed_additions(agg, RUN, 1, {"x": "y" * 64}), "malformed"),
        (b"[" * 50000, "unreadable"),
    ):
        store.put(key, body if isinstance(body, bytes) else protocol.dumps(body))
        got, problem = admitted(store, RUN, manifest)
        assert got == {n: public[n] for n in names[:2]} and why in problem, problem
    store.put(key, protocol.dumps(allowlist.signed_additions(agg, RUN, 3, more)))
    assert admitted(store, RUN, manifest) == ({n: public[n] for n in names[:4]}, "")
    # A malformed manifest allowlist admits nobody: the run stays closed.
    broken = {"contrib": {"aggregator_key": agg.public_hex, "allowlist": {"keys": [1]}}}
    got, problem = admitted(store, RUN, broken)
    assert got == more and "contrib.allowlist is malformed" in problem


def test_admit_adds_with_the_next_seq(tmp_path):
    rng = random.Random(3)
    store = ObjectStore.open(str(tmp_path), must_exist=False)
    agg = identity.generate()
    _, keys = rows(rng, 4)
    public = {name: k.public_hex for name, k in keys.items()}
    a, b, c, d = sorted(public)
    manifest = _manifest(agg, {a: public[a]})
    with pytest.raises(ValueError, match="is open"):
        admit(store, RUN, agg, {"contrib": {}}, {b: public[b]})
    assert admit(store, RUN, agg, manifest, {b: public[b]}) == (Additions(1, {b: public[b]}), [b])
    assert admit(store, RUN, agg, manifest, {a: public[a], b: public[b]})[1] == []  # no-op
    out, new = admit(store, RUN, agg, manifest, {c: public[c], d: public[d]})
    assert out.seq == 2 and new == [c, d] and admitted(store, RUN, manifest)[0] == public
    for name in (a, b):
        with pytest.raises(ValueError, match=f"{name} is already admitted with key id"):
            admit(store, RUN, agg, manifest, {name: identity.generate().public_hex})
    store.put(allowlist.additions_key(RUN), b"junk")
    with pytest.raises(ProtocolError, match="pass --force"):
        admit(store, RUN, agg, manifest, {b: public[b]})
    out, new = admit(store, RUN, agg, manifest, {b: public[b]}, force=True)
    assert (
        new == [b]
        and out.seq > 2
        and admitted(store, RUN, manifest)[0]
        == {
            a: public[a],
            b: public[b],
        }
    )


def test_admissions_are_read_once_per_round_and_never_rolled_back(tmp_path):
    rng = random.Random(4)
    store = ObjectStore.open(str(tmp_path), must_exist=False)
    agg = identity.generate()
    _, keys = rows(rng, 3)
    public = {name: k.public_hex for name, k in keys.items()}
    a, b, c = sorted(public)
    view = Admissions(
        store, RUN, agg.public_hex, _manifest(agg, {a: public[a]})["contrib"]["allowlist"]
    )
    assert view.at(0) == {a: public[a]}
    manifest = _manifest(agg, {a: public[a]})
    admit(store, RUN, agg, manifest, {b: public[b]})
    old = store.get(allowlist.additions_key(RUN))
    assert view.at(0) == {a: public[a]}  # round 0 was read already
    assert view.at(1) == {a: public[a], b: public[b]}
    admit(store, RUN, agg, manifest, {c: public[c]})
    assert view.at(2) == public
    store.put(allowlist.additions_key(RUN), old)  # an older signed object re-put
    assert view.at(3) == public and "went back to seq 1" in view.problem


class Allowlisted(World):
    """A World whose aggregator created the run from a promotion of `ADMITTED`."""

    ADMITTED = HONEST[:3]

    def make_aggregator(self):
        self.allowlist = allowlist_of(self.ADMITTED)
        return super().make_aggregator()


NOT_ADMITTED = (
    "not on the run's allowlist: {}'s key id {} is not admitted (python -m near_jax.contrib admit)"
)


def test_an_allowlisted_run_takes_admitted_contributors_only(tmp_path):
    world = Allowlisted(tmp_path, HONEST[:5], POLICY)
    manifest = protocol.read_json(world.store, protocol.manifest_key(RUN))
    entry = manifest["contrib"]["allowlist"]
    assert entry["keys"] == {n: world.keys[n].public_hex for n in Allowlisted.ADMITTED}
    late = HONEST[3]

    def round_entries(forged_additions=None):
        base = world.tree(world.base())
        for name in HONEST[:5]:
            world.push(name, inner(base, name, world.agg.state.version))
        if forged_additions is not None:
            world.store.put(allowlist.additions_key(RUN), protocol.dumps(forged_additions))
        return by_contributor(close_round(world))

    forged = allowlist.signed_additions(
        identity.generate(), RUN, 9, {late: world.keys[late].public_hex}
    )
    for forged_additions in (None, forged):
        entries = round_entries(forged_additions)
        for name in Allowlisted.ADMITTED:
            assert entries[name]["accepted"], entries[name]
        for name in HONEST[3:5]:
            e = entries[name]
            assert e["reason"] == NOT_ADMITTED.format(name, world.keys[name].key_id), e
            assert e["key_id"] == world.keys[name].key_id and not e["accepted"]
    # Not cheating: a key that is not admitted is not held against the name.
    standing = {x.contributor: x for x in rewards.standings(list(entries.values()))}
    assert not standing[late].disqualified and standing[late].rejected == 1
    world.store.delete(allowlist.additions_key(RUN))
    admit(world.store, RUN, world.agg_key, manifest, {late: world.keys[late].public_hex})
    entries = round_entries()
    assert entries[late]["accepted"], entries[late]
    assert entries[HONEST[4]]["reason"].startswith("not on the run's allowlist")
    # The signature is checked first: a forgery under any name is a bad signature.
    for name in (HONEST[0], HONEST[4]):
        world.push(name, inner(world.tree(world.base()), name, 9), key=identity.generate())
    entries = by_contributor(close_round(world))
    for name in (HONEST[0], HONEST[4]):
        assert entries[name]["reason"].startswith("bad signature") and not entries[name]["key_id"]
