"""The codec's format facts and `CompressionSpec`: what config validates and the codec obeys.

This module imports nothing from near_jax, so `near_jax.config` (layer 0) can validate
`diloco.compression` against it, and both `compress` (the numerics) and `payload` (the wire
format) build on it without importing each other in a cycle. The formats themselves are
described in `compress`'s docstring.

    spec = CompressionSpec.parse("int4:block=64+topk=0.1")   # str(spec) round-trips
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

__all__ = [
    "BLOCK_FORMATS",
    "DEFAULT_BLOCK",
    "FORMATS",
    "MAX_BLOCK",
    "NIBBLE_FORMATS",
    "SPEC_GRAMMAR",
    "CompressionSpec",
    "as_spec",
    "bytes_per_value",
    "topk_count",
]

FORMATS = ("fp32", "bf16", "int8", "int4", "fp4")
BLOCK_FORMATS = ("int8", "int4", "fp4")  # formats with one scale per block
NIBBLE_FORMATS = ("int4", "fp4")  # two values per byte
DEFAULT_BLOCK = 128
MAX_BLOCK = 1 << 20

SPEC_GRAMMAR = (
    "expected FORMAT[:block=N][+topk=F] (options in any order, ':' or '+' before each) with "
    f"FORMAT one of {', '.join(FORMATS)}, N an integer in [1, {MAX_BLOCK}] (default "
    f"{DEFAULT_BLOCK}), F a fraction in [0, 1] (0 = off); e.g. 'int8', 'fp4:block=64', "
    "'int4+topk=0.1'"
)


@dataclasses.dataclass(frozen=True)
class CompressionSpec:
    """How to compress a pseudo-gradient; `CompressionSpec.parse("int4:block=64+topk=0.1")`.

    Attributes:
      format: one of FORMATS.
      block_size: values per scale for int8/int4/fp4 (ignored by fp32/bf16).
      topk: fraction of each leaf's entries to send, largest |v| first; 0 sends everything.
    """

    format: str = "int8"
    block_size: int = DEFAULT_BLOCK
    topk: float = 0.0

    def __post_init__(self):
        problem = _spec_problem(self.format, self.block_size, self.topk)
        if problem:
            raise ValueError(f"bad CompressionSpec: {problem}; {SPEC_GRAMMAR}")

    @classmethod
    def parse(cls, text: str) -> CompressionSpec:
        """Parses the short form; see SPEC_GRAMMAR. Raises ValueError naming `text`."""

        def bad(reason: str) -> ValueError:
            return ValueError(f"bad compression spec {text!r}: {reason}; {SPEC_GRAMMAR}")

        if not isinstance(text, str):
            raise bad("not a string")
        fmt, *options = re.split(r"[:+]", text.strip())
        if fmt not in FORMATS:
            raise bad(f"unknown format {fmt!r}")
        given: dict[str, str] = {}
        for option in options:
            key, sep, value = option.partition("=")
            if key not in ("block", "topk") or not sep:
                raise bad(f"unknown option {option!r}")
            if key in given:
                raise bad(f"{key} given twice")
            given[key] = value
        block = given.get("block", str(DEFAULT_BLOCK))
        if not re.fullmatch(r"[0-9]{1,9}", block):
            raise bad(f"block {block!r} is not an integer")
        try:
            topk = float(given.get("topk", "0"))
        except ValueError:
            raise bad(f"topk {given['topk']!r} is not a number") from None
        problem = _spec_problem(fmt, int(block), topk)
        if problem:
            raise bad(problem)
        return cls(fmt, int(block), topk)

    def __str__(self) -> str:
        """The canonical short form: parse(str(spec)) == spec."""
        text = self.format
        if self.block_size != DEFAULT_BLOCK:
            text += f":block={self.block_size}"
        if self.topk:
            text += f"+topk={float(self.topk)!r}"
        return text


def _spec_problem(fmt: Any, block: Any, topk: Any) -> str | None:
    """What is wrong with these spec fields, or None."""
    if fmt not in FORMATS:
        return f"unknown format {fmt!r}"
    if not isinstance(block, int) or isinstance(block, bool) or not 1 <= block <= MAX_BLOCK:
        return f"block {block!r} is not an integer in [1, {MAX_BLOCK}]"
    if not isinstance(topk, int | float) or isinstance(topk, bool) or not 0 <= topk <= 1:
        return f"topk {topk!r} is not a fraction in [0, 1]"
    return None


def as_spec(spec: CompressionSpec | str) -> CompressionSpec:
    """The spec itself, or the parsed short form."""
    return CompressionSpec.parse(spec) if isinstance(spec, str) else spec


def topk_count(n: int, fraction: float) -> int:
    """Entries top-k sends for a leaf of n values: round(fraction·n), half up, within [1, n]."""
    if n == 0:
        return 0
    return min(n, max(1, math.floor(fraction * n + 0.5)))


def bytes_per_value(spec: CompressionSpec | str) -> float:
    """Value + scale bytes per *sent* value (top-k indices and the header not included)."""
    spec = as_spec(spec)
    value = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5, "fp4": 0.5}[spec.format]
    return value + (4.0 / spec.block_size if spec.format in BLOCK_FORMATS else 0.0)
