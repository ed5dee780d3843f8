"""API keys for the server: who may call it, what each call costs them, and their spend limit.

A keys file holds no secrets, only their SHA-256, so reading it (or a backup of it) never
lets anyone call the server:

    {"format": 1, "keys": [{"name": "alice", "sha256": "<hex sha256 of the secret>",
      "prompt_price": 100000, "completion_price": 300000, "limit": 5000000}]}

Prices are integer micro-units per 1,000,000 tokens; `limit` is the most a key may spend in
all (integer micro-units, across restarts: the usage ledger keeps the total) or null for
none. `add_key` writes the file (atomically) and returns the new secret, the only time it is
ever seen. Without a keys file the server is open (`KeyRing.open`): one "anonymous" key that
costs nothing and has no limit, whatever secret a client sends.

The file is untrusted input: `KeyRing.load` refuses anything but exactly this shape, with a
one-line `KeysFileError` naming the key entry, the field and what is allowed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import os
import re
import secrets
from typing import Any

from near_jax._io import atomic_write, one_line, short_repr

FORMAT = 1
KEY_FIELDS = ("name", "sha256", "prompt_price", "completion_price", "limit")
ANONYMOUS = "anonymous"  # the open keyring's one key; a reserved name in a keys file
ANONYMOUS_SHA256 = "0" * 64  # the anonymous key's hash: no secret hashes to it
SECRET_PREFIX = "nj-"
TOKENS_PER_PRICE = 1_000_000  # prices are per this many tokens
MAX_PRICE = 10**15  # micro-units per 1M tokens (a billion units): keeps every sum in int64
MAX_LIMIT = 10**18  # micro-units: below SQLite's int64 ceiling (about 9.2e18)
MAX_KEYS_FILE_BYTES = 16 << 20
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


class KeysFileError(ValueError):
    """A keys file that cannot be read or is malformed, or a bad key to add; one line."""


@dataclasses.dataclass(frozen=True)
class ApiKey:
    """One key: its name, the SHA-256 of its secret, its prices and its spend limit."""

    name: str
    sha256: str
    prompt_price: int  # micro-units per 1,000,000 prompt tokens
    completion_price: int  # micro-units per 1,000,000 completion tokens
    limit: int | None  # micro-units in all; None: no limit


ANONYMOUS_KEY = ApiKey(ANONYMOUS, ANONYMOUS_SHA256, 0, 0, None)


def secret_sha256(secret: str) -> str:
    """The hex SHA-256 of a secret (its UTF-8 bytes): what a keys file stores."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def request_cost(prompt_tokens: int, completion_tokens: int, key: ApiKey) -> int:
    """The cost of a request in micro-units, exact: ceil((prompt * prompt_price +
    completion * completion_price) / 1,000,000); ValueError for a negative or non-int count."""
    for name, value in (("prompt_tokens", prompt_tokens), ("completion_tokens", completion_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0: {short_repr(value)}")
    total = prompt_tokens * key.prompt_price + completion_tokens * key.completion_price
    return -(-total // TOKENS_PER_PRICE)  # integer ceil: floats would round large totals


def check_key_name(name: Any) -> str:
    """A key name: 1-64 of [A-Za-z0-9._-], alphanumeric first; else KeysFileError."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise KeysFileError(
            f"bad key name {short_repr(name)}: 1-64 of [A-Za-z0-9._-], alphanumeric first"
        )
    return name


class KeyRing:
    """The keys a server accepts; `load` one from a file, or `open()` for no keys at all."""

    def __init__(self, keys: tuple[ApiKey, ...], *, is_open: bool = False):
        self.keys = keys
        self.is_open = is_open  # no keys file: anyone may call, as the anonymous key

    @classmethod
    def open(cls) -> KeyRing:
        """The keyring of a server with no keys file: one anonymous key, price 0, no limit,
        accepted with any secret or none."""
        return cls((ANONYMOUS_KEY,), is_open=True)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> KeyRing:
        """The keys in the file at `path`; KeysFileError (one line) if it cannot be read or
        is not exactly a keys file (see the module docstring). A file with no keys accepts
        no one."""
        return cls(_parse(_read(path), os.fspath(path)))

    def lookup(self, secret: str | None) -> ApiKey | None:
        """The key whose secret this is, None if none (or no secret). Compares against every
        key in constant time, so timing says nothing about which hashes are near."""
        if self.is_open:
            return ANONYMOUS_KEY
        if not isinstance(secret, str) or not secret:
            return None
        digest = secret_sha256(secret)
        found = None
        for key in self.keys:  # no early exit: every lookup does the same work
            if hmac.compare_digest(digest, key.sha256):
                found = key
        return found

    def by_name(self, name: str) -> ApiKey | None:
        """The key called `name`, None if there is none."""
        return next((k for k in self.keys if k.name == name), None)


def add_key(
    path: str | os.PathLike[str],
    name: str,
    prompt_price: int = 0,
    completion_price: int = 0,
    limit: int | None = None,
) -> str:
    """Adds key `name` to the keys file at `path` (creating the file if absent; replacing
    the key of that name, and so its secret, if present) and returns the new secret, which
    is stored nowhere. The file is written atomically and readable only by its owner (one
    writer at a time: two concurrent calls may lose one key); KeysFileError if the existing
    file is malformed or a value is not allowed. A running server reads the file at start."""
    path = os.fspath(path)
    check_key_name(name)
    if name == ANONYMOUS:
        raise KeysFileError(f"key name {ANONYMOUS!r} is reserved for the open keyring")
    keys = list(KeyRing.load(path).keys) if os.path.exists(path) else []
    secret = SECRET_PREFIX + secrets.token_urlsafe(32)  # 43 characters, 256 random bits
    entry = {
        "name": name,
        "sha256": secret_sha256(secret),
        "prompt_price": prompt_price,
        "completion_price": completion_price,
        "limit": limit,
    }
    new = _key(entry, f"key {name!r}")  # the same checks as a file gets
    keys = [k for k in keys if k.name != name] + [new]
    body = {"format": FORMAT, "keys": [dataclasses.asdict(k) for k in keys]}
    try:
        atomic_write(path, json.dumps(body, indent=1) + "\n", mode=0o600)
    except OSError as e:
        raise KeysFileError(f"cannot write keys file {path}: {one_line(e)}") from None
    return secret


def _read(path: str | os.PathLike[str]) -> Any:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEYS_FILE_BYTES + 1)
    except OSError as e:
        raise KeysFileError(f"cannot read keys file {os.fspath(path)}: {one_line(e)}") from None
    if len(data) > MAX_KEYS_FILE_BYTES:
        raise KeysFileError(f"keys file {os.fspath(path)} is over {MAX_KEYS_FILE_BYTES} bytes")
    try:
        return json.loads(data, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise KeysFileError(f"keys file {os.fspath(path)} is not JSON: {one_line(e)}") from None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of repeated fields: a second "limit" must not hide silently
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"field {short_repr(k)} appears twice in one object")
        out[k] = v
    return out


def _parse(obj: Any, path: str) -> tuple[ApiKey, ...]:
    where = f"keys file {path}"
    if not isinstance(obj, dict):
        raise KeysFileError(f"{where}: must be a JSON object, got {type(obj).__name__}")
    unknown, missing = (
        sorted(set(obj) - {"format", "keys"}),
        [f for f in ("format", "keys") if f not in obj],
    )
    if unknown or missing:
        raise KeysFileError(
            f"{where}: unknown fields {unknown}, missing {missing}; allowed: format, keys"
        )
    if obj["format"] != FORMAT or isinstance(obj["format"], bool):
        raise KeysFileError(f"{where}: format is {short_repr(obj['format'])}, expected {FORMAT}")
    if not isinstance(obj["keys"], list):
        raise KeysFileError(f"{where}: keys must be a list, got {type(obj['keys']).__name__}")
    keys: list[ApiKey] = []
    names: dict[str, int] = {}
    hashes: dict[str, int] = {}
    for i, entry in enumerate(obj["keys"]):
        label = f"{where}: key {i}"
        if isinstance(entry, dict) and isinstance(entry.get("name"), str):
            label += f" ({short_repr(entry['name'], 70)})"
        key = _key(entry, label)
        if key.name == ANONYMOUS:
            raise KeysFileError(f"{label}: name {ANONYMOUS!r} is reserved for the open keyring")
        if key.name in names:
            raise KeysFileError(f"{label}: name is also key {names[key.name]}'s; names are unique")
        if key.sha256 in hashes:
            raise KeysFileError(
                f"{label}: sha256 is also key {hashes[key.sha256]}'s; each secret is one key's"
            )
        names[key.name], hashes[key.sha256] = i, i
        keys.append(key)
    return tuple(keys)


def _key(entry: Any, label: str) -> ApiKey:
    if not isinstance(entry, dict):
        raise KeysFileError(f"{label}: must be a JSON object, got {type(entry).__name__}")
    unknown = sorted(set(entry) - set(KEY_FIELDS))
    missing = [f for f in KEY_FIELDS if f not in entry]
    if unknown or missing:
        raise KeysFileError(
            f"{label}: unknown fields {short_repr(unknown)}, missing {missing}; "
            f"allowed: {', '.join(KEY_FIELDS)}"
        )
    try:
        check_key_name(entry["name"])
    except KeysFileError as e:
        raise KeysFileError(f"{label}: name: {e}") from None
    digest = entry["sha256"]
    if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
        raise KeysFileError(
            f"{label}: sha256 is {short_repr(digest)}; allowed: 64 lowercase hex digits"
        )
    for field, top in (("prompt_price", MAX_PRICE), ("completion_price", MAX_PRICE)):
        _int_field(label, field, entry[field], top)
    if entry["limit"] is not None:
        _int_field(label, "limit", entry["limit"], MAX_LIMIT, nullable=True)
    return ApiKey(**{f: entry[f] for f in KEY_FIELDS})


def _int_field(label: str, field: str, value: Any, top: int, *, nullable: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
        allowed = f"an integer 0..{top}" + (" or null" if nullable else "")
        raise KeysFileError(f"{label}: {field} is {short_repr(value)}; allowed: {allowed}")
