"""Code and config hashes and the pluggable attestation verifier (`near_jax.contrib.attest`)."""

import hashlib
import os
import shutil
import sys

import pytest
from helpers import H
from helpers import statement_fields as fields

from near_jax.contrib import attest, identity
from near_jax.contrib.identity import IdentityError


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
