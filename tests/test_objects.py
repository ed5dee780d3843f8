"""Tests of near_jax.diloco.protocol.objects: canonical JSON, bounded reads, float32 trees."""

import json

import jax
import numpy as np
import pytest

from near_jax.diloco.codec.compress import encode
from near_jax.diloco.protocol import objects
from near_jax.diloco.protocol.keys import ProtocolError
from near_jax.diloco.store import CorruptObject, ObjectStore, ObjectTooLarge

SHAPES = {"a": (3, 5), "b": [(7,), (2, 2, 2)], "c": ()}


def random_tree(seed, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: rng.standard_normal(s).astype(np.float32),
        shapes,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def test_dumps_is_canonical():
    assert objects.dumps({"b": 1, "a": [1, 2], "c": {"z": 0, "y": "é"}}) == (
        b'{"a":[1,2],"b":1,"c":{"y":"\\u00e9","z":0}}'
    )
    assert objects.dumps({"x": 1, "y": 2}) == objects.dumps({"y": 2, "x": 1})
    obj = {"k": [0.1, None, True], "n": -3}
    assert json.loads(objects.dumps(obj)) == obj


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_dumps_refuses_non_finite_numbers(bad):
    with pytest.raises(ValueError):
        objects.dumps({"x": bad})


def test_sha256_is_hex_of_the_bytes():
    assert objects.sha256(b"") == (
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )


def test_read_json_round_trip_and_missing(tmp_path):
    store = ObjectStore.open(str(tmp_path))
    assert objects.read_json(store, "run/x") is None
    store.put("run/x", objects.dumps({"v": 1, "s": "t"}))
    assert objects.read_json(store, "run/x") == {"v": 1, "s": "t"}


@pytest.mark.parametrize(
    "body,message",
    [
        (b"not json", "run/x is not JSON: "),
        (b"[1, 2]", "run/x is not a JSON object"),
        (b'"str"', "run/x is not a JSON object"),
        (b"\xff\xfe", "run/x is not JSON: "),
        (b"[" * 100_000 + b"]" * 100_000, "run/x is not JSON: "),
    ],
)
def test_read_json_refuses_garbage_with_one_line(tmp_path, body, message):
    store = ObjectStore.open(str(tmp_path))
    store.put("run/x", body)
    with pytest.raises(ProtocolError) as e:
        objects.read_json(store, "run/x")
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    assert len(str(e.value)) < 300


def test_read_json_is_bounded(tmp_path):
    store = ObjectStore.open(str(tmp_path))
    store.put("run/x", objects.dumps({"pad": "x" * 1000}))
    with pytest.raises(ObjectTooLarge):
        objects.read_json(store, "run/x", max_bytes=100)
    assert objects.read_json(store, "run/x", max_bytes=2000)["pad"] == "x" * 1000


@pytest.mark.parametrize("seed", range(4))
def test_tree_bytes_round_trip_is_exact_and_deterministic(seed):
    tree = random_tree(seed)
    body = objects.tree_bytes(tree)
    assert body == objects.tree_bytes(random_tree(seed))
    back = objects.tree_from_bytes(body, like=tree, where="k")
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(tree), strict=True):
        assert x.dtype == np.float32
        np.testing.assert_array_equal(x.view(np.uint32), y.view(np.uint32))


@pytest.mark.parametrize(
    "like",
    [
        {"a": (3, 5), "b": [(7,), (2, 2, 3)], "c": ()},  # a shape
        {"a": (3, 5), "b": [(7,)], "c": ()},  # a leaf fewer
        {"a": (3, 5), "b": [(7,), (2, 2, 2)], "d": ()},  # a path
    ],
)
def test_tree_from_bytes_refuses_another_structure(like):
    body = objects.tree_bytes(random_tree(0))
    with pytest.raises(ProtocolError) as e:
        objects.tree_from_bytes(body, like=random_tree(1, like), where="run/versions/x")
    assert str(e.value).startswith("run/versions/x: ") and "\n" not in str(e.value)


def test_tree_from_bytes_refuses_other_specs_and_garbage():
    tree = random_tree(0)
    int8 = encode(tree, "int8")[0].to_bytes()
    with pytest.raises(ProtocolError, match="expected fp32"):
        objects.tree_from_bytes(int8, like=tree, where="k")
    decoded = objects.tree_from_bytes_any(int8, like=tree, where="k")
    assert jax.tree.structure(decoded) == jax.tree.structure(tree)
    for garbage in (b"", b"garbage", objects.tree_bytes(tree)[:-3]):
        with pytest.raises(ProtocolError, match="^k: "):
            objects.tree_from_bytes(garbage, like=tree, where="k")
        with pytest.raises(ProtocolError, match="^k: "):
            objects.tree_from_bytes_any(garbage, like=tree, where="k")


def test_tree_from_bytes_bounds_elements_by_like():
    big = {"a": np.zeros((1000,), np.float32)}
    with pytest.raises(ProtocolError, match="max_elements"):
        objects.tree_from_bytes(objects.tree_bytes(big), like={"a": np.zeros(10)}, where="k")


def test_sizes_and_limits():
    tree = random_tree(0)
    assert objects.num_elements(tree) == 15 + 7 + 8 + 1
    assert objects.object_limit(tree) == 8 * 31 + (1 << 20)
    assert len(objects.tree_bytes(tree)) <= objects.object_limit(tree)


def test_get_tree_object_is_bounded_and_turns_damage_into_protocol_errors(tmp_path):
    store = ObjectStore.open(str(tmp_path))
    tree = random_tree(0)
    assert objects.get_tree_object(store, "run/t", tree) is None
    store.put("run/t", objects.tree_bytes(tree))
    assert objects.get_tree_object(store, "run/t", tree) == objects.tree_bytes(tree)
    store.put("run/big", b"x" * (objects.object_limit(tree) + 1))
    with pytest.raises(ProtocolError, match="oversized"):
        objects.get_tree_object(store, "run/big", tree)
    path = tmp_path / "run" / "t"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ProtocolError, match="corrupt object"):
        objects.get_tree_object(store, "run/t", tree)
    assert issubclass(ObjectTooLarge, CorruptObject)


def test_zeros_like_and_as_float32():
    tree = {"a": np.ones((2, 3), np.float64), "b": [np.arange(4)]}
    zeros = objects.zeros_like(tree)
    assert all(z.dtype == np.float32 and not z.any() for z in jax.tree.leaves(zeros))
    assert [z.shape for z in jax.tree.leaves(zeros)] == [(2, 3), (4,)]
    cast = objects.as_float32(tree)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(cast))
    np.testing.assert_array_equal(cast["b"][0], [0, 1, 2, 3])
