"""The run's key registry (`near_jax.contrib.registry`): first come, first served names,
self-signed entries, and a tampered registry that never yields a key.
"""

import pytest

from near_jax.contrib import identity, registry
from near_jax.contrib.identity import IdentityError
from near_jax.diloco import protocol
from near_jax.diloco.store import ObjectStore


@pytest.fixture(scope="module")
def alice():
    return identity.generate()


@pytest.fixture(scope="module")
def bob():
    return identity.generate()


@pytest.fixture
def store(tmp_path):
    return ObjectStore.open(str(tmp_path))


def test_register_and_lookup(store, alice, bob):
    assert registry.lookup(store, "demo", "alice") is None
    assert registry.register(store, "demo", "alice", alice, now=100.0) is True
    assert registry.register(store, "demo", "alice", alice, now=200.0) is False  # idempotent
    with pytest.raises(IdentityError, match=f"registered to key id {alice.key_id}; choose"):
        registry.register(store, "demo", "alice", bob, now=300.0)
    assert registry.lookup(store, "demo", "alice") == alice.public_hex
    assert registry.register(store, "demo", "bob", bob, now=300.0) is True
    # Names are per run.
    assert registry.lookup(store, "other", "alice") is None
    assert registry.register(store, "other", "alice", bob, now=1.0) is True
    assert registry.registry(store, "demo") == {"alice": alice.public_hex, "bob": bob.public_hex}
    assert registry.registry_problems(store, "demo") == []
    entry = protocol.read_json(store, "demo/registry/alice")
    assert entry["registered_at"] == 100.0 and entry["key_id"] == alice.key_id


def test_register_rejects_bad_names(store, alice):
    for run, name in [("demo", "../x"), ("demo", ""), ("demo", "a/b"), ("bad run", "alice")]:
        with pytest.raises(IdentityError, match="bad (run|contributor) name"):
            registry.register(store, run, name, alice, now=1.0)
    with pytest.raises(IdentityError, match="finite"):
        registry.register(store, "demo", "alice", alice, now=float("nan"))
    assert store.list("demo/") == []


def test_tampered_registry_never_yields_a_key(store, alice, bob):
    registry.register(store, "demo", "alice", alice, now=1.0)
    registry.register(store, "demo", "bob", bob, now=1.0)
    registry.register(store, "demo", "carol", identity.generate(), now=1.0)
    good = protocol.read_json(store, "demo/registry/alice")

    # Swap in another public key (with a consistent key id): the self-signature fails.
    swapped = dict(good, public_key=bob.public_hex, key_id=bob.key_id)
    store.put("demo/registry/alice", protocol.dumps(swapped))
    with pytest.raises(IdentityError, match="demo/registry/alice.*signature that does not verify"):
        registry.lookup(store, "demo", "alice")

    # Bob's genuine entry copied under another name is mis-filed.
    store.put("demo/registry/bob2", store.get("demo/registry/bob"))
    with pytest.raises(IdentityError, match="filed as 'bob2'"):
        registry.lookup(store, "demo", "bob2")

    # Not JSON, wrong fields, a key id that lies.
    store.put("demo/registry/dave", b"not json")
    bad_id = protocol.read_json(store, "demo/registry/carol")
    store.put("demo/registry/carol", protocol.dumps(dict(bad_id, key_id="0" * 16)))
    store.put("demo/registry/eve", protocol.dumps({"name": "eve"}))
    for name, match in [("dave", "not JSON"), ("carol", "key id"), ("eve", "has fields")]:
        with pytest.raises(IdentityError, match=match):
            registry.lookup(store, "demo", name)

    assert registry.registry(store, "demo") == {"bob": bob.public_hex}
    problems = registry.registry_problems(store, "demo")
    assert len(problems) == 5
    for name in ("alice", "bob2", "carol", "dave", "eve"):
        assert (
            sum(f"demo/registry/{name} " in p or f"demo/registry/{name}:" in p for p in problems)
            == 1
        ), name
    assert all("\n" not in p for p in problems)
    # A tampered name cannot be re-registered either: it stays unusable, not silently taken.
    with pytest.raises(IdentityError, match="signature that does not verify"):
        registry.register(store, "demo", "alice", bob, now=2.0)
