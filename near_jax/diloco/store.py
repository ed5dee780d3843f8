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

Bounded reads
-------------
Anyone who can write to the store can leave an object of any size, so no read takes a whole
object on trust: `get` reads the header first (a ranged read), refuses a body longer than
`max_bytes` (`ObjectTooLarge`, a CorruptObject) and then reads exactly the length the header
declares. Callers pass a limit that fits what they expect (a tree's size for versions and
contributions); everything else gets `MAX_OBJECT_BYTES`.

Links (file stores)
-------------------
A file store refuses symbolic links and anything that is not a regular file, anywhere on a
key's path below the store's root (`UnsafePath`, a CorruptObject naming the key): a link
placed in the store would otherwise make it read, or write, files outside it.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import struct
import threading
import time
import urllib.parse

from near_jax._io import one_line

MAGIC = b"NJOB"  # near_jax object
READ_ATTEMPTS = 8  # reads of an object that keeps changing before giving up (~1 s)
VERSION = 1
HEADER = struct.Struct("<4sHQ32s")  # magic, version, body length, sha256(body)
_KEY_PART = re.compile(r"[A-Za-z0-9._=-]+")
MAX_OBJECT_BYTES = 64 << 20  # the default bound of a read (JSON objects, small blobs)


class StoreError(Exception):
    """The store cannot be opened or an operation on it failed; one line."""


class CorruptObject(StoreError):
    """An object exists but is not a complete, intact framed object."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"corrupt object {key!r}: {reason}")
        self.key, self.reason = key, reason


class ObjectTooLarge(CorruptObject):
    """An object's body is longer than the reader's limit (it was not read)."""


class UnsafePath(CorruptObject):
    """A key of a file store is a link, or a path through one, or not a regular file."""


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
        self._root: str | None = None  # file stores: the real path of the root directory

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
            raise StoreError(f"cannot open store {url!r}: {one_line(e)}") from None
        store = cls(kv, url)
        if spec["driver"] == "file":  # links are resolved against the real root
            store._root = os.path.realpath(spec["path"])
        return store

    # -------------------------------------------------------------------------------- reads

    def get(self, key: str, max_bytes: int = MAX_OBJECT_BYTES) -> bytes | None:
        """The body stored at `key`, None if missing; CorruptObject if it is not intact,
        ObjectTooLarge (before reading it) if its body is longer than `max_bytes`."""
        return self.get_with_generation(key, max_bytes)[0]

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
            raise StoreError(f"cannot list {prefix!r} in {self.url!r}: {one_line(e)}") from None
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

    def get_with_generation(
        self, key: str, max_bytes: int = MAX_OBJECT_BYTES
    ) -> tuple[bytes | None, bytes]:
        """(body or None, the storage generation read) for a later `put_if_generation`;
        bounded like `get`."""
        for attempt in range(READ_ATTEMPTS):
            data, generation = self._read_framed(key, max_bytes)
            if data is not False:
                return (None if data is None else unframe(data, key)), generation
            # Rewritten mid-read: back off so a busy writer cannot starve the reader (a loaded
            # machine made three immediate retries fail in tests).
            time.sleep(min(0.01 * 2**attempt, 0.25))
        raise StoreError(f"{key!r} in {self.url!r} kept changing while it was being read")

    def read_prefix(self, key: str, max_bytes: int) -> tuple[bytes, bool, bytes] | None:
        """(the first `max_bytes` or fewer stored bytes of `key`, whether that is all of it,
        generation), None if missing: the raw, unchecked bytes, e.g. to keep as evidence."""
        head = self._try_read(key, slice(0, max_bytes))
        if head is None:  # shorter than max_bytes: find its size, one byte probe at a time
            lo, hi = 0, max_bytes  # the object has >= lo bytes and < hi bytes
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if self._try_read(key, slice(mid - 1, mid)) else (lo, mid)
            head = self._try_read(key, slice(0, lo))
            if head is None:
                raise StoreError(f"{key!r} in {self.url!r} changed while it was being read")
        if head.state != "value":
            return None
        complete = self._try_read(key, slice(max_bytes, max_bytes + 1)) is None
        self._count(read=len(head.value))
        return head.value, complete, head.stamp.generation

    def put_if_generation(self, key: str, body: bytes, generation: bytes) -> bool:
        """Compare-and-swap: stores `body` only if `key` is still at `generation` (as returned
        by `get_with_generation`, the missing-key generation included); True if it did."""
        data = frame(body)
        written = self._write(key, data, if_equal=generation)
        if not written:  # tensorstore reports a failed condition as an empty generation
            return False
        self._count(written=len(data))
        return True

    def delete(self, key: str, if_equal: bytes | None = None) -> bool:
        """Removes `key` if present (only if still at generation `if_equal`, when given);
        False if the condition failed. A link at `key` itself is removed, not followed."""
        return bool(self._write(key, None, if_equal=if_equal, leaf_link_ok=True))

    # ----------------------------------------------------------------------------- helpers

    def _read(self, key: str, head: bool = False, byte_range: slice | None = None):
        check_key(key)
        self._check_path(key)
        if head:
            byte_range = slice(0, 0)
        try:
            return self._kv.read(key, byte_range=byte_range).result()
        except Exception as e:  # noqa: BLE001
            raise StoreError(f"cannot read {key!r} from {self.url!r}: {one_line(e)}") from None

    def _try_read(self, key: str, byte_range: slice):
        """A ranged read; None if the object is shorter than the range."""
        try:
            return self._read(key, byte_range=byte_range)
        except StoreError as e:
            if "OUT_OF_RANGE" in str(e):
                return None
            raise

    def _read_framed(self, key: str, max_bytes: int):
        """(stored bytes or None if missing, generation), reading no more than the header
        and the body it declares (at most `max_bytes`); (False, b"") if the object changed
        between the ranged reads (the caller retries)."""
        head = self._try_read(key, slice(0, HEADER.size))
        if head is None:
            raise CorruptObject(key, f"truncated: shorter than the {HEADER.size}-byte header")
        if head.state != "value":
            return None, head.stamp.generation
        magic, _, length, _ = HEADER.unpack_from(head.value)
        if magic != MAGIC:
            raise CorruptObject(key, f"bad magic {magic!r}, expected {MAGIC!r}")
        if length > max_bytes:
            raise ObjectTooLarge(
                key, f"oversized: its header says {length} body bytes, the limit is {max_bytes}"
            )
        end = HEADER.size + length
        body = self._try_read(key, slice(HEADER.size, end))
        if body is None:
            raise CorruptObject(key, f"header says {length} body bytes, found fewer")
        if self._try_read(key, slice(end, end + 1)) is not None:
            raise CorruptObject(key, f"header says {length} body bytes, found more")
        if body.state != "value" or body.stamp.generation != head.stamp.generation:
            return False, b""
        self._count(read=end)
        return head.value + body.value, head.stamp.generation

    def _write(
        self, key: str, data: bytes | None, if_equal: bytes | None = None, leaf_link_ok=False
    ) -> bytes:
        check_key(key)
        self._check_path(key, leaf_link_ok)
        try:
            return self._kv.write(key, data, if_equal=if_equal).result().generation
        except Exception as e:  # noqa: BLE001
            raise StoreError(f"cannot write {key!r} to {self.url!r}: {one_line(e)}") from None

    def _check_path(self, key: str, leaf_link_ok: bool = False) -> None:
        """UnsafePath unless every existing component of `key` under a file store's root is a
        directory (a regular file at the end), none of them a link."""
        if self._root is None:
            return
        path, parts = self._root, key.split("/")
        for i, part in enumerate(parts):
            path = os.path.join(path, part)
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                return
            except OSError as e:
                raise StoreError(f"cannot inspect {key!r} in {self.url!r}: {e.strerror}") from None
            last, where = i == len(parts) - 1, "/".join(parts[: i + 1])
            if stat.S_ISLNK(mode) and not (last and leaf_link_ok):
                raise UnsafePath(key, f"{where} is a symbolic link; the store refuses links")
            if not last and not stat.S_ISDIR(mode):
                return  # a file where a directory is expected: the key cannot exist
            if last and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)):
                raise UnsafePath(key, f"{where} is not a regular file")

    def _count(self, read: int = 0, written: int = 0) -> None:
        with self._lock:
            self.bytes_read += read
            self.bytes_written += written


def _successor(prefix: bytes) -> bytes:
    """The smallest key greater than every key starting with `prefix` (b"" = no bound)."""
    prefix = prefix.rstrip(b"\xff")
    return prefix[:-1] + bytes([prefix[-1] + 1]) if prefix else b""
