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
        ("int2", CompressionSpec("int2")),
        ("int2:chunk=4096+topk=0.01", CompressionSpec("int2", 128, 0.01, 4096)),
        ("int2+topk=0.03:chunk=2", CompressionSpec("int2", 128, 0.03, 2)),
        ("int4+chunk=64+block=32+topk=1", CompressionSpec("int4", 32, 1.0, 64)),
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


@pytest.mark.parametrize(
    "text,canonical",
    [
        ("int2+topk=0.01:chunk=4096", "int2:chunk=4096+topk=0.01"),
        ("int4+topk=0.05+chunk=100:block=32", "int4:block=32:chunk=100+topk=0.05"),
        ("int8:block=128+topk=0.1", "int8+topk=0.1"),
    ],
)
def test_str_is_canonical(text, canonical):
    assert str(CompressionSpec.parse(text)) == canonical


@pytest.mark.parametrize(
    "text",
    ["int2:chunk=64", "int2:chunk=64+topk=0", "int2:chunk=1+topk=0.1", "int2:chunk=0+topk=0.1"]
    + ["int2:chunk=4097+topk=0.1", "int2:chunk=1.5+topk=0.1", "int2:chunk=-8+topk=0.1"]
    + ["int2:chunk+topk=0.1", "int2:chunk=8:chunk=8+topk=0.1", "int2:chunk=8+topk=0.1+x=1"],
)
def test_bad_chunk_options_are_one_line_errors_naming_the_allowed_values(text):
    with pytest.raises(ValueError) as info:
        CompressionSpec.parse(text)
    message = str(info.value)
    assert repr(text) in message and "\n" not in message
    assert "[2, 4096]" in message and "only with F > 0" in message  # the grammar's chunk part
    assert "fp32, bf16, int8, int4, fp4, int2" in message


def test_chunk_without_topk_says_why():
    with pytest.raises(ValueError, match="chunk=64 needs topk > 0"):
        CompressionSpec.parse("int2:chunk=64")


def test_spec_fields_are_validated():
    with pytest.raises(ValueError, match="format"):
        CompressionSpec("int3")
    with pytest.raises(ValueError, match="block"):
        CompressionSpec("int8", block_size=True)
    with pytest.raises(ValueError, match="topk"):
        CompressionSpec("int8", topk=math.inf)
    for chunk in (True, 1, 4097, 64.0, -2):
        with pytest.raises(ValueError, match=r"chunk .* is not an integer in \[2, 4096\]"):
            CompressionSpec("int2", topk=0.1, chunk=chunk)
    with pytest.raises(ValueError, match="needs topk"):
        CompressionSpec("int2", chunk=64)
    assert CompressionSpec("int2", topk=0.1, chunk=4096).chunk == 4096
