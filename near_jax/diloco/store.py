"""A small object store for islands: framed, validated objects in a tensorstore kvstore.

    store = ObjectStore.open("gs://bucket/runs")      # or s3://…, file:///abs/path, a path
    store.put("demo/latest", b"...")                   # overwrite
    store.put_if_absent("demo/rounds/00000003/decision", body)  # True: this call created it
    store.get("demo/latest")                           # bytes, None if missing
    store.list("demo/rounds/00000003/contrib/")        # sorted keys under a prefix

URLs map to kvstore specs: `gs://BUCKET/PREFIX` → driver "gcs", `s3://BUCKET/PREFIX` → "s3",
`file:///ABS/PATH` or a plain path → "file", `memory://` → "memory" (one process; tests).

Atomic publish
--------------
A reader never sees part of an object. Each `put` is one kvstore write of the whole value:
GCS and S3 make an uploaded object visible only complete; tensorstore's file driver writes a
lock/temp file next to the key and renames it into place (a POSIX rename is atomic) and
never lists those temp files. On top of that every object is framed,

    b"NJOB" | u16 version | u64 body length | sha256(body) (32 bytes) | body

and `get` checks all four and raises `CorruptObject` (naming the key and the defect) instead
of returning a truncated, padded or bit-flipped body — so even a store, copy tool or disk
that does tear objects cannot feed garbage to the protocol.

Single winners
--------------
`put_if_absent` is a conditional write (`if_equal` = the generation tensorstore reports for a
missing key): of several writers racing for one key exactly one succeeds, the others get
False and leave the object untouched. The file driver implements it with filesystem locks
(safe across processes, and across machines on a network filesystem with working locks), GCS
with `ifGenerationMatch=0`. The protocol only relies on it where two *aggregators* could race
(a round's decision); islands write distinct keys. On a store without conditional writes
(older S3 set-ups) the last writer would win: run a single aggregator there.

Keys are `/`-separated paths of [A-Za-z0-9._=-] components (no empty, `.` or `..`
components), so an island id cannot escape its prefix on a filesystem.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import threading
import urllib.parse

MAGIC = b"NJOB"  # near_jax object
VERSION = 1
HEADER = struct.Struct("<4sHQ32s")  # magic, version, body length, sha256(body)
_KEY_PART = re.compile(r"[A-Za-z0-9._=-]+")


class StoreError(Exception):
    """The store cannot be opened or an operation on it failed; one line."""


class CorruptObject(StoreError):
    """An object exists but is not a complete, intact framed object."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"corrupt object {key!r}: {reason}")
        self.key, self.reason = key, reason


def frame(body: bytes) -> bytes:
    """The stored form of `body`: header (magic, version, length, sha256) + body."""
    body = bytes(body)
    return HEADER.pack(MAGIC, VERSION, len(body), hashlib.sha256(body).digest()) + body


def unframe(data: bytes, key: str = "?") -> bytes:
    """The body of a stored object; raises CorruptObject if it is not exactly intact."""
    if len(data) < HEADER.size:
        raise CorruptObject(key, f"truncated: {len(data)} bytes, the header alone is {HEADER.size}")
    magic, version, length, digest = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise CorruptObject(key, f"bad magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise CorruptObject(key, f"unsupported object version {version} (this reader: {VERSION})")
    if len(data) - HEADER.size != length:
        raise CorruptObject(
            key, f"header says {length} body bytes, found {len(data) - HEADER.size}"
        )
    body = bytes(data[HEADER.size :])
    if hashlib.sha256(body).digest() != digest:
        raise CorruptObject(key, "sha256 of the body does not match the header")
    return body


def check_key(key: str) -> str:
    """`key` if it is a safe relative key (see the module docstring), else ValueError."""
    parts = key.split("/")
    if not key or any(p in ("", ".", "..") or not _KEY_PART.fullmatch(p) for p in parts):
        raise ValueError(f"bad store key {key!r}: '/'-separated [A-Za-z0-9._=-] components")
    return key


def kvstore_spec(url: str) -> dict:
    """The tensorstore kvstore spec for a store URL or path (see the module docstring)."""
    if not isinstance(url, str) or not url.strip():
        raise StoreError("empty store URL; expected gs://…, s3://…, file:///… or a path")
    url = url.strip()
    parsed = urllib.parse.urlparse(url)
    scheme = parsed.scheme.lower() if "://" in url else ""
    if scheme in ("gs", "s3"):
        if not parsed.netloc:
            raise StoreError(f"store URL {url!r} names no bucket")
        prefix = parsed.path.strip("/")
        driver = "gcs" if scheme == "gs" else "s3"
        return {"driver": driver, "bucket": parsed.netloc, "path": prefix + "/" if prefix else ""}
    if scheme == "memory":
        return {"driver": "memory"}
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise StoreError(f"store URL {url!r}: file URLs take no host (file:///abs/path)")
        path = urllib.parse.unquote(parsed.path)
    elif scheme:
        raise StoreError(f"store URL {url!r}: unknown scheme {scheme!r} (gs, s3, file, memory)")
    else:
        path = url
    return {"driver": "file", "path": os.path.abspath(path).rstrip("/") + "/"}


class ObjectStore:
    """Framed objects in a tensorstore kvstore; counts the bytes it moves.

    `bytes_read` / `bytes_written` count stored (framed) bytes of successful reads and
    writes: what crossed the network.
    """

    def __init__(self, kvstore, url: str = ""):
        self._kv = kvstore
        self.url = url
        self.bytes_read = 0
        self.bytes_written = 0
        self._lock = threading.Lock()

    @classmethod
    def open(cls, url: str, *, must_exist: bool = True) -> ObjectStore:
        """Opens the store at `url`; for file stores, the directory must exist (must_exist)."""
        import tensorstore as ts

        spec = kvstore_spec(url)
        if spec["driver"] == "file" and must_exist and not os.path.isdir(spec["path"]):
            raise StoreError(f"store {url!r} does not exist (no directory {spec['path']})")
        try:
            kv = ts.KvStore.open(spec).result()
        except Exception as e:  # noqa: BLE001 - tensorstore raises ValueError/OSError/...
            raise StoreError(f"cannot open store {url!r}: {_one_line(e)}") from None
        return cls(kv, url)

    # -------------------------------------------------------------------------------- reads

    def get(self, key: str) -> bytes | None:
        """The body stored at `key`, None if missing; CorruptObject if it is not intact."""
        result = self._read(key)
        if result.state != "value":
            return None
        data = result.value
        self._count(read=len(data))
        return unframe(data, key)

    def exists(self, key: str) -> bool:
        """Whether `key` holds an object (reads no body bytes)."""
        return self._read(key, head=True).state == "value"

    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys that start with `prefix` (a key prefix, e.g. "run/rounds/")."""
        import tensorstore as ts

        if prefix:
            check_key(prefix.rstrip("/"))
        low = prefix.encode()
        key_range = ts.KvStore.KeyRange(inclusive_min=low, exclusive_max=_successor(low))
        try:
            keys = self._kv.list(key_range).result()
        except Exception as e:  # noqa: BLE001
            raise StoreError(f"cannot list {prefix!r} in {self.url!r}: {_one_line(e)}") from None
        # A key that is not UTF-8 cannot be one of ours; "replace" keeps list() from failing
        # on it (callers check names, so it is never read back).
        return sorted(k.decode("utf-8", "replace") for k in keys)

    # ------------------------------------------------------------------------------- writes

    def put(self, key: str, body: bytes) -> int:
        """Stores `body` at `key` (replacing any object there); returns the bytes written."""
        data = frame(body)
        self._write(key, data)
        self._count(written=len(data))
        return len(data)

    def put_if_absent(self, key: str, body: bytes) -> bool:
        """Stores `body` only if `key` holds nothing; True if this call created the object."""
        missing = self._read(key, head=True)
        if missing.state == "value":
            return False
        return self.put_if_generation(key, body, missing.stamp.generation)

    def get_with_generation(self, key: str) -> tuple[bytes | None, bytes]:
        """(body or None, the storage generation read) for a later `put_if_generation`."""
        result = self._read(key)
        if result.state != "value":
            return None, result.stamp.generation
        self._count(read=len(result.value))
        return unframe(result.value, key), result.stamp.generation

    def put_if_generation(self, key: str, body: bytes, generation: bytes) -> bool:
        """Compare-and-swap: stores `body` only if `key` is still at `generation` (as returned
        by `get_with_generation`, the missing-key generation included); True if it did."""
        data = frame(body)
        written = self._write(key, data, if_equal=generation)
        if not written:  # tensorstore reports a failed condition as an empty generation
            return False
        self._count(written=len(data))
        return True

    def delete(self, key: str) -> None:
        """Removes `key` if present."""
        self._write(key, None)

    # ----------------------------------------------------------------------------- helpers

    def _read(self, key: str, head: bool = False):
        check_key(key)
        try:
            if head:
                return self._kv.read(key, byte_range=slice(0, 0)).result()
            return self._kv.read(key).result()
        except Exception as e:  # noqa: BLE001
            raise StoreError(f"cannot read {key!r} from {self.url!r}: {_one_line(e)}") from None

    def _write(self, key: str, data: bytes | None, if_equal: bytes | None = None) -> bytes:
        check_key(key)
        try:
            return self._kv.write(key, data, if_equal=if_equal).result().generation
        except Exception as e:  # noqa: BLE001
            raise StoreError(f"cannot write {key!r} to {self.url!r}: {_one_line(e)}") from None

    def _count(self, read: int = 0, written: int = 0) -> None:
        with self._lock:
            self.bytes_read += read
            self.bytes_written += written


def _successor(prefix: bytes) -> bytes:
    """The smallest key greater than every key starting with `prefix` (b"" = no bound)."""
    prefix = prefix.rstrip(b"\xff")
    return prefix[:-1] + bytes([prefix[-1] + 1]) if prefix else b""


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300] or type(e).__name__
