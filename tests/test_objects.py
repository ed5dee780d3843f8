"""Tests of near_jax.diloco.protocol.objects: canonical JSON, bounded reads, float32 trees."""

import json

import helpers
import jax
import numpy as np
import pytest

from near_jax.diloco.codec.compress import Payload, decode
from near_jax.diloco.protocol import objects
from near_jax.diloco.protocol.keys import ProtocolError
from near_jax.diloco.store import ObjectStore, ObjectTooLarge

SHAPES = {"a": (3, 5), "b": [(7,), (2, 2, 2)], "c": ()}


def random_tree(seed, shapes=SHAPES):
    return helpers.random_tree(seed, shapes)


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
    back = decode(Payload.from_bytes(body), like=tree)
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(tree), strict=True):
        assert x.dtype == np.float32
        np.testing.assert_array_equal(x.view(np.uint32), y.view(np.uint32))


def test_num_elements():
    assert objects.num_elements(random_tree(0)) == 15 + 7 + 8 + 1
    assert objects.num_elements({}) == 0


def test_zeros_like_and_as_float32():
    tree = {"a": np.ones((2, 3), np.float64), "b": [np.arange(4)]}
    zeros = objects.zeros_like(tree)
    assert all(z.dtype == np.float32 and not z.any() for z in jax.tree.leaves(zeros))
    assert [z.shape for z in jax.tree.leaves(zeros)] == [(2, 3), (4,)]
    cast = objects.as_float32(tree)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(cast))
    np.testing.assert_array_equal(cast["b"][0], [0, 1, 2, 3])
