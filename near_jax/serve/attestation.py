"""Signed responses and attestation reports: what lets a client check who answered, with what.

The server holds an ed25519 key (`near_jax.contrib.identity`, the contributor layer's
identities). Three things come out of it:

Signed exchanges
----------------
Every response carries a signature over exactly the UTF-8 text

    "<sha256 hex of the request body>:<sha256 hex of the response body>"

(64 + 1 + 64 lowercase characters, no domain prefix and no newline), as NEAR's private
inference stack signs its responses, so third-party verifiers written for that stack check
ours too. `sign_exchange` returns {"text", "signature" (128 hex), "signing_key" (64 hex),
"algorithm": "ed25519"}; `verify_exchange` recomputes the text from the bodies. The bodies
are the exact bytes on the wire (for a stream: every byte of it).

Attestation reports
-------------------
GET /v1/attestation/report?nonce=HEX (a fresh client nonce: 16 to 64 bytes in hex) answers
`report(...)`:

    {"format": 1, "model", "signing_key", "key_id", "nonce", "params_sha256", "code_sha256",
     "report_data": sha256(raw public key (32 bytes) ‖ nonce bytes) in hex,
     "provider", "attested", "quote": the provider's evidence, "warning" (unattested only),
     "signature": the key's signature of REPORT_DOMAIN + canonical JSON of the rest}

report_data binds the key to the client's nonce: a quote whose report data holds it was
made for this key and this request, so it cannot be replayed for another key or later. The
signature proves the server holds the key now. Only the "none" provider is implemented:
its quote is no evidence at all, and the report says so ("attested": false and a
"warning"); `verify_report(..., require_attested=True)` refuses it. See `Provider` for
what a TDX + NVIDIA confidential-computing provider must do.

Receipts
--------
`receipt` bundles a request, its response and the signature into one JSON-able dict that a
client saves; `python -m near_jax.serve verify` runs `verify_receipt` on it (and on a report).

Hashes: `params_sha256` (the served params, independent of sharding) and `code_sha256` (the
near_jax sources, as the contributor layer hashes them) go into the report.
"""

from __future__ import annotations

import base64
import hashlib
import re
from typing import Any, Protocol

import jax
import numpy as np

from near_jax._io import short_repr
from near_jax.contrib import attest
from near_jax.contrib import identity as idlib
from near_jax.diloco import protocol

FORMAT = 1
ALGORITHM = "ed25519"
REPORT_DOMAIN = b"near_jax/serve/report/v1\n"
MIN_NONCE_BYTES, MAX_NONCE_BYTES = 16, 64
UNATTESTED_WARNING = (
    "UNATTESTED: provider 'none' gives no hardware evidence; nothing vouches for the key, "
    "the params or the code beyond the server's own word"
)

_HEX = re.compile(r"[0-9a-fA-F]*")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_TEXT = re.compile(r"([0-9a-f]{64}):([0-9a-f]{64})")


# ------------------------------------------------------------------------------ exchanges


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def exchange_text(request_body: bytes, response_body: bytes) -> str:
    """The signed text of an exchange: "sha256hex(request):sha256hex(response)"."""
    return f"{_sha256(request_body)}:{_sha256(response_body)}"


def sign_exchange(identity: idlib.Identity, request_body: bytes, response_body: bytes) -> dict:
    """The signature of a request/response pair (see the module docstring)."""
    text = exchange_text(request_body, response_body)
    return {
        "text": text,
        "signature": identity.sign(text.encode()),
        "signing_key": identity.public_hex,
        "algorithm": ALGORITHM,
    }


def verify_exchange(
    request_body: bytes, response_body: bytes, signed: Any, signing_key: str | None = None
) -> str:
    """'' if `signed` is a valid signature of this request/response pair (by `signing_key`
    when given: the key of a verified report), else one line saying why. Never raises."""
    if not isinstance(request_body, (bytes, bytearray)) or not isinstance(
        response_body, (bytes, bytearray)
    ):
        return "the request and response bodies must be bytes"
    if not isinstance(signed, dict):
        return f"the signature must be a JSON object, got {type(signed).__name__}"
    if signed.get("algorithm") != ALGORITHM:
        return f"algorithm is {short_repr(signed.get('algorithm'))}; allowed: {ALGORITHM!r}"
    text = signed.get("text")
    match = _TEXT.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        return f"the signed text {short_repr(text)} is not 'sha256hex:sha256hex'"
    if match.group(1) != _sha256(request_body):
        return "the request body does not match the signed request hash"
    if match.group(2) != _sha256(response_body):
        return "the response body does not match the signed response hash"
    key = signed.get("signing_key")
    if signing_key is not None and key != signing_key:
        return (
            f"signed by key {short_repr(key, 24)}, not the expected {short_repr(signing_key, 24)}"
        )
    if not idlib.verify(key, text.encode(), signed.get("signature")):
        return "the signature does not verify under its signing_key"
    return ""


# ------------------------------------------------------------------------------- providers


class Provider(Protocol):
    """Where a report's quote comes from, and how a verifier checks one.

    `quote(report_data)` returns JSON-able evidence that binds the 32 bytes `report_data`;
    `check(quote, report_data)` returns the problems of such evidence ([] when it holds);
    `attested` says whether the evidence means anything.

    A TDX + NVIDIA confidential-computing provider ("tdx+nvidia") must, in `quote`:

      1. put report_data (padded with 32 zero bytes to the 64-byte REPORTDATA) into a TDX
         quote: write it to configfs-tsm (/sys/kernel/config/tsm/report/NAME/inblob, read
         outblob) or ask the TDX guest device (/dev/tdx_guest, TDX_CMD_GET_REPORT0 then the
         quote generation service);
      2. fetch the NVIDIA GPU attestation evidence (the GPU's signed attestation report and
         certificate chain, per GPU) with report_data as the 32-byte nonce, through NVML
         (nvmlDeviceGetConfComputeGpuAttestationReport) or nvtrust's local GPU verifier;
      3. return both (base64 or hex) with the TDX event log;

    and `check` (the client's verifier) must verify the TDX quote's signature and TCB status
    with Intel's DCAP collateral or Intel Trust Authority, verify the GPU evidence with
    NVIDIA's remote attestation service (NRAS) or the local verifier (CC mode on, no debug,
    driver and VBIOS not revoked), replay the event log to the RTMRs and compare MRTD and the
    RTMRs with the published measurements of the serving image (whose code hash is the
    report's code_sha256), and check that the quote's REPORTDATA and the GPU nonce are
    report_data: the binding to this key and this client's nonce. `attested` is True.
    """

    name: str
    attested: bool

    def quote(self, report_data: bytes) -> dict: ...

    def check(self, quote: Any, report_data: bytes) -> list[str]: ...


class NoneProvider:
    """No hardware evidence: the quote only echoes report_data. Clearly unattested."""

    name = "none"
    attested = False

    def quote(self, report_data: bytes) -> dict:
        """An echo of report_data: proves nothing."""
        return {"type": "none", "report_data": report_data.hex()}

    def check(self, quote: Any, report_data: bytes) -> list[str]:
        """Problems of an echo quote (it must echo this report_data)."""
        if not isinstance(quote, dict) or quote.get("type") != "none":
            return ["the 'none' provider's quote must be {'type': 'none', 'report_data': ...}"]
        if quote.get("report_data") != report_data.hex():
            return ["the quote's report_data is not the report's"]
        return []


PROVIDERS: dict[str, type] = {"none": NoneProvider}


def provider(name: str) -> Provider:
    """The attestation provider called `name`; ValueError naming the allowed ones."""
    return _named(name)


def _named(name: str) -> Provider:
    cls = PROVIDERS.get(name) if isinstance(name, str) else None
    if cls is None:
        allowed = ", ".join(sorted(PROVIDERS))
        raise ValueError(f"unknown attestation provider {short_repr(name)}; allowed: {allowed}")
    return cls()


# --------------------------------------------------------------------------------- reports


def parse_nonce(nonce_hex: Any) -> bytes:
    """The bytes of a client nonce: hex, 16 to 64 bytes; ValueError naming `nonce`."""
    if (
        not isinstance(nonce_hex, str)
        or len(nonce_hex) % 2
        or not MIN_NONCE_BYTES * 2 <= len(nonce_hex) <= MAX_NONCE_BYTES * 2
        or not _HEX.fullmatch(nonce_hex)
    ):
        raise ValueError(
            f"nonce must be {MIN_NONCE_BYTES} to {MAX_NONCE_BYTES} bytes in hex "
            f"({MIN_NONCE_BYTES * 2} to {MAX_NONCE_BYTES * 2} hex characters), "
            f"got {short_repr(nonce_hex, 40)}"
        )
    return bytes.fromhex(nonce_hex)


def report_data(public_hex: str, nonce: bytes) -> bytes:
    """sha256(raw public key ‖ nonce): what the quote must bind."""
    return hashlib.sha256(bytes.fromhex(public_hex) + nonce).digest()


def report_bytes(rep: dict) -> bytes:
    """What a report's signature covers: REPORT_DOMAIN + canonical JSON without "signature"."""
    return REPORT_DOMAIN + protocol.dumps({k: v for k, v in rep.items() if k != "signature"})


def report(
    identity: idlib.Identity,
    provider: Provider | str,
    nonce_hex: str,
    *,
    model: str,
    params_sha256: str,
    code_sha256: str,
) -> dict:
    """The attestation report for client nonce `nonce_hex` (see the module docstring);
    ValueError on a bad nonce or an unknown provider name."""
    nonce = parse_nonce(nonce_hex)
    prov = _named(provider) if isinstance(provider, str) else provider
    data = report_data(identity.public_hex, nonce)
    rep: dict[str, Any] = {
        "format": FORMAT,
        "model": model,
        "signing_key": identity.public_hex,
        "key_id": identity.key_id,
        "nonce": nonce.hex(),
        "params_sha256": params_sha256,
        "code_sha256": code_sha256,
        "report_data": data.hex(),
        "provider": prov.name,
        "attested": bool(prov.attested),
        "quote": prov.quote(data),
    }
    if not prov.attested:
        rep["warning"] = UNATTESTED_WARNING
    rep["signature"] = identity.sign(report_bytes(rep))
    return rep


def verify_report(
    rep: Any,
    nonce_hex: str,
    *,
    require_attested: bool = False,
    params_sha256: str | None = None,
    code_sha256: str | None = None,
) -> list[str]:
    """Problems of report `rep` (untrusted), [] when it checks out: it answers the nonce
    the verifier sent (`nonce_hex`), binds its key to it, is signed by that key, and its
    quote checks out with its provider (which must not be "none" with `require_attested`);
    with `params_sha256` / `code_sha256` its hashes must be those. Never raises, except
    ValueError for a malformed `nonce_hex` (the caller's own input)."""
    nonce = parse_nonce(nonce_hex)
    if not isinstance(rep, dict):
        return [f"the report must be a JSON object, got {type(rep).__name__}"]
    problems: list[str] = []
    if rep.get("format") != FORMAT:
        problems.append(f"format is {short_repr(rep.get('format'))}; allowed: {FORMAT}")
    if not isinstance(rep.get("model"), str):
        problems.append(f"model must be a string, got {short_repr(rep.get('model'))}")
    if rep.get("nonce") != nonce.hex():
        problems.append("the report's nonce is not the one sent (a stale or replayed report)")
    for field, want in (("params_sha256", params_sha256), ("code_sha256", code_sha256)):
        got = rep.get(field)
        if not (isinstance(got, str) and _HEX64.fullmatch(got)):
            problems.append(f"{field} must be 64 lowercase hex characters, got {short_repr(got)}")
        elif want is not None and got != want:
            problems.append(f"{field} is {got[:16]}..., expected {want[:16]}...")
    key = rep.get("signing_key")
    try:
        idlib.check_public_hex(key)
    except (idlib.IdentityError, RecursionError) as e:
        return [*problems, f"signing_key: {e}"]
    data = report_data(key, nonce)
    if rep.get("report_data") != data.hex():
        problems.append("report_data is not sha256(signing_key ‖ nonce): the key is not bound")
    if not idlib.verify(key, _signed_bytes(rep), rep.get("signature")):
        problems.append("the report's signature does not verify under its signing_key")
    name = rep.get("provider")
    try:
        prov = _named(name)
    except ValueError as e:
        return [*problems, f"cannot check the quote: {e}"]
    if rep.get("attested") is not bool(prov.attested):
        problems.append(f"attested must be {bool(prov.attested)} for provider {name!r}")
    problems += [f"quote: {p}" for p in prov.check(rep.get("quote"), data)]
    if require_attested and not prov.attested:
        problems.append(f"the report is unattested (provider {name!r}) and attestation is required")
    return problems


def _signed_bytes(rep: dict) -> bytes | None:
    try:
        return report_bytes(rep)
    except (TypeError, ValueError, RecursionError):  # not JSON: nobody signed it (verify
        return None  # takes None as "no message" and fails)


# -------------------------------------------------------------------------------- receipts


def receipt(request_body: bytes, response_body: bytes, signed: dict) -> dict:
    """A saved exchange: {"format": 1, "request" | "request_b64", "response" |
    "response_b64", "signed"}: a body that is valid UTF-8 is kept as text (re-encoding it
    gives the same bytes), any other in base64."""
    out: dict[str, Any] = {"format": FORMAT}
    for name, body in (("request", request_body), ("response", response_body)):
        try:
            out[name] = bytes(body).decode("utf-8")
        except UnicodeDecodeError:
            out[name + "_b64"] = base64.b64encode(body).decode()
    out["signed"] = signed
    return out


def _body(rec: dict, name: str) -> bytes | None:
    if isinstance(rec.get(name), str):
        return rec[name].encode("utf-8", "surrogatepass")
    try:
        return base64.b64decode(rec.get(name + "_b64"), validate=True)
    except (TypeError, ValueError):
        return None


def verify_receipt(
    rec: Any,
    report: Any = None,
    nonce_hex: str | None = None,
    require_attested: bool = False,
) -> list[str]:
    """Problems of a saved receipt (untrusted), [] when its signature holds; with a
    `report` (answered to `nonce_hex`) the report must verify and the receipt must be
    signed by the report's key."""
    if not isinstance(rec, dict):
        return [f"the receipt must be a JSON object, got {type(rec).__name__}"]
    problems = []
    bodies = {name: _body(rec, name) for name in ("request", "response")}
    for name, body in bodies.items():
        if body is None:
            problems.append(f"the receipt has no readable {name} (or {name}_b64)")
    key = None
    if report is not None:
        if nonce_hex is None:
            problems.append("checking a report needs the nonce it was asked with")
        else:
            found = verify_report(report, nonce_hex, require_attested=require_attested)
            problems += [f"report: {p}" for p in found]
        key = report.get("signing_key") if isinstance(report, dict) else None
        key = key if isinstance(key, str) else ""  # no usable key: no signature matches
    request, response = bodies["request"], bodies["response"]
    if request is not None and response is not None:
        why = verify_exchange(request, response, rec.get("signed"), key)
        problems += [why] if why else []
    return problems


# ---------------------------------------------------------------------------------- hashes


def params_sha256(params: Any) -> str:
    """sha256 over a params pytree: per leaf in tree order its path, dtype and shape
    (canonical JSON) and its bytes in C order, gathered one leaf at a time, so the same
    values give the same hash whatever their sharding (one host: every shard addressable)."""
    h = hashlib.sha256()
    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    for path, leaf in leaves:
        a = np.asarray(jax.device_get(leaf), order="C")  # not ascontiguousarray: 0-d stays 0-d
        head = {"path": jax.tree_util.keystr(path), "dtype": str(a.dtype), "shape": a.shape}
        h.update(protocol.dumps(head) + b"\0" + str(a.nbytes).encode() + b"\0")
        h.update(a.reshape(-1).view(np.uint8))
    return h.hexdigest()


def code_sha256() -> str:
    """sha256 of the near_jax sources (`contrib.attest.code_sha256`: relative paths and
    contents of every *.py and *.jsonl, sorted): the contributor layer's code hash."""
    return attest.code_sha256()
