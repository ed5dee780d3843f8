"""The codec's format facts and `CompressionSpec`: what config validates and the codec obeys.

This module imports nothing from near_jax, so `near_jax.config` (layer 0) can validate
`diloco.compression` against it, and both `compress` (the numerics) and `payload` (the wire
format) build on it without importing each other in a cycle. The formats themselves are
described in `compress`'s docstring.

    spec = CompressionSpec.parse("int4:block=64+topk=0.1")   # str(spec) round-trips
    spec = CompressionSpec.parse("int2:chunk=4096+topk=0.01") # top-k per chunk of 4096 values
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

__all__ = [
    "BLOCK_FORMATS",
    "CRUMB_FORMATS",
    "DEFAULT_BLOCK",
    "FORMATS",
    "MAX_BLOCK",
    "MAX_CHUNK",
    "MIN_CHUNK",
    "NIBBLE_FORMATS",
    "SPEC_GRAMMAR",
    "CompressionSpec",
    "as_spec",
    "bytes_per_value",
    "chunk_topk_counts",
    "sent_count",
    "topk_count",
]

FORMATS = ("fp32", "bf16", "int8", "int4", "fp4", "int2")
BLOCK_FORMATS = ("int8", "int4", "fp4", "int2")  # formats with one scale per block
NIBBLE_FORMATS = ("int4", "fp4")  # two values per byte
CRUMB_FORMATS = ("int2",)  # four values per byte
DEFAULT_BLOCK = 128
MAX_BLOCK = 1 << 20
# Chunked top-k sends in-chunk positions in 12 bits, so a chunk holds at most 2¹² values;
# a chunk of 1 would send every value (k_c ≥ 1) and is refused as a mistake.
MIN_CHUNK, MAX_CHUNK = 2, 1 << 12

SPEC_GRAMMAR = (
    "expected FORMAT[:block=N][:chunk=C][+topk=F] (options in any order, ':' or '+' before "
    f"each) with FORMAT one of {', '.join(FORMATS)}, N an integer in [1, {MAX_BLOCK}] (default "
    f"{DEFAULT_BLOCK}), F a fraction in [0, 1] (0 = off), C an integer in [{MIN_CHUNK}, "
    f"{MAX_CHUNK}] (top-k per chunk of C values; only with F > 0); e.g. 'int8', "
    "'fp4:block=64', 'int4+topk=0.1', 'int2:chunk=4096+topk=0.01'"
)


@dataclasses.dataclass(frozen=True)
class CompressionSpec:
    """How to compress a pseudo-gradient; `CompressionSpec.parse("int4:block=64+topk=0.1")`.

    Attributes:
      format: one of FORMATS.
      block_size: values per scale for int8/int4/fp4 (ignored by fp32/bf16).
      topk: fraction of each leaf's entries to send, largest |v| first; 0 sends everything.
      chunk: 0 = top-k over each whole leaf; C > 0 = top-k within each chunk of C consecutive
        values of the (flattened) leaf, in-chunk positions sent in 12 bits (needs topk > 0).
    """

    format: str = "int8"
    block_size: int = DEFAULT_BLOCK
    topk: float = 0.0
    chunk: int = 0

    def __post_init__(self):
        problem = _spec_problem(self.format, self.block_size, self.topk, self.chunk)
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
            if key not in ("block", "topk", "chunk") or not sep:
                raise bad(f"unknown option {option!r}")
            if key in given:
                raise bad(f"{key} given twice")
            given[key] = value
        block = given.get("block", str(DEFAULT_BLOCK))
        if not re.fullmatch(r"[0-9]{1,9}", block):
            raise bad(f"block {block!r} is not an integer")
        chunk = given.get("chunk", "0")
        if not re.fullmatch(r"[0-9]{1,9}", chunk) or ("chunk" in given and int(chunk) == 0):
            raise bad(f"chunk {chunk!r} is not an integer in [{MIN_CHUNK}, {MAX_CHUNK}]")
        try:
            topk = float(given.get("topk", "0"))
        except ValueError:
            raise bad(f"topk {given['topk']!r} is not a number") from None
        problem = _spec_problem(fmt, int(block), topk, int(chunk))
        if problem:
            raise bad(problem)
        return cls(fmt, int(block), topk, int(chunk))

    def __str__(self) -> str:
        """The canonical short form: parse(str(spec)) == spec."""
        text = self.format
        if self.block_size != DEFAULT_BLOCK:
            text += f":block={self.block_size}"
        if self.chunk:
            text += f":chunk={self.chunk}"
        if self.topk:
            text += f"+topk={float(self.topk)!r}"
        return text


def _spec_problem(fmt: Any, block: Any, topk: Any, chunk: Any = 0) -> str | None:
    """What is wrong with these spec fields, or None."""
    if fmt not in FORMATS:
        return f"unknown format {fmt!r}"
    if not isinstance(block, int) or isinstance(block, bool) or not 1 <= block <= MAX_BLOCK:
        return f"block {block!r} is not an integer in [1, {MAX_BLOCK}]"
    if not isinstance(topk, int | float) or isinstance(topk, bool) or not 0 <= topk <= 1:
        return f"topk {topk!r} is not a fraction in [0, 1]"
    if not isinstance(chunk, int) or isinstance(chunk, bool):
        return f"chunk {chunk!r} is not an integer in [{MIN_CHUNK}, {MAX_CHUNK}]"
    if chunk and not MIN_CHUNK <= chunk <= MAX_CHUNK:
        return f"chunk {chunk!r} is not an integer in [{MIN_CHUNK}, {MAX_CHUNK}]"
    if chunk and not topk:
        return f"chunk={chunk} needs topk > 0 (it chunks top-k; dense formats have no chunks)"
    return None


def as_spec(spec: CompressionSpec | str) -> CompressionSpec:
    """The spec itself, or the parsed short form."""
    return CompressionSpec.parse(spec) if isinstance(spec, str) else spec


def topk_count(n: int, fraction: float) -> int:
    """Entries top-k sends for a leaf of n values: round(fraction·n), half up, within [1, n]."""
    if n == 0:
        return 0
    return min(n, max(1, math.floor(fraction * n + 0.5)))


def chunk_topk_counts(n: int, chunk: int, fraction: float) -> tuple[int, int, int, int]:
    """Chunked top-k of a leaf of n values: (full chunks, entries sent per full chunk, length
    of the shorter last chunk (0: none), entries it sends); sends full·k_full + k_tail."""
    full, tail = divmod(n, chunk)
    return full, topk_count(chunk, fraction), tail, topk_count(tail, fraction)


def sent_count(n: int, spec: CompressionSpec) -> int:
    """Values a leaf of n sends: n, top-k's k, or chunked top-k's total over its chunks."""
    if not spec.topk:
        return n
    if not spec.chunk:
        return topk_count(n, spec.topk)
    full, k_full, _, k_tail = chunk_topk_counts(n, spec.chunk, spec.topk)
    return full * k_full + k_tail


def bytes_per_value(spec: CompressionSpec | str) -> float:
    """Value + scale bytes per *sent* value (top-k indices and the header not included)."""
    spec = as_spec(spec)
    value = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5, "fp4": 0.5, "int2": 0.25}
    value = value[spec.format]
    return value + (4.0 / spec.block_size if spec.format in BLOCK_FORMATS else 0.0)
