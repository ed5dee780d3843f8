"""Contributor identities (ed25519 keys, key files, statements) and pluggable attestation."""

import hashlib
import os
import shutil
import stat
import sys

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa, x25519

from near_jax.contrib import attest, identity
from near_jax.contrib.identity import IdentityError
from near_jax.diloco import protocol

H = {c: c * 64 for c in "0123456789abcdef"}  # distinct valid sha256 hex strings


def fields(**over):
    f = {
        "run": "demo",
        "round": 3,
        "contributor": "alice",
        "base_sha256": H["a"],
        "payload_sha256": H["b"],
        "code_sha256": H["c"],
        "config_sha256": H["d"],
    }
    f.update(over)
    return f


def flip_hex(s: str, i: int = 0) -> str:
    """`s` with one bit of its i-th byte flipped."""
    b = bytearray(bytes.fromhex(s))
    b[i] ^= 1
    return b.hex()


@pytest.fixture(scope="module")
def alice():
    return identity.generate()


@pytest.fixture(scope="module")
def bob():
    return identity.generate()


# ---------------------------------------------------------------------------- signatures


def test_sign_verify_round_trip(alice):
    sig = alice.sign(b"hello")
    assert len(sig) == 128 and sig == sig.lower()
    assert len(alice.public_hex) == 64
    raw = bytes.fromhex(alice.public_hex)
    assert alice.key_id == hashlib.sha256(raw).hexdigest()[:16]
    assert identity.verify(alice.public_hex, b"hello", sig)
    assert identity.verify(alice.public_hex, bytearray(b"hello"), sig)
    assert alice.key_id in repr(alice) and "private" not in repr(alice).lower()


def test_verify_rejects_anything_off(alice, bob):
    msg = b"contribution bytes"
    sig, pub = alice.sign(msg), alice.public_hex
    assert identity.verify(pub, msg, sig)
    assert not identity.verify(pub, b"contribution byteS", sig)  # one bit in the message
    assert not identity.verify(pub, msg, flip_hex(sig, 0))
    assert not identity.verify(pub, msg, flip_hex(sig, 63))
    assert not identity.verify(bob.public_hex, msg, sig)
    assert not identity.verify(flip_hex(pub, 5), msg, sig)
    bad = [
        (pub, msg, "zz" * 64),
        (pub, msg, sig.upper()),
        (pub, msg, sig[:-2]),
        (pub, msg, sig + "00"),
        (pub[:-2], msg, sig),
        (pub + "00", msg, sig),
        ("x" * 64, msg, sig),
        (None, msg, sig),
        (pub, msg, None),
        (pub, "contribution bytes", sig),
        (pub, None, sig),
        (123, msg, 456),
        (bytes.fromhex(pub), msg, bytes.fromhex(sig)),
    ]
    for args in bad:
        assert identity.verify(*args) is False, args


def test_check_public_hex(alice):
    assert identity.check_public_hex(alice.public_hex) == alice.public_hex
    for s in ("A" + alice.public_hex[1:], alice.public_hex[:-1], "g" * 64, None, 7, ""):
        with pytest.raises(IdentityError, match="64 lowercase hex"):
            identity.check_public_hex(s)


# ---------------------------------------------------------------------------- statements


def test_statement_is_canonical(alice):
    f = fields()
    reordered = dict(reversed(list(f.items())))
    assert list(reordered) != list(f)
    data = identity.statement_bytes(f)
    assert data == identity.statement_bytes(reordered)
    assert data.startswith(b"near_jax/contribution/v1\n")
    assert data == b"near_jax/contribution/v1\n" + protocol.dumps(f)
    sig = identity.sign_statement(alice, f)
    assert identity.verify_statement(alice.public_hex, reordered, sig)
    # Every field is covered by the signature.
    for k, v in [("run", "other"), ("round", 4), ("contributor", "bob")] + [
        (k, H["e"]) for k in identity.STATEMENT_FIELDS if k.endswith("_sha256")
    ]:
        assert not identity.verify_statement(alice.public_hex, fields(**{k: v}), sig), k
    # A statement signature is not a signature of the bare JSON (domain separation).
    assert not identity.verify(alice.public_hex, protocol.dumps(f), sig)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda f: f.pop("payload_sha256"), "lacks payload_sha256"),
        (lambda f: f.update(extra="x"), "unknown fields 'extra'"),
        (lambda f: f.update(round=True), "round must be an int"),
        (lambda f: f.update(round=-1), "round must be an int"),
        (lambda f: f.update(round="3"), "round must be an int"),
        (lambda f: f.update(round=3.0), "round must be an int"),
        (lambda f: f.update(run=5), "run must be a str"),
        (lambda f: f.update(contributor=None), "contributor must be a str"),
        (lambda f: f.update(base_sha256=H["a"].upper()), "base_sha256 must be 64"),
        (lambda f: f.update(code_sha256=H["a"][:-1]), "code_sha256 must be 64"),
        (lambda f: f.update(config_sha256=b"\0" * 32), "config_sha256 must be 64"),
    ],
)
def test_statement_rejects_bad_fields(alice, mutate, match):
    f = fields()
    sig = identity.sign_statement(alice, f)
    mutate(f)
    with pytest.raises(IdentityError, match=match):
        identity.statement_bytes(f)
    with pytest.raises(IdentityError):
        identity.sign_statement(alice, f)
    assert identity.verify_statement(alice.public_hex, f, sig) is False


def test_statement_rejects_non_dict(alice):
    with pytest.raises(IdentityError, match="must be a dict"):
        identity.statement_bytes(list(fields().items()))
    assert identity.verify_statement(alice.public_hex, None, "00" * 64) is False


# ----------------------------------------------------------------------------- key files


def test_save_load_round_trip(tmp_path, alice, bob):
    path = tmp_path / "alice.key"
    identity.save(alice, path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    pub = tmp_path / "alice.key.pub"
    assert pub.read_text() == alice.public_hex + "\n"
    assert stat.S_IMODE(os.stat(pub).st_mode) == 0o644
    loaded = identity.load(path)
    assert loaded.public_hex == alice.public_hex
    assert identity.verify(alice.public_hex, b"m", loaded.sign(b"m"))
    assert sorted(os.listdir(tmp_path)) == ["alice.key", "alice.key.pub"]  # no temp files

    with pytest.raises(IdentityError, match="exists; refusing to overwrite a key"):
        identity.save(bob, path)
    assert identity.load(path).public_hex == alice.public_hex
    assert pub.read_text() == alice.public_hex + "\n"

    identity.save(bob, path, overwrite=True)
    assert identity.load(path).public_hex == bob.public_hex
    assert pub.read_text() == bob.public_hex + "\n"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["alice.key", "alice.key.pub"]


def test_save_into_missing_directory(tmp_path, alice):
    with pytest.raises(IdentityError, match="cannot write"):
        identity.save(alice, tmp_path / "nope" / "k.key")


def _pem(key, encryption=None):
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        encryption or serialization.NoEncryption(),
    )


def test_load_errors(tmp_path, alice):
    with pytest.raises(IdentityError, match="does not exist"):
        identity.load(tmp_path / "missing.key")
    with pytest.raises(IdentityError, match="cannot read"):
        identity.load(tmp_path)  # a directory

    cases = {
        "garbage": (os.urandom(200), "not a PEM file"),
        "rsa": (_pem(rsa.generate_private_key(65537, 1024)), "RSA private key"),
        "x25519": (_pem(x25519.X25519PrivateKey.generate()), "X25519 private key"),
        "encrypted": (
            _pem(alice.private_key, serialization.BestAvailableEncryption(b"pw")),
            "encrypted key",
        ),
        "public": (
            alice.private_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
            "public key",
        ),
        "mangled": (
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            "not a usable private key",
        ),
    }
    for name, (data, match) in cases.items():
        path = tmp_path / f"{name}.pem"
        path.write_bytes(data)
        with pytest.raises(IdentityError, match=match) as e:
            identity.load(path)
        assert "\n" not in str(e.value), name
        assert str(path) in str(e.value), name


# ---------------------------------------------------------------------------- code hash


def _manual_tree_hash(files: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for rel in sorted(files):
        data = files[rel]
        h.update(rel.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
    return h.hexdigest()


def test_code_sha256_of_a_small_tree(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__pycache__").mkdir()
    (pkg / "a.py").write_bytes(b"x = 1\n")
    (pkg / "sub" / "t.jsonl").write_bytes(b'{"a": 1}\n')
    (pkg / "sub" / "notes.txt").write_bytes(b"ignored")
    (pkg / "__pycache__" / "a.py").write_bytes(b"ignored")
    expected = _manual_tree_hash({"a.py": b"x = 1\n", "sub/t.jsonl": b'{"a": 1}\n'})
    assert attest.code_sha256(str(pkg)) == expected
    # Moving bytes between files changes the hash although the concatenation is the same.
    (pkg / "a.py").write_bytes(b"x = 1\n{")
    (pkg / "sub" / "t.jsonl").write_bytes(b'"a": 1}\n')
    assert attest.code_sha256(str(pkg)) != expected
    with pytest.raises(ValueError, match="not a directory"):
        attest.code_sha256(str(tmp_path / "missing"))


def test_code_sha256_of_a_copied_package(tmp_path):
    import near_jax

    src = os.path.dirname(near_jax.__file__)
    copy = tmp_path / "near_jax"
    shutil.copytree(src, copy, ignore=shutil.ignore_patterns("__pycache__"))
    default = attest.code_sha256()
    assert len(default) == 64
    assert attest.code_sha256(str(copy)) == default
    assert attest.code_sha256(str(copy)) == default  # stable
    (copy / "README.txt").write_text("not code")
    assert attest.code_sha256(str(copy)) == default
    with open(copy / "diloco" / "protocol" / "keys.py", "a") as f:
        f.write("\n# changed\n")
    changed = attest.code_sha256(str(copy))
    assert changed != default
    os.rename(copy / "diloco" / "protocol" / "keys.py", copy / "diloco" / "protocol" / "keys2.py")
    assert attest.code_sha256(str(copy)) not in (default, changed)


def test_config_sha256_is_order_independent():
    a = attest.config_sha256({"lr": 0.7, "h": 100, "spec": {"kind": "int8"}})
    b = attest.config_sha256({"spec": {"kind": "int8"}, "h": 100, "lr": 0.7})
    assert a == b and len(a) == 64
    assert attest.config_sha256({"lr": 0.7, "h": 101, "spec": {"kind": "int8"}}) != a


# ----------------------------------------------------------------------------- verifiers


def claim(**over) -> attest.Claim:
    return attest.Claim(**fields(**over))


def test_claim_statement_matches_identity():
    c = claim()
    assert set(c.fields) == set(identity.STATEMENT_FIELDS)
    assert c.statement == identity.statement_bytes(fields())
    with pytest.raises(IdentityError):
        _ = claim(round=-1).statement


def test_code_hash_verifier():
    v = attest.CodeHashVerifier(frozenset({H["c"], H["9"]}), H["d"])
    assert v(claim(), b"") is None
    assert v(claim(code_sha256=H["9"]), b"ignored") is None
    reason = v(claim(code_sha256=H["e"]), b"")
    assert reason == (
        f"code hash {H['e'][:12]} is not allowed for this run "
        f"(allowed: {H['9'][:12]}, {H['c'][:12]})"
    )
    reason = v(claim(config_sha256=H["f"]), b"")
    assert reason == f"config hash {H['f'][:12]} differs from the run's {H['d'][:12]}"
    assert "allowed: none" in attest.CodeHashVerifier(frozenset(), H["d"])(claim(), b"")
    with pytest.raises(TypeError):
        attest.CodeHashVerifier(H["c"], H["d"])


VERIFIER_MODULE = """
class Quote:
    def __init__(self, allowed_code, config_sha256):
        self.allowed_code, self.config_sha256 = allowed_code, config_sha256

    def __call__(self, claim, blob):
        if blob != b"quote:" + claim.code_sha256.encode():
            return "quote does not bind the code hash"
        return None if claim.code_sha256 in self.allowed_code else "code not allowed"


def make(allowed_code, config_sha256):
    return Quote(allowed_code, config_sha256)


def not_callable(allowed_code, config_sha256):
    return 42


def explodes(allowed_code, config_sha256):
    raise RuntimeError("no collateral")
"""


def test_load_verifier(tmp_path, monkeypatch):
    for spec in ("", "code_hash", "  code_hash "):
        v = attest.load_verifier(spec, allowed_code=[H["c"]], config_sha256=H["d"])
        assert isinstance(v, attest.CodeHashVerifier)
        assert v.allowed_code == frozenset({H["c"]}) and v(claim(), b"") is None

    module = f"tee_verifier_{os.getpid()}_{tmp_path.name}".replace("-", "_")
    (tmp_path / f"{module}.py").write_text(VERIFIER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module, raising=False)
    v = attest.load_verifier(f"{module}:make", allowed_code={H["c"]}, config_sha256=H["d"])
    assert v.allowed_code == frozenset({H["c"]}) and v.config_sha256 == H["d"]
    assert attest.check(v, claim(), b"quote:" + H["c"].encode()) is None
    assert attest.check(v, claim(), b"quote:" + H["e"].encode()) == (
        "quote does not bind the code hash"
    )

    bad = {
        "nocolon": "expected 'code_hash'",
        "a:b:c": "expected 'code_hash'",
        "../evil:make": "expected 'code_hash'",
        "no_such_module_near_jax_xyz:make": "cannot import no_such_module_near_jax_xyz",
        f"{module}:missing": "has no callable 'missing'",
        f"{module}:not_callable": "factory returned a int",
        f"{module}:explodes": "factory raised RuntimeError: no collateral",
    }
    for spec, match in bad.items():
        with pytest.raises(ValueError, match=match) as e:
            attest.load_verifier(spec, allowed_code=[H["c"]], config_sha256=H["d"])
        assert spec in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="not one str"):
        attest.load_verifier("", allowed_code=H["c"], config_sha256=H["d"])


def test_check_never_raises():
    calls = []

    def ok(c, blob):
        calls.append(len(blob))
        return None

    def boom(c, blob):
        raise RuntimeError("bad\nquote")

    assert attest.check(ok, claim(), b"x" * attest.MAX_BLOB_BYTES) is None
    n = attest.MAX_BLOB_BYTES + 1
    assert attest.check(ok, claim(), b"x" * n) == f"attestation blob of {n} bytes exceeds 65536"
    assert calls == [attest.MAX_BLOB_BYTES]  # the oversized blob never reached the verifier
    assert attest.check(boom, claim(), b"") == "attestation verifier raised RuntimeError: bad quote"
    assert attest.check(lambda c, b: 1 / 0, claim(), b"").startswith(
        "attestation verifier raised ZeroDivisionError"
    )
    assert "not None or a reason" in attest.check(lambda c, b: False, claim(), b"")
    assert "no reason given" in attest.check(lambda c, b: "  ", claim(), b"")
    assert attest.check(lambda c, b: "line one\nline two", claim(), b"") == "line one line two"
    assert "not bytes" in attest.check(ok, claim(), "a str blob")
