"""Signed exchanges, attestation reports, receipts and hashes (`near_jax.serve.attestation`)."""

import copy
import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from near_jax.contrib import attest, identity
from near_jax.diloco import protocol
from near_jax.serve import attestation as at

KEY = identity.Identity(Ed25519PrivateKey.from_private_bytes(b"\x01" * 32))
OTHER = identity.generate()
NONCE = "ab" * 32
REQUEST = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'
RESPONSE = '{"choices":[{"message":{"content":"h\u00e9llo"}}]}'.encode()
PARAMS_SHA, CODE_SHA = "1" * 64, "2" * 64


def make_report(nonce=NONCE, key=KEY, provider="none"):
    return at.report(
        key, provider, nonce, model="tiny", params_sha256=PARAMS_SHA, code_sha256=CODE_SHA
    )


# ------------------------------------------------------------------------------ exchanges


def test_the_exchange_signature_is_over_the_two_hashes_as_text():
    signed = at.sign_exchange(KEY, REQUEST, RESPONSE)
    text = hashlib.sha256(REQUEST).hexdigest() + ":" + hashlib.sha256(RESPONSE).hexdigest()
    assert signed == {
        "text": text,
        "signature": signed["signature"],
        "signing_key": KEY.public_hex,
        "algorithm": "ed25519",
    }
    # a third party needs nothing but the text's UTF-8 bytes and the raw public key
    KEY.private_key.public_key().verify(bytes.fromhex(signed["signature"]), text.encode())
    assert at.verify_exchange(REQUEST, RESPONSE, signed) == ""
    assert at.verify_exchange(REQUEST, RESPONSE, signed, KEY.public_hex) == ""


def test_a_tampered_exchange_fails():
    signed = at.sign_exchange(KEY, REQUEST, RESPONSE)
    assert "response body does not match" in at.verify_exchange(REQUEST, RESPONSE + b" ", signed)
    assert "request body does not match" in at.verify_exchange(REQUEST[:-1], RESPONSE, signed)
    # re-hashed text without a new signature
    forged = dict(signed, text=at.exchange_text(REQUEST, b"{}"))
    assert "does not verify" in at.verify_exchange(REQUEST, b"{}", forged)
    # signed by another key: valid on its own, refused when the report's key is expected
    theirs = at.sign_exchange(OTHER, REQUEST, RESPONSE)
    assert at.verify_exchange(REQUEST, RESPONSE, theirs) == ""
    assert "not the expected" in at.verify_exchange(REQUEST, RESPONSE, theirs, KEY.public_hex)
    swapped = dict(signed, signing_key=OTHER.public_hex)
    assert "does not verify" in at.verify_exchange(REQUEST, RESPONSE, swapped)


@pytest.mark.parametrize(
    "garbage",
    [
        None,
        [],
        "x",
        {},
        {"algorithm": "rsa"},
        {"algorithm": "ed25519", "text": 5},
        {"algorithm": "ed25519", "text": "a:b"},
        {"algorithm": "ed25519", "signature": [1]},
    ],
)
def test_a_garbage_signature_is_a_reason_not_an_exception(garbage):
    assert at.verify_exchange(REQUEST, RESPONSE, garbage) != ""
    assert at.verify_exchange("text", RESPONSE, at.sign_exchange(KEY, REQUEST, RESPONSE)) != ""


# --------------------------------------------------------------------------------- reports


def test_a_report_binds_the_key_to_the_nonce_and_verifies():
    rep = make_report()
    nonce = bytes.fromhex(NONCE)
    binding = hashlib.sha256(bytes.fromhex(KEY.public_hex) + nonce).hexdigest()
    assert rep["report_data"] == binding
    assert rep["quote"] == {"type": "none", "report_data": binding}
    assert (rep["provider"], rep["attested"]) == ("none", False)
    assert rep["warning"].startswith("UNATTESTED")
    assert rep["signing_key"] == KEY.public_hex and rep["key_id"] == KEY.key_id
    assert (rep["params_sha256"], rep["code_sha256"], rep["model"]) == (
        PARAMS_SHA,
        CODE_SHA,
        "tiny",
    )
    assert at.verify_report(rep, NONCE) == []
    # upper-case hex names the same nonce; the report survives a JSON round trip
    assert at.verify_report(json.loads(json.dumps(rep)), NONCE.upper()) == []
    assert at.verify_report(rep, NONCE, params_sha256=PARAMS_SHA, code_sha256=CODE_SHA) == []
    problems = at.verify_report(rep, NONCE, params_sha256="3" * 64)
    assert problems == [f"params_sha256 is {'1' * 16}..., expected {'3' * 16}..."]


def test_a_wrong_nonce_or_unattested_report_fails():
    rep = make_report()
    assert at.verify_report(rep, "cd" * 32) == [
        "the report's nonce is not the one sent (a stale or replayed report)",
        "report_data is not sha256(signing_key ‖ nonce): the key is not bound",
        "quote: the quote's report_data is not the report's",
    ]
    assert at.verify_report(rep, NONCE, require_attested=True) == [
        "the report is unattested (provider 'none') and attestation is required"
    ]


def test_a_forged_report_fails():
    rep = make_report()
    # a report of another key with this nonce re-labelled as ours: the binding breaks
    other = make_report(key=OTHER)
    forged = dict(other, signing_key=KEY.public_hex, key_id=KEY.key_id)
    problems = at.verify_report(forged, NONCE)
    assert "report_data is not sha256(signing_key ‖ nonce): the key is not bound" in problems
    assert "the report's signature does not verify under its signing_key" in problems
    # other fields changed after signing: only the signature notices
    for field, value in (("params_sha256", "4" * 64), ("model", "big"), ("code_sha256", "5" * 64)):
        assert at.verify_report(dict(rep, **{field: value}), NONCE) == [
            "the report's signature does not verify under its signing_key"
        ]
    # claiming attestation with the 'none' provider
    lying = dict(rep, attested=True)
    lying["signature"] = KEY.sign(at.report_bytes(lying))
    assert at.verify_report(lying, NONCE) == ["attested must be False for provider 'none'"]


@pytest.mark.parametrize(
    "damage",
    [
        lambda r: [],
        lambda r: r.pop("signing_key"),
        lambda r: r.update(signing_key="zz"),
        lambda r: r.update(format=2),
        lambda r: r.update(provider="tdx"),
        lambda r: r.update(quote="x"),
        lambda r: r.update(nonce=None),
        lambda r: r.update(params_sha256=7),
        lambda r: r.update(model=[]),
        lambda r: r.update(signature={"a": float("nan")}),
        lambda r: r.update(extra=float("nan")),
    ],
)
def test_a_garbage_report_is_problems_not_an_exception(damage):
    rep = make_report()
    result = damage(rep)
    problems = at.verify_report(result if result == [] else rep, NONCE)
    assert problems and all(isinstance(p, str) and "\n" not in p for p in problems)


@pytest.mark.parametrize("nonce", ["ab" * 15, "ab" * 65, "abc" * 11, "zz" * 16, "", 5, None])
def test_a_bad_nonce_is_one_line_naming_nonce(nonce):
    with pytest.raises(ValueError, match=r"^nonce must be 16 to 64 bytes in hex") as e:
        make_report(nonce=nonce)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="^nonce"):
        at.verify_report(make_report(), nonce)
    assert at.parse_nonce("00" * 16) == bytes(16)


def test_providers():
    assert isinstance(at.provider("none"), at.NoneProvider)
    with pytest.raises(ValueError, match=r"^unknown attestation provider 'tdx'; allowed: none$"):
        at.provider("tdx")
    with pytest.raises(ValueError, match="unknown attestation provider"):
        make_report(provider="sev")


# -------------------------------------------------------------------------------- receipts


def test_a_receipt_verifies_with_its_report_and_fails_when_tampered():
    signed = at.sign_exchange(KEY, REQUEST, RESPONSE)
    rec = json.loads(json.dumps(at.receipt(REQUEST, RESPONSE, signed)))
    assert rec == {
        "format": 1,
        "request": REQUEST.decode(),
        "response": RESPONSE.decode(),
        "signed": signed,
    }
    rep = make_report()
    assert at.verify_receipt(rec) == []
    assert at.verify_receipt(rec, rep, NONCE) == []
    tampered = dict(rec, response=rec["response"].replace("llo", "lp"))
    assert at.verify_receipt(tampered, rep, NONCE) == [
        "the response body does not match the signed response hash"
    ]
    assert at.verify_receipt(rec, rep, "cd" * 32)[0].startswith("report: the report's nonce")
    assert at.verify_receipt(rec, rep, NONCE, require_attested=True) == [
        "report: the report is unattested (provider 'none') and attestation is required"
    ]
    assert at.verify_receipt(rec, rep) == ["checking a report needs the nonce it was asked with"]
    # a genuine receipt from another server's key does not match this report
    theirs = at.receipt(REQUEST, RESPONSE, at.sign_exchange(OTHER, REQUEST, RESPONSE))
    assert at.verify_receipt(theirs) == []
    assert "not the expected" in at.verify_receipt(theirs, rep, NONCE)[0]


def test_a_binary_body_goes_in_base64_and_garbage_receipts_are_problems():
    body = b"\xff\x00binary"
    rec = at.receipt(REQUEST, body, at.sign_exchange(KEY, REQUEST, body))
    assert "response" not in rec and at.verify_receipt(json.loads(json.dumps(rec))) == []
    assert at.verify_receipt(dict(rec, response_b64="!!")) == [
        "the receipt has no readable response (or response_b64)"
    ]
    for garbage in (None, [], {}, {"request": "x", "response": "\ud800", "signed": 1}):
        problems = at.verify_receipt(garbage, make_report(), NONCE)
        assert problems and all(isinstance(p, str) for p in problems)
    assert at.verify_receipt(copy.deepcopy(rec), "not a report", NONCE)[0].startswith("report:")


# ---------------------------------------------------------------------------------- hashes


def _manual_params_sha256(leaves):
    h = hashlib.sha256()
    for path, a in leaves:
        head = {"path": path, "dtype": str(a.dtype), "shape": list(a.shape)}
        h.update(protocol.dumps(head) + b"\0" + str(a.nbytes).encode() + b"\0" + a.tobytes())
    return h.hexdigest()


def test_params_sha256_is_over_paths_dtypes_shapes_and_bytes_whatever_the_sharding():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 6)).astype(np.float32)
    b = rng.standard_normal(6).astype(jnp.bfloat16)
    params = {"layer": {"w": w, "b": b}, "scale": np.float32(2.0)}
    want = _manual_params_sha256(
        [("['layer']['b']", b), ("['layer']['w']", w), ("['scale']", np.asarray(np.float32(2.0)))]
    )
    assert at.params_sha256(params) == want
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ("a", "b"))
    spec = jax.sharding.PartitionSpec
    sharded = {
        "layer": {
            "w": jax.device_put(w, jax.sharding.NamedSharding(mesh, spec("a", "b"))),
            "b": jax.device_put(b, jax.sharding.NamedSharding(mesh, spec("b"))),
        },
        "scale": jnp.float32(2.0),
    }
    assert len(sharded["layer"]["w"].sharding.device_set) == 8
    assert at.params_sha256(sharded) == want
    # any change of a value, a dtype, a shape or a name changes it
    w2 = w.copy()
    w2[3, 4] = np.nextafter(w2[3, 4], np.float32(np.inf))
    for other in (
        {"layer": {"w": w2, "b": b}, "scale": np.float32(2.0)},
        {"layer": {"w": w, "b": b.astype(np.float32)}, "scale": np.float32(2.0)},
        {"layer": {"w": w.reshape(6, 8), "b": b}, "scale": np.float32(2.0)},
        {"layer": {"v": w, "b": b}, "scale": np.float32(2.0)},
    ):
        assert at.params_sha256(other) != want


def test_code_sha256_is_the_contributor_layers_code_hash():
    assert at.code_sha256() == attest.code_sha256()
    assert len(at.code_sha256()) == 64
