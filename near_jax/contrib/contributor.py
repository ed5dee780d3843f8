"""The contributor's side: what an island adds to its contributions in a contributor run.

    python -m near_jax.contrib keygen --out=~/.near_jax/eu-1.key
    python -m near_jax.diloco.island --store=… --run=… --island=eu-1 \\
        --key=~/.near_jax/eu-1.key [--attestation=QUOTE_FILE] --config=…

In a run whose manifest has a `contrib` section, `prepare_signer` loads the island's key,
registers it under the island's name (first come, first served; the same key again is a
no-op), checks that this code and config are ones the run accepts and, in an allowlisted
run, that the name and key are admitted (so a mismatch fails at start-up, not as a
rejection every round) and returns the `Signer` that
`protocol.push_contribution(sign=...)` calls to sign each contribution's statement.
"""

from __future__ import annotations

import base64
import hashlib
import time

from near_jax.contrib import allowlist, attest, commits, identity, registry
from near_jax.contrib.policy import Policy, extra_allowed_code, recipe_sha256
from near_jax.diloco import protocol
from near_jax.diloco.store import CorruptObject, ObjectStore


class Signer:
    """Signs a contribution: returns the tag fields naming the signer and the statement's
    signature (called with the tag and the payload bytes). With a `store`, it first
    commits to the payload's hash (`commits.commit`: push_contribution and the island's
    exchange sign before any shard is written), so the round knows it came before any copy;
    `slot` is the slot claimed, or None with `commit_problem` saying why not (a round
    flooded with commitments: the contribution goes on without one)."""

    def __init__(
        self,
        ident: identity.Identity,
        name: str,
        code_sha256: str,
        config_sha256: str,
        attestation: bytes = b"",
        store: ObjectStore | None = None,
    ):
        self.ident, self.name, self.attestation = ident, name, attestation
        self.code_sha256, self.config_sha256 = code_sha256, config_sha256
        self.store = store
        self.slot: int | None = None
        self.commit_problem = ""

    def __call__(self, tag: dict, payload: bytes) -> dict:
        sha = hashlib.sha256(payload).hexdigest()
        self.slot, self.commit_problem = None, ""
        if self.store is not None:
            try:
                self.slot = commits.commit(
                    self.store, tag["run"], tag["round"], self.name, self.ident, sha
                )
            except commits.CommitError as e:
                self.commit_problem = str(e)
        fields = {
            "run": tag["run"],
            "round": tag["round"],
            "contributor": self.name,
            "base_sha256": tag["base_sha256"],
            "payload_sha256": sha,
            "code_sha256": self.code_sha256,
            "config_sha256": self.config_sha256,
        }
        out = {
            k: fields[k] for k in ("contributor", "payload_sha256", "code_sha256", "config_sha256")
        }
        out["signature"] = identity.sign_statement(self.ident, fields)
        if self.attestation:
            out["attestation"] = base64.b64encode(self.attestation).decode()
        return out


def prepare_signer(
    cfg,
    store: ObjectStore,
    run: str,
    name: str,
    manifest: dict,
    key_path: str,
    attestation_path: str = "",
) -> Signer:
    """The island's Signer for a contributor run (registers the key); ValueError (one line)
    when the key, its registration, the code or the config cannot take part."""
    if not key_path:
        raise ValueError(
            f"run {run!r} takes signed contributions only: pass --key=PATH (make one with "
            "python -m near_jax.contrib keygen --out=PATH)"
        )
    try:
        ident = identity.load(key_path)
    except identity.IdentityError as e:
        raise ValueError(str(e)) from None
    policy = Policy.from_json(manifest["contrib"]["policy"])
    code, config = attest.code_sha256(), recipe_sha256(cfg)
    aggregator = manifest["contrib"]["aggregator_key"]
    code_list, problem = extra_allowed_code(store, run, aggregator)
    allowed = code_list.allowed(policy.allowed_code)
    if code in code_list.revoked:
        raise ValueError(
            f"this near_jax code (hash {code[:12]}) was revoked in run {run!r}: install a "
            f"version it takes ({', '.join(h[:12] for h in sorted(allowed)) or 'none'})"
        )
    if policy.attestation == "code_hash" and code not in allowed:
        raise ValueError(
            f"this near_jax code (hash {code[:12]}) is not allowed in run {run!r}: it takes "
            f"{', '.join(h[:12] for h in sorted(allowed))} (install that version)"
            + (f"; note: {problem}" if problem else "")
        )
    if config != policy.config_sha256:
        raise ValueError(f"this config's hash {config[:12]} differs from run {run!r}'s")
    blob = b""
    if attestation_path:
        try:
            with open(attestation_path, "rb") as f:
                blob = f.read()
        except OSError as e:
            raise ValueError(f"--attestation={attestation_path}: {e.strerror}") from None
        if len(blob) > attest.MAX_BLOB_BYTES:
            raise ValueError(
                f"--attestation={attestation_path} is {len(blob)} bytes; the limit is "
                f"{attest.MAX_BLOB_BYTES}"
            )
    admitted, problem = allowlist.admitted(store, run, manifest)
    if admitted is not None and admitted.get(name) != ident.public_hex:
        raise ValueError(
            f"run {run!r} takes admitted contributors only: {name} with key id {ident.key_id} "
            "is not on its allowlist (ask its aggregator: python -m near_jax.contrib admit)"
            + (f"; note: {problem}" if problem else "")
        )
    try:  # last: a start that fails on the code or config does not claim the name
        registry.register(store, run, name, ident, time.time())
    except identity.IdentityError as e:
        raise ValueError(str(e)) from None
    return Signer(ident, name, code, config, blob, store=store)


def slot_problem(store: ObjectStore, key: str, signer: Signer, expect: dict) -> str:
    """Why the object at this island's contribution `key` is not the island's own for the
    statement fields in `expect` (run, round, base_sha256); "" if it is. Someone else may
    write to our slot first to block or frame us."""
    try:
        body = store.get(key)
    except CorruptObject:
        return "it is not an intact object"
    if body is None:
        return "it vanished"
    try:
        tag, payload = protocol.split_contribution(body)
    except Exception as e:  # noqa: BLE001 - whatever is there, it is not ours
        return f"it is not a contribution ({str(e)[:80]})"
    fields = {k: tag.get(k) for k in identity.STATEMENT_FIELDS}
    fields["payload_sha256"] = hashlib.sha256(payload).hexdigest()
    fields.update(expect, contributor=signer.name)
    if not identity.verify_statement(signer.ident.public_hex, fields, tag.get("signature", "")):
        return "it is not signed by this island's key for this round"
    return ""
