"""API keys (`near_jax.serve.keys`): the keys file, secret lookup, exact request costs."""

import hashlib
import json
import math
import os
import random
import stat
from fractions import Fraction

import pytest

from near_jax.serve.keys import (
    ANONYMOUS,
    ApiKey,
    KeyRing,
    KeysFileError,
    add_key,
    request_cost,
    secret_sha256,
)

HASH_A = "a" * 64
HASH_B = "b" * 64


def key_entry(**over):
    entry = {
        "name": "alice",
        "sha256": HASH_A,
        "prompt_price": 100_000,
        "completion_price": 300_000,
        "limit": 5_000_000,
    }
    entry.update(over)
    return entry


def write(tmp_path, obj) -> str:
    path = tmp_path / "keys.json"
    if isinstance(obj, bytes):
        path.write_bytes(obj)  # not UTF-8
    else:
        path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)


def test_add_key_then_load_round_trips(tmp_path):
    path = str(tmp_path / "keys.json")
    alice = add_key(path, "alice", 100_000, 300_000, 5_000_000)
    bob = add_key(path, "bob.2", 7, 0, None)
    assert alice.startswith("nj-") and len(alice) == 3 + 43 and alice != bob
    ring = KeyRing.load(path)
    assert not ring.is_open
    assert ring.keys == (
        ApiKey("alice", secret_sha256(alice), 100_000, 300_000, 5_000_000),
        ApiKey("bob.2", secret_sha256(bob), 7, 0, None),
    )
    assert secret_sha256(alice) == hashlib.sha256(alice.encode()).hexdigest()
    assert ring.lookup(alice).name == "alice" and ring.lookup(bob).name == "bob.2"
    for wrong in (alice[:-1], alice + "x", bob.upper(), "", None, secret_sha256(alice), 5):
        assert ring.lookup(wrong) is None
    assert ring.by_name("bob.2").limit is None and ring.by_name("carol") is None
    # secrets are never written; the file is the documented format, owner-only
    text = open(path).read()
    assert alice not in text and bob not in text and alice[3:20] not in text
    assert json.loads(text)["format"] == 1 and len(json.loads(text)["keys"]) == 2
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert [p for p in os.listdir(tmp_path) if p != "keys.json"] == []  # no temporary left
    # re-adding a name replaces its key: the old secret stops working
    alice2 = add_key(path, "alice", 1, 2, 3)
    ring = KeyRing.load(path)
    assert ring.lookup(alice) is None and ring.lookup(alice2) == ApiKey(
        "alice", secret_sha256(alice2), 1, 2, 3
    )
    assert [k.name for k in ring.keys] == ["bob.2", "alice"]


def test_add_key_refuses_bad_values_and_keeps_the_file(tmp_path):
    path = str(tmp_path / "keys.json")
    add_key(path, "alice")
    before = open(path).read()
    for kwargs, match in [
        ({"name": "-x"}, "bad key name"),
        ({"name": ANONYMOUS}, "reserved"),
        ({"name": "a" * 65}, "bad key name"),
        ({"name": "b", "prompt_price": -1}, "prompt_price is -1; allowed: an integer 0.."),
        ({"name": "b", "completion_price": 1.5}, "completion_price is 1.5"),
        ({"name": "b", "limit": True}, f"limit is True; allowed: an integer 0..{10**18} or null"),
    ]:
        with pytest.raises(KeysFileError, match=match):
            add_key(path, **kwargs)
    assert open(path).read() == before
    write(tmp_path, "{")
    with pytest.raises(KeysFileError, match="not JSON"):
        add_key(path, "bob")  # a malformed file is never overwritten


def test_open_keyring_is_one_free_anonymous_key():
    ring = KeyRing.open()
    assert ring.is_open
    for secret in (None, "", "anything", "nj-x"):
        key = ring.lookup(secret)
        assert key.name == ANONYMOUS and key.prompt_price == key.completion_price == 0
        assert key.limit is None
    assert request_cost(10**6, 10**6, ring.lookup(None)) == 0


def test_empty_keys_list_accepts_no_one(tmp_path):
    ring = KeyRing.load(write(tmp_path, {"format": 1, "keys": []}))
    assert ring.keys == () and not ring.is_open and ring.lookup("nj-x") is None


MALFORMED = [
    ("[]", "keys file .*: must be a JSON object, got list"),
    ("{", "keys file .* is not JSON: Expecting property name"),
    (b'{"format": 1, "keys": ["\xff"]}', "is not JSON"),
    ({"keys": []}, r"unknown fields \[\], missing \['format'\]; allowed: format, keys"),
    ({"format": 1, "keys": [], "x": 1}, r"unknown fields \['x'\]"),
    ({"format": 2, "keys": []}, "format is 2, expected 1"),
    ({"format": True, "keys": []}, "format is True, expected 1"),
    ({"format": 1, "keys": {}}, "keys must be a list, got dict"),
    ({"format": 1, "keys": ["x"]}, "key 0: must be a JSON object, got str"),
    (
        {"format": 1, "keys": [{**key_entry(), "extra": 1}]},
        r"key 0 \('alice'\): unknown fields \['extra'\], missing \[\]; allowed: name, sha256",
    ),
    (
        {"format": 1, "keys": [{k: v for k, v in key_entry().items() if k != "limit"}]},
        r"key 0 \('alice'\): unknown fields \[\], missing \['limit'\]",
    ),
    ({"format": 1, "keys": [key_entry(name="")]}, "key 0 \\(''\\): name: bad key name ''"),
    ({"format": 1, "keys": [key_entry(name=3)]}, "key 0: name: bad key name 3"),
    ({"format": 1, "keys": [key_entry(name="a b")]}, "name: bad key name 'a b': 1-64 of"),
    ({"format": 1, "keys": [key_entry(name=ANONYMOUS)]}, "name 'anonymous' is reserved"),
    (
        {"format": 1, "keys": [key_entry(sha256="A" * 64)]},
        r"key 0 \('alice'\): sha256 is 'AAAA.*; allowed: 64 lowercase hex digits",
    ),
    ({"format": 1, "keys": [key_entry(sha256="a" * 63)]}, "sha256 is 'aaa.*; allowed: 64"),
    ({"format": 1, "keys": [key_entry(sha256="g" * 64)]}, "sha256 is 'ggg"),
    ({"format": 1, "keys": [key_entry(sha256=None)]}, "sha256 is None"),
    (
        {"format": 1, "keys": [key_entry(prompt_price=-1)]},
        r"key 0 \('alice'\): prompt_price is -1; allowed: an integer 0..1000000000000000$",
    ),
    ({"format": 1, "keys": [key_entry(prompt_price=1.0)]}, "prompt_price is 1.0; allowed"),
    ({"format": 1, "keys": [key_entry(prompt_price="1")]}, "prompt_price is '1'; allowed"),
    ({"format": 1, "keys": [key_entry(completion_price=False)]}, "completion_price is False"),
    ({"format": 1, "keys": [key_entry(completion_price=10**16)]}, "completion_price is 1000"),
    ({"format": 1, "keys": [key_entry(limit=-5)]}, "limit is -5; allowed: .* or null"),
    ({"format": 1, "keys": [key_entry(limit=2.5)]}, "limit is 2.5"),
    (
        {"format": 1, "keys": [key_entry(), key_entry(sha256=HASH_B)]},
        r"key 1 \('alice'\): name is also key 0's; names are unique",
    ),
    (
        {"format": 1, "keys": [key_entry(), key_entry(name="bob")]},
        r"key 1 \('bob'\): sha256 is also key 0's",
    ),
    ('{"format": 1, "keys": [], "format": 1}', "field 'format' appears twice"),
]


@pytest.mark.parametrize("content,match", MALFORMED)
def test_malformed_keys_file_gives_one_line_naming_the_field(tmp_path, content, match):
    path = write(tmp_path, content)
    with pytest.raises(KeysFileError, match=match) as info:
        KeyRing.load(path)
    assert "\n" not in str(info.value)
    assert path in str(info.value)


def test_missing_or_oversized_keys_file(tmp_path):
    with pytest.raises(KeysFileError, match="cannot read keys file .*nope.json"):
        KeyRing.load(str(tmp_path / "nope.json"))
    path = tmp_path / "big.json"
    path.write_bytes(b" " * ((16 << 20) + 1))
    with pytest.raises(KeysFileError, match="is over"):
        KeyRing.load(str(path))


def test_request_cost_is_the_exact_ceiling():
    rng = random.Random(0)
    key = ApiKey("k", HASH_A, 3, 7, None)
    assert request_cost(0, 0, key) == 0
    assert request_cost(1, 0, key) == 1  # 3e-6 micro-units still costs one
    assert request_cost(333_333, 0, key) == 1 and request_cost(333_334, 0, key) == 2
    for _ in range(2000):
        pp, cp = rng.choice([0, 1, 999_999, 10**15]), rng.randrange(10**15 + 1)
        if rng.random() < 0.5:
            pp, cp = rng.randrange(10**7), rng.randrange(10**7)
        key = ApiKey("k", HASH_A, pp, cp, None)
        p, c = rng.randrange(1 << 40), rng.randrange(1 << 20)
        exact = math.ceil(Fraction(p * pp + c * cp, 1_000_000))
        assert request_cost(p, c, key) == exact
        assert isinstance(request_cost(p, c, key), int)
    for bad in (-1, 1.0, True, None, "3"):
        with pytest.raises(ValueError, match="must be an int >= 0"):
            request_cost(bad, 0, key)
        with pytest.raises(ValueError, match="completion_tokens"):
            request_cost(0, bad, key)
