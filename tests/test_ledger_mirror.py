"""The store's copy of the ledger (`near_jax.contrib.ledger_mirror`): upload, download, and
every damaged or forged copy refused with the local file kept.
"""

import os
import random

import pytest
from ledger_rows import RUN, entry, file_digest, sqlite_exec

from near_jax.contrib.ledger import Ledger, LedgerError
from near_jax.contrib.ledger_mirror import download, store_key, upload
from near_jax.contrib.ledger_verify import verify_chain
from near_jax.diloco.store import ObjectStore


def test_store_round_trip_and_damage(ledger_path, tmp_path):
    store = ObjectStore.open(str(tmp_path / "store"), must_exist=False)
    assert store_key(RUN) == "demo/ledger.sqlite"
    target = str(tmp_path / "copy" / "ledger.sqlite")
    os.makedirs(os.path.dirname(target))
    assert download(store, RUN, target) is False and not os.path.exists(target)
    n = upload(store, RUN, ledger_path)
    assert n == store.bytes_written and n > 0
    assert download(store, RUN, target) is True
    assert verify_chain(target, RUN) == []
    with Ledger.open(ledger_path, RUN) as a, Ledger.open(target, RUN) as b:
        assert a.entries() == b.entries() and a.head() == b.head()
        assert a.append_round(2, [entry("late")])
    upload(store, RUN, ledger_path)  # replaces the copy
    assert download(store, RUN, target)
    with Ledger.open(target, RUN) as b:
        assert b.count() == 6
    assert os.listdir(os.path.dirname(target)) == ["ledger.sqlite"]  # no temp files left
    with pytest.raises(LedgerError, match="belongs to run 'demo', not 'other'"):
        upload(store, "other", ledger_path)
    with pytest.raises(LedgerError, match="no ledger file"):
        upload(store, RUN, str(tmp_path / "absent.sqlite"))

    good = file_digest(target)
    obj = tmp_path / "store" / "demo" / "ledger.sqlite"
    raw = bytearray(obj.read_bytes())
    raw[-100] ^= 0xFF  # a torn or bit-flipped object
    obj.write_bytes(bytes(raw))
    with pytest.raises(LedgerError, match="damaged"):
        download(store, RUN, target)
    assert file_digest(target) == good  # the local file is untouched

    # intact framing but tampered contents: refused, local file kept
    sqlite_exec(ledger_path, "UPDATE entries SET reward = 99.0 WHERE seq = 6")
    sqlite_exec(ledger_path, "UPDATE meta SET value = 'demo' WHERE key = 'run'")
    upload(store, RUN, ledger_path)
    with pytest.raises(LedgerError, match="fails verification: entry 6: contents"):
        download(store, RUN, target)
    assert file_digest(target) == good
    store.put(store_key(RUN), b"not sqlite")
    with pytest.raises(LedgerError, match="not a SQLite database"):
        download(store, RUN, target)


def test_random_ledgers_round_trip_and_any_flipped_byte_is_refused(tmp_path):
    rng = random.Random(0)
    store = ObjectStore.open(str(tmp_path / "store"), must_exist=False)
    for trial in range(5):
        path, target = str(tmp_path / f"src{trial}.sqlite"), str(tmp_path / f"dst{trial}.sqlite")
        with Ledger.open(path, RUN) as led:
            for rnd in range(rng.randint(1, 4)):
                rows = [
                    entry(
                        f"c{rnd}-{i}",
                        score=rng.uniform(-5, 5),
                        reward=rng.random(),
                        payload_sha256=f"{rng.getrandbits(256):064x}",
                    )
                    for i in range(rng.randint(1, 6))
                ]
                assert led.append_round(rnd, rows)
            expected, head = led.entries(), led.head()
        assert upload(store, RUN, path) > 0
        assert download(store, RUN, target) is True
        with Ledger.open(target, RUN) as copy:
            assert copy.entries() == expected and copy.head() == head
        good = file_digest(target)
        obj = tmp_path / "store" / store_key(RUN)
        raw = bytearray(obj.read_bytes())
        raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)  # one bit, anywhere
        obj.write_bytes(bytes(raw))
        with pytest.raises(LedgerError):
            download(store, RUN, target)
        assert file_digest(target) == good  # the local copy is kept
