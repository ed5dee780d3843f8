"""Tests of near_jax.contrib.contributor, in-process: the Signer, prepare_signer's checks
(one-line ValueErrors) and slot_problem. A contributor run as processes is
test_contrib_islands.py."""

import base64
import dataclasses
import hashlib

import numpy as np
import pytest
from helpers import small_config

from near_jax.contrib import allowlist, attest, commits, identity, registry
from near_jax.contrib.contributor import Signer, prepare_signer, slot_problem
from near_jax.contrib.policy import Policy, allowed_code_key, recipe_sha256, signed_allowed_code
from near_jax.diloco import protocol
from near_jax.diloco.store import ObjectStore

RUN = "crun"
LIKE = {"w": np.zeros(6, np.float32), "b": np.zeros((), np.float32)}


def manifest_for(cfg, *, code=None, config=None, attestation="code_hash"):
    policy = Policy(
        allowed_code=(code or attest.code_sha256(),),
        config_sha256=config or recipe_sha256(cfg),
        attestation=attestation,
    )
    agg = identity.generate()
    return {"contrib": {"policy": policy.to_json(), "aggregator_key": agg.public_hex}}


@pytest.fixture
def setup(tmp_path):
    """(cfg, store, key path, key) of a contributor run's start."""
    key = identity.generate()
    path = tmp_path / "k.key"
    identity.save(key, path)
    (tmp_path / "store").mkdir()
    return small_config(), ObjectStore.open(str(tmp_path / "store")), str(path), key


def test_signer_signs_the_statement_of_a_contribution():
    key = identity.generate()
    signer = Signer(key, "eu-1", "a" * 64, "b" * 64)
    tag = {"run": RUN, "round": 3, "base_sha256": "e" * 64, "island": "eu-1"}
    out = signer(tag, b"payload")
    assert sorted(out) == [
        "code_sha256",
        "config_sha256",
        "contributor",
        "payload_sha256",
        "signature",
    ]
    fields = {
        "run": RUN,
        "round": 3,
        "contributor": "eu-1",
        "base_sha256": "e" * 64,
        "payload_sha256": hashlib.sha256(b"payload").hexdigest(),
        "code_sha256": "a" * 64,
        "config_sha256": "b" * 64,
    }
    assert out["payload_sha256"] == fields["payload_sha256"]
    assert identity.verify_statement(key.public_hex, fields, out["signature"])
    assert not identity.verify_statement(key.public_hex, {**fields, "round": 4}, out["signature"])
    attested = Signer(key, "eu-1", "a" * 64, "b" * 64, attestation=b"quote")(tag, b"payload")
    assert base64.b64decode(attested["attestation"]) == b"quote"


def test_a_signer_with_a_store_commits_first_and_signs_even_when_it_cannot(tmp_path, monkeypatch):
    store = ObjectStore.open(str(tmp_path))
    key = identity.generate()
    signer = Signer(key, "eu-1", "a" * 64, "b" * 64, store=store)
    tag = {"run": RUN, "round": 3, "base_sha256": "e" * 64, "island": "eu-1"}
    payloads = [bytes(np.random.default_rng(i).bytes(int(10 + i))) for i in range(3)]
    for i, payload in enumerate(payloads):
        out = signer(tag, payload)
        assert (signer.slot, signer.commit_problem) == (i, "")
        assert out["payload_sha256"] == hashlib.sha256(payload).hexdigest()
    got = commits.read_commits(store, RUN, 3, {"eu-1": key.public_hex}, 10)
    assert got == {("eu-1", hashlib.sha256(p).hexdigest()): i for i, p in enumerate(payloads)}
    # A round flooded past the slots: no commitment, the contribution is still signed.
    monkeypatch.setattr(commits, "MAX_SLOT", 2)
    out = signer(tag, b"late")
    assert signer.slot is None and signer.commit_problem.startswith("commit: no free slot")
    fields = {k: tag[k] for k in ("run", "round", "base_sha256")}
    fields.update(out, contributor="eu-1")
    fields.pop("signature")
    assert identity.verify_statement(key.public_hex, fields, out["signature"])


def test_prepare_signer_registers_the_key(setup):
    cfg, store, path, key = setup
    signer = prepare_signer(cfg, store, RUN, "eu-1", manifest_for(cfg), path)
    assert signer.name == "eu-1" and signer.ident.public_hex == key.public_hex
    assert signer.code_sha256 == attest.code_sha256()
    assert signer.config_sha256 == recipe_sha256(cfg)
    assert registry.lookup(store, RUN, "eu-1") == key.public_hex
    again = prepare_signer(cfg, store, RUN, "eu-1", manifest_for(cfg), path)  # no-op
    assert again.ident.public_hex == key.public_hex


def test_prepare_signer_takes_an_attestation_file(setup, tmp_path):
    cfg, store, path, _ = setup
    quote = tmp_path / "quote"
    quote.write_bytes(b"q" * 10)
    signer = prepare_signer(cfg, store, RUN, "eu-1", manifest_for(cfg), path, str(quote))
    assert signer.attestation == b"q" * 10


def test_prepare_signer_accepts_code_the_aggregator_signed_later(setup):
    cfg, store, path, _ = setup
    agg = identity.generate()
    manifest = manifest_for(cfg, code="0" * 64)
    manifest["contrib"]["aggregator_key"] = agg.public_hex
    with pytest.raises(ValueError, match="is not allowed in run"):
        prepare_signer(cfg, store, RUN, "eu-1", manifest, path)
    obj = signed_allowed_code(agg, RUN, [attest.code_sha256()])
    store.put(allowed_code_key(RUN), protocol.dumps(obj))
    assert prepare_signer(cfg, store, RUN, "eu-1", manifest, path).name == "eu-1"


def test_prepare_signer_refuses_revoked_code(setup):
    cfg, store, path, _ = setup
    agg, code = identity.generate(), attest.code_sha256()
    manifest = manifest_for(cfg)
    manifest["contrib"]["aggregator_key"] = agg.public_hex
    other = "9" * 64
    obj = signed_allowed_code(agg, RUN, [other], seq=2, revoked=[code])
    store.put(allowed_code_key(RUN), protocol.dumps(obj))
    with pytest.raises(ValueError) as e:
        prepare_signer(cfg, store, RUN, "eu-1", manifest, path)
    assert f"hash {code[:12]}) was revoked in run {RUN!r}" in str(e.value)
    assert other[:12] in str(e.value) and registry.lookup(store, RUN, "eu-1") is None
    forged = signed_allowed_code(identity.generate(), RUN, [], seq=3)  # not the aggregator's
    store.put(allowed_code_key(RUN), protocol.dumps(forged))
    assert prepare_signer(cfg, store, RUN, "eu-1", manifest, path).name == "eu-1"


def test_prepare_signer_in_an_allowlisted_run(setup):
    cfg, store, path, key = setup
    agg = identity.generate()
    manifest = manifest_for(cfg)
    others = {f"x{i}": identity.generate().public_hex for i in range(3)}
    entry = {"from_run": "rung0", "signer": agg.public_hex, "sha256": "0" * 64, "keys": others}
    manifest["contrib"].update(aggregator_key=agg.public_hex, allowlist=entry)
    for keys in ({}, {"eu-1": identity.generate().public_hex}, {"eu-2": key.public_hex}):
        store.delete(allowlist.additions_key(RUN))
        if keys:  # admitted later, but not this name with this key
            allowlist.admit(store, RUN, agg, manifest, keys)
        with pytest.raises(ValueError) as e:
            prepare_signer(cfg, store, RUN, "eu-1", manifest, path)
        text = str(e.value)
        assert f"eu-1 with key id {key.key_id} is not on its allowlist" in text, text
        assert "\n" not in text and registry.lookup(store, RUN, "eu-1") is None
    # a forged admission does not count, and the refusal names it
    forged = allowlist.signed_additions(identity.generate(), RUN, 5, {"eu-1": key.public_hex})
    store.put(allowlist.additions_key(RUN), protocol.dumps(forged))
    with pytest.raises(ValueError, match="note: .*not signed by the run's aggregator"):
        prepare_signer(cfg, store, RUN, "eu-1", manifest, path)
    store.delete(allowlist.additions_key(RUN))
    allowlist.admit(store, RUN, agg, manifest, {"eu-1": key.public_hex})
    assert prepare_signer(cfg, store, RUN, "eu-1", manifest, path).name == "eu-1"
    entry["keys"] = {"eu-3": key.public_hex}  # admitted in the manifest itself
    assert prepare_signer(cfg, store, RUN, "eu-3", manifest, path).name == "eu-3"


def refusal(setup, tmp_path, case):
    cfg, store, path, _ = setup
    manifest, key_path, attestation = manifest_for(cfg), path, ""
    if case == "no key":
        key_path = ""
    elif case == "missing key":
        key_path = str(tmp_path / "nope.key")
    elif case == "code":
        manifest = manifest_for(cfg, code="0" * 64)
    elif case == "config":
        manifest = manifest_for(cfg, config="f" * 64)
    elif case == "missing attestation":
        attestation = str(tmp_path / "nope")
    elif case == "big attestation":
        attestation = str(tmp_path / "big")
        (tmp_path / "big").write_bytes(b"x" * (attest.MAX_BLOB_BYTES + 1))
    elif case == "name taken":
        registry.register(store, RUN, "eu-1", identity.generate(), 0.0)
    with pytest.raises(ValueError) as e:
        prepare_signer(cfg, store, RUN, "eu-1", manifest, key_path, attestation)
    return str(e.value), store


@pytest.mark.parametrize(
    "case,message",
    [
        ("no key", f"run {RUN!r} takes signed contributions only: pass --key=PATH"),
        ("missing key", "does not exist"),
        ("code", "is not allowed in run"),
        ("config", f"differs from run {RUN!r}'s"),
        ("missing attestation", "--attestation="),
        ("big attestation", f"the limit is {attest.MAX_BLOB_BYTES}"),
        ("name taken", "contributor name 'eu-1' is registered to key id"),
    ],
)
def test_prepare_signer_refuses_with_one_line(setup, tmp_path, case, message):
    text, store = refusal(setup, tmp_path, case)
    assert message in text and "\n" not in text, text
    if case != "name taken":  # a start that fails does not claim the name
        assert registry.lookup(store, RUN, "eu-1") is None


def test_slot_problem(tmp_path):
    store = ObjectStore.open(str(tmp_path))
    plan = protocol.plan_shards(LIKE)
    hashes = protocol.write_version0(store, RUN, plan, LIKE)
    base = dataclasses.replace(protocol.load_version(store, RUN, 0, plan, hashes), version=2)
    me = Signer(identity.generate(), "eu-1", "a" * 64, "b" * 64)
    expect = {"run": RUN, "round": 2, "base_sha256": base.params_sha256}
    key = protocol.contrib_key(RUN, 2, "eu-1")
    assert slot_problem(store, key, me, expect) == "it vanished"
    store.put(key, b"junk")
    assert slot_problem(store, key, me, expect).startswith("it is not a contribution (")
    store.delete(key)
    delta = plan.split({"w": np.full(6, 0.1, np.float32), "b": np.float32(0.0)})
    other = Signer(identity.generate(), "eu-1", "a" * 64, "b" * 64)
    assert protocol.push_contribution(store, RUN, "eu-1", base, plan, delta, "fp32", sign=other)[0]
    signed_by_other = "it is not signed by this island's key for this round"
    assert slot_problem(store, key, me, expect) == signed_by_other
    mine = protocol.contrib_key(RUN, 2, "eu-2")
    me2 = Signer(me.ident, "eu-2", "a" * 64, "b" * 64)
    assert protocol.push_contribution(store, RUN, "eu-2", base, plan, delta, "fp32", sign=me2)[0]
    assert slot_problem(store, mine, me2, expect) == ""
    assert slot_problem(store, mine, me2, {**expect, "round": 3}) == signed_by_other
    path = tmp_path / mine
    path.write_bytes(path.read_bytes()[:-1])
    assert slot_problem(store, mine, me2, expect) == "it is not an intact object"
