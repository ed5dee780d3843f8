"""Contributor identities: ed25519 keys, key files, signed contribution statements.

Contributors (islands) do not trust each other or the aggregator's store: every contribution
carries an ed25519 signature by its contributor over a *statement* naming exactly what was
contributed, and the run's *registry* (`near_jax.contrib.registry`) maps contributor names to
public keys.

Key file
--------
`save` writes the private key as an unencrypted PKCS8 PEM file ("-----BEGIN PRIVATE KEY-----")
with mode 0600, atomically (a 0600 temp file in the same directory, fsync, then a hard link or
rename into place), and never replaces an existing key unless asked to. Next to it, `PATH.pub`
holds the public key as 64 lowercase hex characters (the raw 32-byte key) and a newline, mode
0644: that is what a contributor hands out. `load` accepts only an unencrypted ed25519 private
key and says what it found otherwise (a public key, an RSA key, an encrypted key, ...).

A key's `key_id` is the first 16 hex characters of sha256(raw public key): short enough for
messages and logs, long enough that nobody can make a second key with the same id.

Statement
---------
A contribution is signed over

    b"near_jax/contribution/v1\\n" + canonical JSON of the STATEMENT_FIELDS

(`protocol.dumps`: sorted keys, no whitespace): run, round (an int >= 0), contributor, and the
sha256 (64 lowercase hex) of the base version, of the payload, of the code and of the run's
config. The domain prefix keeps a contribution signature from ever being valid for another
kind of message (a registration, a future format), and the canonical form makes the signed
bytes independent of how a dict happened to be ordered.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dh, dsa, ec, ed448, rsa, x448, x25519
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from near_jax._io import atomic_write, one_line, short_repr
from near_jax.diloco import protocol

STATEMENT_DOMAIN = b"near_jax/contribution/v1\n"
STATEMENT_FIELDS = (
    "run",
    "round",
    "contributor",
    "base_sha256",
    "payload_sha256",
    "code_sha256",
    "config_sha256",
)
MAX_KEY_FILE_BYTES = 1 << 16

_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX128 = re.compile(r"[0-9a-f]{128}")
_PEM_LABEL = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")


class IdentityError(Exception):
    """A key, statement or registry entry is unusable; one line saying what and what is allowed."""


# ------------------------------------------------------------------------------- identity


@dataclasses.dataclass(frozen=True)
class Identity:
    """A contributor's ed25519 private key."""

    private_key: Ed25519PrivateKey

    def __post_init__(self) -> None:
        if not isinstance(self.private_key, Ed25519PrivateKey):
            raise IdentityError(
                f"Identity needs an Ed25519PrivateKey, got {type(self.private_key).__name__}"
            )

    def __repr__(self) -> str:  # logs need which key, never the key object itself
        return f"Identity(key_id={self.key_id})"

    @property
    def public_hex(self) -> str:
        """The raw 32-byte public key as 64 lowercase hex characters."""
        raw = self.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return raw.hex()

    @property
    def key_id(self) -> str:
        """First 16 hex characters of sha256(raw public key)."""
        return key_id(self.public_hex)

    def sign(self, message: bytes) -> str:
        """The ed25519 signature of `message` as 128 lowercase hex characters."""
        return self.private_key.sign(bytes(message)).hex()


def key_id(public_hex: str) -> str:
    """The key id of a public key given as 64 hex characters."""
    return hashlib.sha256(bytes.fromhex(public_hex)).hexdigest()[:16]


def generate() -> Identity:
    """A fresh random identity."""
    return Identity(Ed25519PrivateKey.generate())


def verify(public_hex: str, message: bytes, signature_hex: str) -> bool:
    """Whether `signature_hex` is `public_hex`'s signature of `message`; False (never an
    exception) for anything malformed: wrong types, non-hex, wrong lengths, invalid keys."""
    try:
        if not isinstance(message, (bytes, bytearray)):
            return False
        if not (isinstance(public_hex, str) and _HEX64.fullmatch(public_hex)):
            return False
        if not (isinstance(signature_hex, str) and _HEX128.fullmatch(signature_hex)):
            return False
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_hex))
        key.verify(bytes.fromhex(signature_hex), bytes(message))
        return True
    except Exception:  # noqa: BLE001 - InvalidSignature, or a key OpenSSL refuses
        return False


def check_public_hex(s: Any) -> str:
    """`s` if it is 64 lowercase hex characters that load as an ed25519 public key."""
    if not isinstance(s, str) or not _HEX64.fullmatch(s):
        raise IdentityError(f"bad public key {short_repr(s)}: expected 64 lowercase hex characters")
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(s))
    except ValueError as e:
        raise IdentityError(
            f"public key {s[:16]}... is not an ed25519 key: {one_line(e)}"
        ) from None
    return s


# ------------------------------------------------------------------------------- key files


def save(identity: Identity, path: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Writes the private key to `path` (PKCS8 PEM, 0600) and its public hex to `path`.pub."""
    path = os.fspath(path)
    if not overwrite and os.path.lexists(path):
        raise IdentityError(
            f"{path} exists; refusing to overwrite a key (pass --force to replace it, "
            "or choose another path)"
        )
    pem = identity.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_atomic(path, pem, 0o600, overwrite=overwrite)
    # The .pub is derived from the key just written, so replacing a stale one is always right.
    _write_atomic(path + ".pub", (identity.public_hex + "\n").encode(), 0o644, overwrite=True)


def load(path: str | os.PathLike) -> Identity:
    """The identity in key file `path`; IdentityError unless it holds an unencrypted ed25519
    private key in PEM."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEY_FILE_BYTES + 1)
    except FileNotFoundError:
        raise IdentityError(f"key file {path} does not exist (create one first)") from None
    except OSError as e:
        raise IdentityError(f"cannot read key file {path}: {e.strerror or e}") from None
    expected = "expected an unencrypted PKCS8 ed25519 private key in PEM"
    if len(data) > MAX_KEY_FILE_BYTES:
        raise IdentityError(f"{path} is over {MAX_KEY_FILE_BYTES} bytes, not a key; {expected}")
    label = _PEM_LABEL.search(data)
    if label is None:
        raise IdentityError(f"{path} is not a PEM file; {expected}")
    kind = label.group(1).decode()
    if "ENCRYPTED" in kind:
        raise IdentityError(f"{path} holds an encrypted key; {expected}")
    if "PUBLIC KEY" in kind:
        raise IdentityError(f"{path} holds a public key ({kind}), not a private key; {expected}")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:  # cryptography's signal for a password-protected (legacy PEM) key
        raise IdentityError(f"{path} holds an encrypted key; {expected}") from None
    except (ValueError, UnsupportedAlgorithm) as e:
        raise IdentityError(
            f"{path} is not a usable private key (PEM {kind!r}: {one_line(e)}); {expected}"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityError(f"{path} holds {_describe_key(key)}; {expected}")
    return Identity(key)


def _describe_key(key: Any) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        return f"an RSA private key ({key.key_size} bits)"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return f"an EC private key (curve {key.curve.name})"
    if isinstance(key, dsa.DSAPrivateKey):
        return "a DSA private key"
    if isinstance(key, x25519.X25519PrivateKey):
        return "an X25519 private key (key agreement, not signatures)"
    if isinstance(key, x448.X448PrivateKey):
        return "an X448 private key (key agreement, not signatures)"
    if isinstance(key, ed448.Ed448PrivateKey):
        return "an Ed448 private key"
    if isinstance(key, dh.DHPrivateKey):
        return "a Diffie-Hellman private key"
    return f"a {type(key).__name__}"


def _write_atomic(path: str, data: bytes, mode: int, *, overwrite: bool) -> None:
    """Writes `path` so that it appears complete or not at all, with `mode` from the start
    (a key must never sit world-readable, even briefly)."""
    try:
        atomic_write(path, data, mode=mode, overwrite=overwrite)
    except FileExistsError:  # only without `overwrite`: a key created since save's check
        raise IdentityError(
            f"{path} exists; refusing to overwrite a key (pass --force to replace it)"
        ) from None
    except OSError as e:
        raise IdentityError(f"cannot write {path}: {e.strerror or e}") from None


# ------------------------------------------------------------------------------ statements


def statement_bytes(fields: dict) -> bytes:
    """The signed bytes of a contribution statement; IdentityError on a missing, unknown or
    mis-typed field (see the module docstring)."""
    if not isinstance(fields, dict):
        raise IdentityError(f"statement must be a dict, got {type(fields).__name__}")
    missing = [k for k in STATEMENT_FIELDS if k not in fields]
    if missing:
        raise IdentityError(
            f"statement lacks {', '.join(missing)}; fields: {', '.join(STATEMENT_FIELDS)}"
        )
    extra = sorted(repr(k) for k in fields if k not in STATEMENT_FIELDS)
    if extra:
        allowed = ", ".join(STATEMENT_FIELDS)
        raise IdentityError(f"statement has unknown fields {', '.join(extra)}; fields: {allowed}")
    rnd = fields["round"]
    if isinstance(rnd, bool) or not isinstance(rnd, int) or rnd < 0:
        raise IdentityError(f"statement round must be an int >= 0, got {rnd!r}")
    for k in ("run", "contributor"):
        if not isinstance(fields[k], str):
            raise IdentityError(f"statement {k} must be a str, got {type(fields[k]).__name__}")
    for k in STATEMENT_FIELDS:
        if k.endswith("_sha256"):
            v = fields[k]
            if not isinstance(v, str) or not _HEX64.fullmatch(v):
                raise IdentityError(
                    f"statement {k} must be 64 lowercase hex characters, got {short_repr(v)}"
                )
    return STATEMENT_DOMAIN + protocol.dumps({k: fields[k] for k in STATEMENT_FIELDS})


def sign_statement(identity: Identity, fields: dict) -> str:
    """`identity`'s signature (128 hex) of the statement `fields`."""
    return identity.sign(statement_bytes(fields))


def verify_statement(public_hex: str, fields: dict, signature_hex: str) -> bool:
    """Whether `signature_hex` signs statement `fields` under `public_hex`; False (never an
    exception) when anything, the fields included, is malformed."""
    try:
        message = statement_bytes(fields)
    except Exception:  # noqa: BLE001 - untrusted input: any defect is just "not valid"
        return False
    return verify(public_hex, message, signature_hex)
