"""Tests of near_jax.diloco.protocol.keys: the store layout of a run and the names in it."""

import pytest

from near_jax.diloco.protocol import keys
from near_jax.diloco.store import ObjectStore


def test_key_layout():
    assert keys.manifest_key("demo") == "demo/run.json"
    assert keys.latest_key("demo") == "demo/latest"
    assert keys.finished_key("demo") == "demo/finished"
    assert keys.version0_prefix("demo") == "demo/versions/00000000/"
    assert keys.contrib_prefix("demo", 3) == "demo/rounds/00000003/contrib/"
    assert keys.contrib_key("demo", 3, "isl-1") == "demo/rounds/00000003/contrib/isl-1"
    assert keys.decision_key("demo", 0) == "demo/rounds/00000000/decision"
    assert (
        keys.contrib_shard_key("demo", 3, "isl-1", 7) == "demo/rounds/00000003/shards/isl-1/000007"
    )
    assert keys.out_prefix("demo", 99999999, "ab12") == "demo/rounds/99999999/out/ab12/"
    assert keys.outs_prefix("demo", 4) == "demo/rounds/00000004/out/"


def test_zero_padding_sorts_rounds_and_versions_in_order():
    rounds = [keys.decision_key("r", n) for n in (10, 2, 100, 1)]
    assert sorted(rounds) == [keys.decision_key("r", n) for n in (1, 2, 10, 100)]


@pytest.mark.parametrize("name", ["a", "A9", "run_1.b-2", "0" * 64, "x.-_"])
def test_check_name_accepts(name):
    assert keys.check_name("run", name) == name


@pytest.mark.parametrize(
    "name",
    ["", "-a", ".a", "_a", "a/b", "a b", "a\nb", "é", "a" * 65, "..", None, 7, b"abc"],
)
def test_check_name_refuses_with_one_line(name):
    with pytest.raises(ValueError) as e:
        keys.check_name("island", name)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"bad island name {name!r}")


def test_contrib_keys_lists_only_valid_island_names(tmp_path):
    store = ObjectStore.open(str(tmp_path))
    for island in ("a", "b-2", "c.d"):
        store.put(keys.contrib_key("demo", 1, island), b"x")
    prefix = keys.contrib_prefix("demo", 1)
    for odd in ("nested/x", "-bad", "a" * 65):
        store.put(prefix + odd, b"x")
    store.put(keys.contrib_key("demo", 2, "other"), b"x")  # another round
    assert sorted(keys.contrib_keys(store, "demo", 1)) == [
        prefix + "a",
        prefix + "b-2",
        prefix + "c.d",
    ]
    assert keys.contrib_keys(store, "demo", 3) == []


def test_protocol_error_is_a_runtime_error():
    assert issubclass(keys.ProtocolError, RuntimeError)
    assert keys.MAX_CHAIN >= 1 and keys.LATE_WINDOW >= 1 and keys.FORMAT == 1
