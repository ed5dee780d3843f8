"""The islands' object store: framed objects, corruption detection, listing, single winners."""

import os
import threading

import pytest

from near_jax.diloco import store as store_lib
from near_jax.diloco.store import CorruptObject, ObjectStore, StoreError, frame, unframe


@pytest.fixture
def store(tmp_path):
    return ObjectStore.open(str(tmp_path))


def test_put_get_roundtrip_and_framing(store, tmp_path):
    assert store.get("run/a") is None and not store.exists("run/a")
    n = store.put("run/a", b"hello")
    assert store.get("run/a") == b"hello" and store.exists("run/a")
    raw = (tmp_path / "run" / "a").read_bytes()
    assert n == len(raw) == store_lib.HEADER.size + 5
    assert raw.startswith(store_lib.MAGIC) and unframe(raw) == b"hello"
    assert store.bytes_written == n and store.bytes_read == n
    store.put("run/a", b"")  # overwrite; empty bodies are fine
    assert store.get("run/a") == b""


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda raw: raw[:10], "truncated"),
        (lambda raw: raw[:-3], "body bytes"),
        (lambda raw: raw + b"x", "body bytes"),
        (lambda raw: raw[:-1] + bytes([raw[-1] ^ 1]), "sha256"),
        (lambda raw: b"XXXX" + raw[4:], "magic"),
        (lambda raw: raw[store_lib.HEADER.size :], "magic"),  # a body without its frame
    ],
)
def test_damaged_objects_are_reported_not_returned(store, tmp_path, damage, reason):
    store.put("run/obj", b"some payload bytes " * 10)
    path = tmp_path / "run" / "obj"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CorruptObject, match=reason) as info:
        store.get("run/obj")
    assert info.value.key == "run/obj"


def test_list_by_prefix_sorted_and_exact(store):
    for key in [
        "r/rounds/00000001/contrib/b",
        "r/rounds/00000001/contrib/a",
        "r/rounds/00000001/decision",
        "r/rounds/00000010/contrib/a",
        "r2/x",
    ]:
        store.put(key, b"1")
    assert store.list("r/rounds/00000001/contrib/") == [
        "r/rounds/00000001/contrib/a",
        "r/rounds/00000001/contrib/b",
    ]
    assert store.list("r/") == sorted(k for k in store.list("") if k.startswith("r/"))
    assert "r2/x" not in store.list("r/")
    assert store.list("nothing/") == []
    store.delete("r2/x")
    assert store.list("r2/") == [] and store.get("r2/x") is None


def test_put_if_absent_has_one_winner(store):
    assert store.put_if_absent("run/decision", b"first")
    assert not store.put_if_absent("run/decision", b"second")
    assert store.get("run/decision") == b"first"
    # Racing writers (threads; the file driver locks across processes the same way).
    results = []
    barrier = threading.Barrier(8)

    def race(i):
        barrier.wait()
        results.append((store.put_if_absent("run/race", b"%d" % i), i))

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for ok, i in results if ok]
    assert len(winners) == 1 and store.get("run/race") == b"%d" % winners[0]


def test_compare_and_swap(store):
    body, gen = store.get_with_generation("run/latest")
    assert body is None
    assert store.put_if_generation("run/latest", b"v1", gen)
    assert not store.put_if_generation("run/latest", b"stale", gen)  # generation moved on
    body, gen = store.get_with_generation("run/latest")
    assert body == b"v1" and store.put_if_generation("run/latest", b"v2", gen)
    assert store.get("run/latest") == b"v2"


def test_readers_never_see_partial_objects(store):
    """A reader polling a key that is rewritten with large objects sees only whole ones."""
    bodies = [bytes([i]) * (1 << 20) for i in range(1, 6)]
    store.put("run/big", bodies[0])
    stop = threading.Event()
    seen, errors = set(), []

    def read():
        while not stop.is_set():
            try:
                seen.add(store.get("run/big")[:1])
            except Exception as e:  # noqa: BLE001 - any failure is a test failure
                errors.append(e)

    reader = threading.Thread(target=read)
    reader.start()
    for _ in range(4):
        for body in bodies:
            store.put("run/big", body)
    stop.set()
    reader.join()
    assert not errors and seen <= {b[:1] for b in bodies}
    assert store.list("run/") == ["run/big"]  # no temporary files listed


def test_urls_map_to_kvstore_specs(tmp_path):
    spec = store_lib.kvstore_spec
    assert spec("gs://bkt/runs/x") == {"driver": "gcs", "bucket": "bkt", "path": "runs/x/"}
    assert spec("s3://bkt") == {"driver": "s3", "bucket": "bkt", "path": ""}
    assert spec(f"file://{tmp_path}") == {"driver": "file", "path": f"{tmp_path}/"}
    assert spec(str(tmp_path)) == spec(f"file://{tmp_path}/")
    assert spec("memory://") == {"driver": "memory"}
    for bad in ("ftp://x/y", "gs://", "", "file://host/path"):
        with pytest.raises(StoreError):
            spec(bad)


def test_missing_store_and_bad_keys(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        ObjectStore.open(str(tmp_path / "nope"))
    store = ObjectStore.open(f"file://{tmp_path}")
    for bad in ("", "/abs", "a//b", "a/../b", "a/./b", "a b", "a/"):
        with pytest.raises(ValueError, match="bad store key"):
            store.put(bad, b"x")
    assert not os.listdir(tmp_path)


def test_frame_unframe():
    assert unframe(frame(b"abc")) == b"abc"
    with pytest.raises(CorruptObject, match="version"):
        data = bytearray(frame(b"abc"))
        data[4] = 9
        unframe(bytes(data))


class _SpyKv:
    """Wraps a kvstore; records how many bytes each read handed back."""

    def __init__(self, kv):
        self.kv, self.returned = kv, []

    def read(self, key, **kw):
        result = self.kv.read(key, **kw).result()
        self.returned.append(len(result.value))
        return _Done(result)

    def __getattr__(self, name):
        return getattr(self.kv, name)


class _Done:
    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


@pytest.mark.parametrize("framed", [True, False])
def test_oversized_object_is_refused_without_reading_it(store, tmp_path, framed):
    """A 200 MB (sparse) object is refused having read a bounded number of bytes."""
    path = tmp_path / "run" / "junk"
    path.parent.mkdir()
    size = 200 << 20
    with open(path, "wb") as f:
        if framed:  # a well-formed header that declares the whole 200 MB
            f.write(store_lib.HEADER.pack(store_lib.MAGIC, 1, size, b"\0" * 32))
        f.truncate(store_lib.HEADER.size + size)
    spy = store._kv = _SpyKv(store._kv)
    with pytest.raises(CorruptObject) as info:
        store.get("run/junk", max_bytes=1 << 20)
    assert info.value.key == "run/junk"
    assert ("oversized" if framed else "magic") in str(info.value)
    assert sum(spy.returned) <= 1 << 10 and store.bytes_read == 0
    store.put("run/small", b"x" * 1000)  # within the limit: read in full, exactly
    assert store.get("run/small", max_bytes=1000) == b"x" * 1000
    with pytest.raises(store_lib.ObjectTooLarge, match="limit is 999"):
        store.get("run/small", max_bytes=999)
    assert store.get_with_generation("run/small", max_bytes=999 + 1)[0] == b"x" * 1000


def test_links_are_refused_naming_the_key(store, tmp_path):
    secret = tmp_path.parent / f"{tmp_path.name}-outside"
    secret.write_bytes(frame(b"root:x:0:0"))  # even a well-framed object outside the root
    (tmp_path / "run").mkdir()
    os.symlink(secret, tmp_path / "run" / "decision")
    os.symlink(tmp_path.parent, tmp_path / "run" / "dir")
    for key in ("run/decision", f"run/dir/{secret.name}"):
        with pytest.raises(store_lib.UnsafePath, match="symbolic link") as info:
            store.get(key)
        assert info.value.key == key
    with pytest.raises(store_lib.UnsafePath):
        store.put(f"run/dir/{tmp_path.name}-planted", b"x")  # nor written through a link
    assert not (tmp_path.parent / f"{tmp_path.name}-planted").exists()
    os.mkfifo(tmp_path / "run" / "fifo")  # would block a reader forever
    with pytest.raises(store_lib.UnsafePath, match="not a regular file"):
        store.get("run/fifo")
    store.delete("run/decision")  # removes the link itself, not what it points to
    assert secret.exists() and not os.path.lexists(tmp_path / "run" / "decision")


def test_read_prefix_keeps_raw_bytes_bounded(store, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "raw").write_bytes(b"garbage")
    assert store.read_prefix("run/raw", 100)[:2] == (b"garbage", True)
    assert store.read_prefix("run/raw", 3)[:2] == (b"gar", False)
    assert store.read_prefix("run/none", 3) is None
