"""Contributor identities (`near_jax.contrib.identity`): ed25519 keys, key files, statements."""

import hashlib
import os
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa, x25519
from helpers import H
from helpers import statement_fields as fields

from near_jax.contrib import identity
from near_jax.contrib.identity import IdentityError
from near_jax.diloco import protocol


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
