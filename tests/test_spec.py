"""Tests of near_jax.diloco.codec.spec: CompressionSpec strings and fields."""

import math

import pytest

from near_jax.diloco.codec.spec import CompressionSpec


@pytest.mark.parametrize(
    "text,spec",
    [
        ("fp32", CompressionSpec("fp32", 128, 0.0)),
        ("int8", CompressionSpec("int8")),
        (" bf16 ", CompressionSpec("bf16")),
        ("fp4:block=64", CompressionSpec("fp4", 64)),
        ("int4+topk=0.1", CompressionSpec("int4", 128, 0.1)),
        ("int8:block=32+topk=0.05", CompressionSpec("int8", 32, 0.05)),
        ("int8+topk=0.05:block=32", CompressionSpec("int8", 32, 0.05)),
        ("fp4+topk=1e-3", CompressionSpec("fp4", 128, 0.001)),
        ("int8+topk=0", CompressionSpec("int8")),
    ],
)
def test_spec_parsing(text, spec):
    parsed = CompressionSpec.parse(text)
    assert parsed == spec
    assert CompressionSpec.parse(str(parsed)) == parsed


@pytest.mark.parametrize(
    "text",
    ["", "int3", "INT8", "int8:", "int8:block=0", "int8:block=-1", "int8:block=1.5"]
    + ["int8:block=99999999", "int8:blk=4", "int8:block", "int8+topk=2", "int8+topk=-0.1"]
    + ["int8+topk=nan", "int8+topk=inf", "int8+topk=x", "int8:block=64:block=32", "int8 int4"],
)
def test_bad_spec_strings_name_the_string_and_the_grammar(text):
    with pytest.raises(ValueError) as info:
        CompressionSpec.parse(text)
    assert repr(text) in str(info.value)
    assert "fp32, bf16, int8, int4, fp4" in str(info.value)


def test_spec_fields_are_validated():
    with pytest.raises(ValueError, match="format"):
        CompressionSpec("int3")
    with pytest.raises(ValueError, match="block"):
        CompressionSpec("int8", block_size=True)
    with pytest.raises(ValueError, match="topk"):
        CompressionSpec("int8", topk=math.inf)
