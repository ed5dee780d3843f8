"""What a contributor run accepts: its policy, the config hash contributors sign, allowed code.

The `Policy` is fixed in the run's manifest when the run is created (`contrib.policy`): the
robust rule, the screening thresholds, how many batches score a contribution, the
attestation verifier, the code hashes it accepts and the config hash (`recipe_sha256`: the
run-fixed model and data settings) every contributor signs. Code hashes allowed later (a
new near_jax release mid-run) or revoked (a release found broken) go into a list in the
store, `RUN/allowed_code`, that counts only when the run's aggregator key signed it (anyone
can write to the store): {"run", "seq", "hashes", "revoked", "signature"}. The code a run
accepts is (the manifest's ∪ hashes) − revoked; seq grows with each change, so a reader
that saw seq N refuses an older list re-put to undo a revocation.

Both sides read these: the aggregator's validator checks contributions against them, and an
island checks at start-up that its code and config are ones the run takes.
"""

from __future__ import annotations

import dataclasses
import json
import re

from near_jax._io import one_line
from near_jax.contrib import attest, identity
from near_jax.diloco import protocol, robust
from near_jax.diloco.aggregator import manifest_fields
from near_jax.diloco.protocol import ProtocolError
from near_jax.diloco.store import CorruptObject, ObjectStore

_HASH = re.compile(r"[0-9a-f]{64}")
_ALLOW_DOMAIN = b"near_jax/allowed_code/v1\n"  # lists written before seqs and revocation
_ALLOW_DOMAIN_V2 = b"near_jax/allowed_code/v2\n"
MAX_ALLOWED_CODE_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class Policy:
    """How a run treats contributions; fixed in its manifest when the run is created."""

    rule: robust.Rule = robust.Rule("trimmed_mean")
    screen: bool = True
    max_norm_ratio: float = 3.0
    zero_norm_ratio: float = 1e-3
    duplicate_cosine: float = 0.99
    min_score: float = 0.0
    score_batches: int = 2
    attestation: str = "code_hash"
    allowed_code: tuple[str, ...] = ()
    config_sha256: str = ""
    assigned_data: bool = True
    assigned_batches: int = 2
    validate_sample: int = 0
    new_keys_per_round: int = 4
    copy_overlap: float = 0.4
    centered_cosine: float = 0.5
    low_rating: float = -5.0

    @classmethod
    def from_config(cls, contrib_cfg, code_sha256: str, config_sha256: str) -> Policy:
        """The policy of a config's `contrib` section; the creator's code hash is allowed."""
        extra = [h.strip() for h in contrib_cfg.allowed_code.split(",") if h.strip()]
        return cls(
            rule=robust.Rule.from_config(contrib_cfg),
            screen=bool(contrib_cfg.screen),
            max_norm_ratio=float(contrib_cfg.max_norm_ratio),
            zero_norm_ratio=float(contrib_cfg.zero_norm_ratio),
            duplicate_cosine=float(contrib_cfg.duplicate_cosine),
            min_score=float(contrib_cfg.min_score),
            score_batches=int(contrib_cfg.score_batches),
            attestation=contrib_cfg.attestation,
            allowed_code=tuple(sorted({code_sha256, *extra})),
            config_sha256=config_sha256,
            assigned_data=bool(contrib_cfg.assigned_data),
            assigned_batches=int(contrib_cfg.assigned_batches),
            validate_sample=int(contrib_cfg.validate_sample),
            new_keys_per_round=int(contrib_cfg.new_keys_per_round),
            copy_overlap=float(contrib_cfg.copy_overlap),
            centered_cosine=float(contrib_cfg.centered_cosine),
            low_rating=float(contrib_cfg.low_rating),
        )

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["rule"], out["allowed_code"] = str(self.rule), list(self.allowed_code)
        return out

    @classmethod
    def from_json(cls, obj: dict) -> Policy:
        """The policy a manifest records; fields a run created before them lacks are off."""
        obj = {**_OFF_BEFORE_RECORDED, **obj}
        obj["rule"] = robust.Rule.parse(obj["rule"])
        obj["allowed_code"] = tuple(obj["allowed_code"])
        return cls(**obj)


# What a run whose manifest predates a policy field did: nothing (its islands, for one, did
# not train on assigned data).
_OFF_BEFORE_RECORDED = {
    "assigned_data": False,
    "validate_sample": 0,
    "new_keys_per_round": 0,
    "copy_overlap": 0.0,
    "centered_cosine": 1.0,
}


def recipe_sha256(cfg) -> str:
    """The config hash contributors sign: the run-fixed model and data settings."""
    return attest.config_sha256(json.loads(json.dumps(manifest_fields(cfg))))


# -------------------------------------------------------------------------- allowed code


@dataclasses.dataclass(frozen=True)
class CodeList:
    """The signed `RUN/allowed_code`: code hashes allowed and revoked after the run was
    created, and its seq (increasing with each change; 0: none published, or a list
    written before seqs)."""

    hashes: frozenset[str] = frozenset()
    revoked: frozenset[str] = frozenset()
    seq: int = 0

    def allowed(self, manifest_code: tuple[str, ...] | frozenset[str]) -> frozenset[str]:
        """The code a run with `manifest_code` in its manifest accepts now."""
        return (frozenset(manifest_code) | self.hashes) - self.revoked

    def allowing(self, hashes: list[str]) -> CodeList:
        """The next list: `hashes` allowed (and no longer revoked)."""
        new = frozenset(hashes)
        return CodeList(self.hashes | new, self.revoked - new, self.seq + 1)

    def revoking(self, hashes: list[str]) -> CodeList:
        """The next list: `hashes` revoked (the manifest's too)."""
        new = frozenset(hashes)
        return CodeList(self.hashes - new, self.revoked | new, self.seq + 1)


def allowed_code_key(run: str) -> str:
    """The aggregator's signed list of code hashes allowed after the run was created."""
    return f"{run}/allowed_code"


def extra_allowed_code(
    store: ObjectStore,
    run: str,
    aggregator_public: str,
    *,
    min_seq: int = 0,
    known: CodeList | None = None,
) -> tuple[CodeList, str]:
    """(the code list, a problem or ""): only a list the run's aggregator signed counts
    (anyone can write to the store), and one older than `min_seq` (re-put from before a
    revocation) does not; on a problem the result is `known` (default: none)."""
    key, fallback = allowed_code_key(run), known or CodeList()
    try:
        obj = protocol.read_json(store, key, max_bytes=MAX_ALLOWED_CODE_BYTES)
    except (ProtocolError, CorruptObject) as e:
        return fallback, f"{key} is unreadable ({one_line(e, 100)})"
    if obj is None:
        if min_seq > 0:
            return fallback, f"{key} vanished (seq {min_seq} was seen)"
        return CodeList(), ""
    if "seq" in obj:
        body = {k: obj.get(k) for k in ("run", "seq", "hashes", "revoked")}
        domain = _ALLOW_DOMAIN_V2
    else:  # written before seqs and revocation: seq 0
        body, domain = {"run": obj.get("run"), "hashes": obj.get("hashes")}, _ALLOW_DOMAIN
    seq, lists = body.get("seq", 0), (body["hashes"], body.get("revoked", []))
    if (
        body["run"] != run
        or isinstance(seq, bool)
        or not isinstance(seq, int)
        or not 0 <= seq < 1 << 53
        or not all(isinstance(x, list) and all(_is_hash(h) for h in x) for x in lists)
        or not identity.verify(
            aggregator_public, domain + protocol.dumps(body), obj.get("signature", "")
        )
    ):
        return fallback, f"{key} is not signed by the run's aggregator"
    if seq < min_seq:
        return fallback, f"{key} has seq {seq}, older than seq {min_seq} seen: a rollback, ignored"
    return CodeList(frozenset(lists[0]), frozenset(lists[1]), seq), ""


def signed_allowed_code(
    aggregator: identity.Identity,
    run: str,
    hashes: list[str],
    *,
    seq: int = 1,
    revoked: list[str] | tuple[str, ...] = (),
) -> dict:
    """The object stored at `allowed_code_key(run)`: the hashes allowed and revoked, and
    the list's seq, signed by the aggregator."""
    body = {"run": run, "seq": seq, "hashes": list(hashes), "revoked": list(revoked)}
    body["signature"] = aggregator.sign(_ALLOW_DOMAIN_V2 + protocol.dumps(body))
    return body


def _is_hash(h: object) -> bool:
    return isinstance(h, str) and _HASH.fullmatch(h) is not None
