"""Tests of near_jax.diloco.codec.payload: the wire format, exact round trips, and every way
an untrusted payload can be malformed (each raises PayloadError)."""

import json
import math

import jax
import numpy as np
import pytest
from helpers import delta, params_like_tree

from near_jax.diloco.codec.compress import decode, encode
from near_jax.diloco.codec.payload import MAGIC, PREFIX, VERSION, Payload, PayloadError
from near_jax.diloco.codec.spec import CompressionSpec

SPECS = ["fp32", "bf16", "int8", "int4:block=32", "fp4", "int8+topk=0.1", "fp4:block=64+topk=0.3"]
SPECS += ["int2", "int2:block=32+topk=0.1", "int2:chunk=64+topk=0.1", "int4:chunk=7+topk=0.3"]


@pytest.mark.parametrize("spec", SPECS)
def test_serialization_round_trip_is_exact(spec):
    tree = params_like_tree()
    payload, _ = encode(tree, spec)
    blob = payload.to_bytes()
    assert payload.nbytes == len(blob)
    back = Payload.from_bytes(blob)
    assert back.spec == payload.spec and back.to_bytes() == blob
    for a, b in zip(payload.leaves, back.leaves, strict=True):
        assert (a.path, a.shape) == (b.path, b.shape)
        for (name_a, buf_a), (name_b, buf_b) in zip(a.buffers(), b.buffers(), strict=True):
            assert name_a == name_b and buf_a.dtype == buf_b.dtype
            np.testing.assert_array_equal(buf_a, buf_b)
    # Rebuilt from paths (nested dicts, lists where keys are 0..n-1), or shaped like `like`.
    expected = decode(payload)
    for got in (decode(back), decode(back, like=tree)):
        assert jax.tree.structure(got) == jax.tree.structure(tree)
        jax.tree.map(np.testing.assert_array_equal, got, expected)
    assert encode(tree, spec)[0].to_bytes() == blob  # deterministic


# ---------------------------------------------------------------------- malformed payloads


def valid_blob(spec="int8+topk=0.25"):
    tree = {"a": delta((3, 100)), "b": [delta((7,), 1)]}
    return encode(tree, spec)[0].to_bytes()


def split(blob):
    _, _, length = PREFIX.unpack_from(blob)
    start = PREFIX.size
    return json.loads(blob[start : start + length]), blob[start + length :]


def join(header, data, magic=MAGIC, version=VERSION):
    text = json.dumps(header).encode() if isinstance(header, dict) else header
    return PREFIX.pack(magic, version, len(text)) + text + data


def edit_header(change):
    def mutate(blob):
        header, data = split(blob)
        change(header)
        return join(header, data)

    return mutate


def poke(leaf, name, value_bytes, spec="int8+topk=0.25", at=0, mask=None):
    """Overwrites a buffer's bytes from byte `at` (negative: from its end) with `value_bytes`,
    or ORs `mask` into the byte there."""

    def mutate(_):
        blob = valid_blob(spec)
        header, data = split(blob)
        offset = 0
        for i, meta in enumerate(header["leaves"]):
            for buf_name, dtype, count in meta["buffers"]:
                size = np.dtype(dtype).itemsize * count
                if (i, buf_name) == (leaf, name):
                    start = offset + (at if at >= 0 else size + at)
                    new = value_bytes if mask is None else bytes([data[start] | mask])
                    assert start + len(new) <= offset + size
                    data = data[:start] + new + data[start + len(new) :]
                    return join(header, data)
                offset += size
        raise AssertionError("no such buffer")

    return mutate


def set_leaf(key, value, leaf=0):
    return edit_header(lambda h: h["leaves"][leaf].__setitem__(key, value))


def set_buffer(position, value, buffer=0):
    return edit_header(lambda h: h["leaves"][0]["buffers"][buffer].__setitem__(position, value))


MALFORMED = {
    "empty": lambda b: b"",
    "truncated_prefix": lambda b: b[:7],
    "truncated_header": lambda b: b[: PREFIX.size + 20],
    "truncated_data": lambda b: b[:-1],
    "truncated_mid_data": lambda b: b[:-100],
    "trailing_bytes": lambda b: b + b"\0",
    "bad_magic": lambda b: b"XXXX" + b[4:],
    "bad_version": lambda b: join(*split(b), version=2),
    "header_length_huge": lambda b: PREFIX.pack(MAGIC, 1, 2**32 - 1) + b[10:],
    "header_not_json": lambda b: join(b"{not json", split(b)[1]),
    "header_not_utf8": lambda b: join(b'{"spec": "\xff"}', split(b)[1]),
    "header_deeply_nested": lambda b: join(b"[" * 200_000, split(b)[1]),
    "header_not_object": lambda b: join(b"[]", split(b)[1]),
    "header_extra_key": edit_header(lambda h: h.__setitem__("extra", 1)),
    "header_missing_leaves": edit_header(lambda h: h.pop("leaves")),
    "unknown_format": edit_header(lambda h: h.__setitem__("spec", "int3")),
    "spec_not_string": edit_header(lambda h: h.__setitem__("spec", 8)),
    "spec_changed_block": edit_header(lambda h: h.__setitem__("spec", "int8:block=64+topk=0.25")),
    "huge_shape": set_leaf("shape", [2**40]),
    "huge_shape_product": set_leaf("shape", [2**20, 2**20, 2**20]),
    "shape_over_max_elements": set_leaf("shape", [2**31 + 1]),
    "negative_dim": set_leaf("shape", [-3, -100]),
    "float_dim": set_leaf("shape", [3.0, 100]),
    "nan_dim": set_leaf("shape", [math.nan, 100]),
    "bool_dim": set_leaf("shape", [True, 300]),
    "too_many_dims": set_leaf("shape", [1] * 40 + [300]),
    "shape_not_list": set_leaf("shape", "3x100"),
    "leaf_missing_key": edit_header(lambda h: h["leaves"][0].pop("path")),
    "path_bad_key": set_leaf("path", ["a", 1.5]),
    "path_null_key": set_leaf("path", [None]),
    "path_duplicate": set_leaf("path", ["b", 0], leaf=0),
    "path_through_leaf": set_leaf("path", ["a", "x"], leaf=1),
    "buffer_count_longer": set_buffer(2, 76),
    "buffer_count_shorter": set_buffer(2, 74),
    "buffer_count_float": set_buffer(2, 75.0),
    "buffer_dtype_wrong": set_buffer(1, "float32"),
    "buffer_name_wrong": set_buffer(0, "scales"),
    "buffer_missing": edit_header(lambda h: h["leaves"][0]["buffers"].pop()),
    "buffer_extra": edit_header(lambda h: h["leaves"][0]["buffers"].append(["x", "uint8", 1])),
    "index_dtype_not_index": set_buffer(1, "int8", buffer=2),
    "nan_scale": poke(0, "scales", np.float32(np.nan).tobytes()),
    "negative_scale": poke(0, "scales", np.float32(-1).tobytes()),
    "int8_code_minus_128": poke(0, "values", b"\x80"),
    "int4_code_minus_8": poke(0, "values", b"\x08", spec="int4"),
    "fp4_negative_zero": poke(0, "values", b"\x80", spec="fp4"),
    "nibble_padding_not_zero": poke(1, "values", b"\x00\x00\x00\xf0", spec="int4"),
    "int2_crumb_padding_not_zero": poke(1, "values", b"", spec="int2", at=-1, mask=0x40),
    "fp32_inf": poke(0, "values", np.float32(np.inf).tobytes(), spec="fp32"),
    "bf16_inf": poke(0, "values", b"\x80\x7f", spec="bf16"),
    "index_gap_out_of_range": poke(1, "index", b"\xff", spec="fp32+topk=0.5"),
    "index_runs_past_end": poke(0, "index", b"\xff\x00", spec="int8+topk=0.25"),
}


# Chunked top-k, `valid_blob(CHUNKED)`: leaf 0 (300 values) has 4 chunks of 64 sending 16 each
# and a last chunk of 44 sending 11: 75 positions, 113 index bytes (an odd count: the last
# 12-bit slot is padding, 4 of its bits sent); leaf 1 (7 values) is one short chunk sending 2.
CHUNKED = "int2:chunk=64+topk=0.25"


def word(p0, p1):
    """Two 12-bit slots as the 3 little-endian bytes of p0 | p1 << 12."""
    return (p0 | p1 << 12).to_bytes(3, "little")


MALFORMED_CHUNKED = {  # name: (mutation of valid_blob(CHUNKED), what the error says)
    "index_repeated": (poke(0, "index", word(5, 5), CHUNKED), "not strictly increasing"),
    "index_decreasing": (poke(0, "index", word(6, 5), CHUNKED), "not strictly increasing"),
    # slots 16 and 17 (bytes 24..26): chunk 1's first two positions, 9 then 3
    "index_decreasing_mid_chunk": (
        poke(0, "index", word(9, 3), CHUNKED, at=24),
        "not strictly increasing",
    ),
    "index_past_chunk": (poke(0, "index", word(64, 65), CHUNKED), "out of range for a chunk"),
    "index_4095": (poke(0, "index", word(4094, 4095), CHUNKED), "out of range for a chunk"),
    "index_past_last_chunk": (
        poke(1, "index", word(6, 7), CHUNKED),
        "out of range for a last chunk of 7",
    ),
    "index_padding_slot": (poke(0, "index", b"", CHUNKED, at=-1, mask=0x10), "padding slot"),
    "index_padding_high_bit": (poke(0, "index", b"", CHUNKED, at=-1, mask=0x80), "padding slot"),
    "int2_padding_bits": (poke(1, "values", b"", CHUNKED, at=-1, mask=0x10), "padding bits"),
    "int2_padding_top_bits": (poke(1, "values", b"", CHUNKED, at=-1, mask=0xC0), "padding bits"),
    "index_count_longer": (set_buffer(2, 114, buffer=2), "expected"),
    "index_count_shorter": (set_buffer(2, 112, buffer=2), "expected"),
    "index_count_of_positions": (set_buffer(2, 75, buffer=2), "expected"),
    "index_dtype_uint16": (set_buffer(1, "uint16", buffer=2), "expected"),
    "values_count_wrong": (set_buffer(2, 20, buffer=0), "expected"),
    "scales_count_wrong": (set_buffer(2, 2, buffer=1), "expected"),
    "chunk_without_topk": (edit_header(lambda h: h.__setitem__("spec", "int2:chunk=64")), "topk"),
    "chunk_too_big": (
        edit_header(lambda h: h.__setitem__("spec", "int2:chunk=8192+topk=0.25")),
        "chunk",
    ),
    "relabeled_per_leaf": (
        edit_header(lambda h: h.__setitem__("spec", "int2+topk=0.25")),
        "expected",
    ),
    "relabeled_dense": (edit_header(lambda h: h.__setitem__("spec", "int2")), "do not match"),
    "truncated_index": (lambda b: b[:-1], "truncated"),
}


def test_chunked_malformed_cases_start_from_a_valid_payload():
    blob = valid_blob(CHUNKED)
    payload = Payload.from_bytes(blob)
    assert payload.spec == CompressionSpec("int2", topk=0.25, chunk=64)
    header, _ = split(blob)
    assert header["leaves"][0]["buffers"] == [
        ["values", "uint8", 19],
        ["scales", "float32", 1],
        ["index", "uint8", 113],
    ]
    assert header["leaves"][1]["buffers"][2] == ["index", "uint8", 3]
    # The bytes poked above hold what the comments say.
    leaf0, leaf1 = payload.leaves
    assert leaf0.index[-1] >> 4 == 0 and leaf1.values[-1] >> 4 == 0  # padding: zeros
    assert leaf1.index[0] | (leaf1.index[1] & 0xF) << 8 < 6  # the first position, < 6


@pytest.mark.parametrize("name", sorted(MALFORMED_CHUNKED))
def test_chunked_malformed_payloads_raise_payload_error(name):
    mutate, match = MALFORMED_CHUNKED[name]
    with pytest.raises(PayloadError, match=match):
        Payload.from_bytes(mutate(valid_blob(CHUNKED)))


def test_malformed_cases_start_from_a_valid_payload():
    assert Payload.from_bytes(valid_blob()).spec == CompressionSpec("int8", topk=0.25)
    header, _ = split(valid_blob())
    assert header["leaves"][0]["buffers"][0] == ["values", "int8", 75]
    assert header["leaves"][0]["buffers"][2][1] == "uint8"  # index gaps fit a byte


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_payloads_raise_payload_error(name):
    blob = MALFORMED[name](valid_blob())
    with pytest.raises(PayloadError):
        Payload.from_bytes(blob)


def test_max_elements_caps_the_decoded_size():
    blob = valid_blob()
    assert Payload.from_bytes(blob, max_elements=307).num_elements == 307
    with pytest.raises(PayloadError, match="max_elements"):
        Payload.from_bytes(blob, max_elements=306)


def test_a_tiny_topk_payload_cannot_claim_a_huge_leaf():
    # k = round(1e-10·n) = 1 for n up to 5e9, so this header is self-consistent: only the
    # element cap stops a ~100-byte payload from decoding into 8 GiB.
    header, data = split(encode({"a": delta((3, 100))}, "fp32+topk=1e-10")[0].to_bytes())
    header["leaves"][0]["shape"] = [2**31 + 1]
    with pytest.raises(PayloadError, match="max_elements"):
        Payload.from_bytes(join(header, data))
    header["leaves"][0]["shape"] = [2**20]
    assert Payload.from_bytes(join(header, data)).num_elements == 2**20


def test_from_bytes_rejects_non_bytes():
    with pytest.raises(PayloadError, match="bytes"):
        Payload.from_bytes("NJPG")
