"""Pluggable attestation of contributions: code/config hashes now, TEE quotes when available.

A contribution's signed statement (`identity.statement_bytes`) names the sha256 of the code
that produced it (`code_sha256`: the near_jax package source) and of the run's config
(`config_sha256`). A signature only proves *who* claims that; whether the claim is believable
is the verifier's business. The aggregator calls `check(verifier, claim, blob)` for every
contribution, where `claim` is the contribution's signed `Claim` and `blob` its attestation
bytes (at most MAX_BLOB_BYTES; empty when the contributor sent none).

The verifier interface
----------------------
A verifier is any callable

    verifier(claim: Claim, blob: bytes) -> str | None

returning None to accept and a one-line reason to reject. `check` enforces the size limit
and turns anything a verifier raises into a rejection, so a broken verifier or a hostile blob
never crashes the aggregator. `load_verifier(spec, allowed_code=..., config_sha256=...)`
builds one from a command-line spec:

    "" or "code_hash"        CodeHashVerifier: the signed code hash must be one of the run's
                             allowed hashes and the config hash the run's. It ignores the
                             blob, so it only catches honest mistakes (stale code, another
                             config): a dishonest contributor can sign any hash it likes.
    "package.module:factory" factory(allowed_code=frozenset[str], config_sha256=str) must
                             return the verifier.

A real verifier for a trusted execution environment (Intel TDX, AMD SEV-SNP, NVIDIA
confidential computing) gets the hardware quote as the blob and must

  1. parse the quote and verify its signature up the vendor's certificate chain (Intel
     PCS / DCAP collateral, AMD VCEK/ASK/ARK, NVIDIA's attestation service), checking
     revocation and that the TCB status is acceptable (up to date, no debug mode);
  2. check that the quote's report data binds this contribution: it must contain
     sha256(claim.statement), so a quote cannot be replayed for another contribution, round
     or payload;
  3. check that the measured code (the TD/VM measurement, or a runtime measurement of the
     near_jax package) corresponds to a hash in `allowed_code` and equals claim.code_sha256,
     and that claim.config_sha256 is the run's config hash;

and return a one-line reason for the first check that fails. The verifier should be fast
and offline (cache collateral): it runs once per contribution inside the aggregator's round.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import os
import re
from collections.abc import Iterable
from typing import Protocol

import near_jax
from near_jax._io import one_line
from near_jax.contrib import identity
from near_jax.diloco import protocol

MAX_BLOB_BYTES = 64 * 1024
_SPEC = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*")
_CODE_SUFFIXES = (".py", ".jsonl")
_SPEC_HELP = "'code_hash' (the default, also '') or 'package.module:factory'"


# ---------------------------------------------------------------------------------- hashes


def code_sha256(package_dir: str | None = None) -> str:
    """sha256 over the package source: every *.py and *.jsonl under `package_dir` (default:
    the installed near_jax package), in relative-POSIX-path order, each hashed as
    relpath NUL length NUL bytes."""
    if package_dir is None:
        return _installed_code_sha256()
    return _tree_sha256(package_dir)


@functools.lru_cache(maxsize=1)
def _installed_code_sha256() -> str:
    # The installed package does not change under a running process, and hashing it reads
    # every source file: once per process is enough.
    return _tree_sha256(os.path.dirname(os.path.abspath(near_jax.__file__)))


def _tree_sha256(package_dir: str) -> str:
    if not os.path.isdir(package_dir):
        raise ValueError(f"cannot hash code: {package_dir!r} is not a directory")
    files: list[tuple[str, str]] = []
    for root, dirs, names in os.walk(package_dir):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in names:
            if name.endswith(_CODE_SUFFIXES):
                full = os.path.join(root, name)
                rel = os.path.relpath(full, package_dir).replace(os.sep, "/")
                files.append((rel, full))
    h = hashlib.sha256()
    for rel, full in sorted(files):
        with open(full, "rb") as f:
            data = f.read()
        # Lengths and NULs make the encoding unambiguous: no two trees hash the same stream.
        h.update(rel.encode() + b"\0" + str(len(data)).encode() + b"\0")
        h.update(data)
    return h.hexdigest()


def config_sha256(recipe: dict) -> str:
    """sha256 of the run's config in canonical JSON (`protocol.dumps`)."""
    return protocol.sha256(protocol.dumps(recipe))


# ---------------------------------------------------------------------------------- claims


@dataclasses.dataclass(frozen=True)
class Claim:
    """What a contribution's signature covers (the fields of `identity.STATEMENT_FIELDS`)."""

    run: str
    round: int
    contributor: str
    base_sha256: str
    payload_sha256: str
    code_sha256: str
    config_sha256: str

    @property
    def fields(self) -> dict:
        """The statement fields as a dict."""
        return {k: getattr(self, k) for k in identity.STATEMENT_FIELDS}

    @property
    def statement(self) -> bytes:
        """The signed statement bytes; IdentityError if a field is malformed."""
        return identity.statement_bytes(self.fields)


class Verifier(Protocol):
    """Accepts (None) or rejects (a one-line reason) a claim and its attestation blob."""

    def __call__(self, claim: Claim, blob: bytes) -> str | None: ...


@dataclasses.dataclass
class CodeHashVerifier:
    """The default verifier: the signed code hash must be allowed and the config hash the
    run's. Ignores the blob (which is for TEE quotes), so it checks claims, not the truth."""

    allowed_code: frozenset[str]
    config_sha256: str

    def __post_init__(self) -> None:
        if isinstance(self.allowed_code, str):  # a lone hash would become a set of its chars
            raise TypeError("allowed_code must be a collection of hashes, not one str")
        self.allowed_code = frozenset(self.allowed_code)

    def __call__(self, claim: Claim, blob: bytes) -> str | None:
        if claim.code_sha256 not in self.allowed_code:
            allowed = ", ".join(sorted(h[:12] for h in self.allowed_code)) or "none"
            return (
                f"code hash {str(claim.code_sha256)[:12]} is not allowed for this run "
                f"(allowed: {allowed})"
            )
        if claim.config_sha256 != self.config_sha256:
            return (
                f"config hash {str(claim.config_sha256)[:12]} differs from the run's "
                f"{self.config_sha256[:12]}"
            )
        return None


def load_verifier(spec: str, *, allowed_code: Iterable[str], config_sha256: str) -> Verifier:
    """The verifier named by `spec` ("" / "code_hash" / "package.module:factory");
    ValueError (one line) if it cannot be built."""
    if not isinstance(spec, str):
        raise ValueError(f"bad attestation verifier {spec!r}: expected {_SPEC_HELP}")
    if isinstance(allowed_code, str):  # frozenset("ab12…") would allow single characters
        raise ValueError("allowed_code must be a collection of code hashes, not one str")
    spec = spec.strip()
    allowed = frozenset(allowed_code)
    if spec in ("", "code_hash"):
        return CodeHashVerifier(allowed, config_sha256)
    if not _SPEC.fullmatch(spec):
        raise ValueError(f"bad attestation verifier {spec!r}: expected {_SPEC_HELP}")
    module_name, factory_name = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - import runs arbitrary module code
        raise ValueError(
            f"attestation verifier {spec!r}: cannot import {module_name}: {one_line(e, typed=True)}"
        ) from None
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise ValueError(
            f"attestation verifier {spec!r}: {module_name} has no callable {factory_name!r}"
        )
    try:
        verifier = factory(allowed_code=allowed, config_sha256=config_sha256)
    except Exception as e:  # noqa: BLE001
        raise ValueError(
            f"attestation verifier {spec!r}: factory raised {one_line(e, typed=True)}"
        ) from None
    if not callable(verifier):
        raise ValueError(
            f"attestation verifier {spec!r}: factory returned a {type(verifier).__name__}, "
            "not a callable verifier(claim, blob)"
        )
    return verifier


def check(verifier: Verifier, claim: Claim, blob: bytes) -> str | None:
    """None if `verifier` accepts `claim` with `blob`, else a one-line reason; never raises
    for anything the verifier or the blob does."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        return f"attestation blob is a {type(blob).__name__}, not bytes"
    blob = bytes(blob)
    if len(blob) > MAX_BLOB_BYTES:
        return f"attestation blob of {len(blob)} bytes exceeds {MAX_BLOB_BYTES}"
    try:
        reason = verifier(claim, blob)
    except Exception as e:  # noqa: BLE001 - a contribution must never crash the aggregator
        return f"attestation verifier raised {one_line(e, typed=True)}"
    if reason is None:
        return None
    if not isinstance(reason, str):  # fail closed on a verifier that answers nonsense
        return f"attestation verifier returned a {type(reason).__name__}, not None or a reason"
    reason = one_line(reason)
    return reason or "attestation verifier rejected the contribution (no reason given)"
