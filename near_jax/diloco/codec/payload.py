"""The wire format of a compressed pseudo-gradient: `Payload`, its bytes, and their validation.

`compress.encode` builds a Payload (one LeafPayload of numpy buffers per leaf); this module turns
it into bytes and back. Payloads come from untrusted peers, so `Payload.from_bytes` accepts only
what `encode` could have produced and raises `PayloadError` on anything else.

Wire format (version 1, little-endian)
--------------------------------------
    b"NJPG" | u16 version | u32 header length | header: UTF-8 JSON | buffers back to back

    header = {"spec": "int8+topk=0.1",
              "leaves": [{"path": ["layers", "mlp", "wi"], "shape": [4, 512, 2048],
                          "buffers": [["values", "int8", k], ["scales", "float32", ⌈k/B⌉],
                                      ["index", "uint16", k]]}, ...]}

`path` holds the leaf's key path (str for dict keys and attributes, int for sequence indices).
The buffer list must be exactly what the spec and shape imply (`buffer_layout`). Values: one
per element (fp32 float32, bf16 uint16 bits, int8), two 4-bit codes per byte (int4, fp4; low
nibble first), or four 2-bit codes per byte (int2; lowest bits first); unused trailing codes
are 0. Indices (top-k only): per-leaf top-k writes k delta-coded indices in the narrowest of
uint8/16/32/64 that holds the largest; chunked top-k (`chunk=C`) writes k in-chunk positions
as 12-bit fields, two per little-endian 24-bit word, ⌈3k/2⌉ uint8 (an odd k ends with a
16-bit word whose top 4 bits are 0), chunk by chunk. The JSON is compact (no spaces), so
`header_bytes` gives the exact header, and the size of a payload follows from its spec, leaf
paths and shapes, and (per-leaf top-k) index dtypes alone (`fake_quant.payload_bytes`).

`Payload.from_bytes` checks magic, version, sizes, shapes, dtypes, format, buffer lengths, and
values (finite scales, canonical codes, zero padding, in-range indices strictly increasing
within the leaf or chunk), caps the decoded size at `max_elements`, and raises `PayloadError`
on anything else; a payload it returns decodes without error. (Finite but huge values are the
robust aggregator's business, not the codec's.)

The spec (`CompressionSpec`, format names, top-k counts) comes from `spec`, the index coding
from `topk`; the numerics live in `compress`, which imports this module.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import struct
from collections.abc import Iterable
from typing import Any

import numpy as np

from near_jax.diloco.codec.spec import (
    BLOCK_FORMATS,
    CRUMB_FORMATS,
    NIBBLE_FORMATS,
    CompressionSpec,
    chunk_topk_counts,
    sent_count,
)
from near_jax.diloco.codec.topk import INDEX_DTYPES, index12_bytes, unpack_index12

MAGIC = b"NJPG"  # near_jax pseudo-gradient
VERSION = 1
PREFIX = struct.Struct("<4sHI")  # magic, version, header length
MAX_HEADER_BYTES = 16 << 20
MAX_LEAVES = 100_000
MAX_NDIM = 32
MAX_PATH_DEPTH = 64
MAX_KEY_CHARS = 1024
# Decoded float32 elements a payload may claim by default (8 GiB); pass the model's size.
DEFAULT_MAX_ELEMENTS = 1 << 31

VALUE_DTYPE = {  # wire dtype of the values buffer, per format
    "fp32": "float32",
    "bf16": "uint16",
    "int8": "int8",
    "int4": "uint8",
    "fp4": "uint8",
    "int2": "uint8",
}
_DTYPES = {n: np.dtype(n).newbyteorder("<") for n in ("float32", "int8", "uint8", *INDEX_DTYPES)}


class PayloadError(ValueError):
    """A payload is malformed, truncated, oversized, or does not match what it claims."""


# --------------------------------------------------------------------------------- payload


@dataclasses.dataclass(frozen=True, eq=False)
class LeafPayload:
    """One leaf, encoded. `values`: float32 (fp32), uint16 bf16 bits, int8, or uint8 holding two
    4-bit codes (low nibble first) or four 2-bit codes (lowest bits first); `scales`: float32
    per block; `index`: delta-coded indices, or (chunked top-k) packed 12-bit positions."""

    path: tuple[str | int, ...]
    shape: tuple[int, ...]
    values: np.ndarray
    scales: np.ndarray | None = None
    index: np.ndarray | None = None

    def buffers(self) -> list[tuple[str, np.ndarray]]:
        """(name, array) in wire order."""
        named = (("values", self.values), ("scales", self.scales), ("index", self.index))
        return [(name, array) for name, array in named if array is not None]


@dataclasses.dataclass(frozen=True, eq=False)
class Payload:
    """An encoded pseudo-gradient: the spec and one LeafPayload per leaf, in tree order.

    `treedef` (the original tree structure, when it came from `encode`) is not serialized;
    decoding a deserialized payload rebuilds the tree from the leaf paths or from `like`.
    """

    spec: CompressionSpec
    leaves: tuple[LeafPayload, ...]
    treedef: Any = dataclasses.field(default=None, repr=False)

    @functools.cached_property
    def _header(self) -> bytes:
        return header_bytes(
            self.spec,
            [
                (leaf.path, leaf.shape, [(n, a.dtype.name, a.size) for n, a in leaf.buffers()])
                for leaf in self.leaves
            ],
        )

    @property
    def nbytes(self) -> int:
        """Exact serialized size, len(self.to_bytes()): what counts as communication."""
        buffers = sum(a.nbytes for leaf in self.leaves for _, a in leaf.buffers())
        return PREFIX.size + len(self._header) + buffers

    @property
    def num_elements(self) -> int:
        """Values in the decoded tree (fp32 bytes / 4)."""
        return sum(math.prod(leaf.shape) for leaf in self.leaves)

    def to_bytes(self) -> bytes:
        """The wire format described in the module docstring."""
        parts = [PREFIX.pack(MAGIC, VERSION, len(self._header)), self._header]
        for leaf in self.leaves:
            parts += [
                a.astype(_DTYPES[a.dtype.name], copy=False).tobytes() for _, a in leaf.buffers()
            ]
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes, *, max_elements: int = DEFAULT_MAX_ELEMENTS) -> Payload:
        """Parses and fully validates untrusted bytes; raises PayloadError on any defect.

        max_elements caps the decoded size (all leaves together): pass the model's parameter
        count so a small payload cannot make `decode` allocate more than the model.
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise PayloadError(f"payload must be bytes, got {type(data).__name__}")
        try:
            view = memoryview(data).cast("B")
        except TypeError as e:  # e.g. a non-contiguous view
            raise PayloadError(f"payload bytes are not contiguous: {e}") from None
        header, offset = _read_header(view)
        spec = _header_spec(header)
        leaves, total = [], 0
        for i, meta in enumerate(header["leaves"]):
            leaf, offset = _read_leaf(view, offset, meta, spec, f"leaf {i}")
            total += math.prod(leaf.shape)
            if total > max_elements:
                raise PayloadError(f"payload decodes to > {max_elements} elements (max_elements)")
            leaves.append(leaf)
        if offset != view.nbytes:
            raise PayloadError(f"{view.nbytes - offset} trailing bytes after the last buffer")
        tree_from_paths([leaf.path for leaf in leaves], [None] * len(leaves))  # conflicts
        return cls(spec, tuple(leaves))


def header_bytes(
    spec: CompressionSpec, leaves: Iterable[tuple[tuple, tuple[int, ...], list[tuple]]]
) -> bytes:
    """The JSON header for (path, shape, [(buffer name, dtype name, count), ...]) per leaf."""
    header = {
        "spec": str(spec),
        "leaves": [
            {
                "path": list(path),
                "shape": [int(d) for d in shape],
                "buffers": [[name, dtype, int(count)] for name, dtype, count in buffers],
            }
            for path, shape, buffers in leaves
        ],
    }
    return json.dumps(header, separators=(",", ":"), allow_nan=False).encode()


def buffer_layout(spec: CompressionSpec, n: int) -> list[tuple[str, tuple[str, ...], int]]:
    """The buffers a leaf of n values must have: (name, allowed dtypes, element count)."""
    k = sent_count(n, spec)
    per_byte = 4 if spec.format in CRUMB_FORMATS else 2 if spec.format in NIBBLE_FORMATS else 1
    layout = [("values", (VALUE_DTYPE[spec.format],), -(-k // per_byte))]
    if spec.format in BLOCK_FORMATS:
        layout.append(("scales", ("float32",), -(-k // spec.block_size)))
    if spec.topk and spec.chunk:
        layout.append(("index", ("uint8",), index12_bytes(k)))
    elif spec.topk:
        layout.append(("index", INDEX_DTYPES, k))
    return layout


# ------------------------------------------------------------------------------- validation


def _read_header(view: memoryview) -> tuple[dict, int]:
    """(header dict, offset of the first buffer), checking the fixed prefix."""
    if view.nbytes < PREFIX.size:
        raise PayloadError(f"truncated: {view.nbytes} bytes, the prefix alone is {PREFIX.size}")
    magic, version, length = PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise PayloadError(f"bad magic {magic!r}, expected {MAGIC!r}: not a near_jax payload")
    if version != VERSION:
        raise PayloadError(f"unsupported payload version {version}; this reader knows {VERSION}")
    end = PREFIX.size + length
    if length > MAX_HEADER_BYTES or end > view.nbytes:
        raise PayloadError(f"header claims {length} bytes; {view.nbytes - PREFIX.size} remain")

    def no_constants(name: str) -> None:  # NaN / Infinity are not JSON and have no place here
        raise PayloadError(f"header contains {name}")

    try:
        header = json.loads(bytes(view[PREFIX.size : end]).decode(), parse_constant=no_constants)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError too
        if isinstance(e, PayloadError):
            raise
        raise PayloadError(f"header is not UTF-8 JSON: {type(e).__name__}: {e}") from None
    _check_keys(header, {"spec", "leaves"}, "header")
    if not isinstance(header["leaves"], list) or len(header["leaves"]) > MAX_LEAVES:
        raise PayloadError(f"header 'leaves' must be a list of at most {MAX_LEAVES}")
    return header, end


def _check_keys(obj: Any, keys: set[str], where: str) -> None:
    if not isinstance(obj, dict) or set(obj) != keys:
        got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise PayloadError(f"{where} must be an object with keys {sorted(keys)}, got {got}")


def _header_spec(header: dict) -> CompressionSpec:
    try:
        return CompressionSpec.parse(header["spec"])
    except ValueError as e:
        raise PayloadError(f"header spec: {e}") from None


def _read_leaf(
    view: memoryview, offset: int, meta: Any, spec: CompressionSpec, where: str
) -> tuple[LeafPayload, int]:
    """(LeafPayload, offset after its buffers): header entry checked, buffers sliced + checked."""
    _check_keys(meta, {"path", "shape", "buffers"}, where)
    path, shape = _check_path(meta["path"], where), _check_shape(meta["shape"], where)
    expected = buffer_layout(spec, math.prod(shape))
    got = meta["buffers"]
    if not isinstance(got, list) or len(got) != len(expected):
        raise PayloadError(f"{where}: buffers {got!r:.200} do not match {expected}")
    arrays = {}
    for entry, (name, dtypes, count) in zip(got, expected, strict=True):
        ok = isinstance(entry, list) and len(entry) == 3 and entry[0] == name
        if not (ok and entry[1] in dtypes and type(entry[2]) is int and entry[2] == count):
            raise PayloadError(
                f"{where}: buffer {entry!r:.200}, expected [{name!r}, {dtypes}, {count}]"
            )
        dtype = _DTYPES[entry[1]]
        if offset + count * dtype.itemsize > view.nbytes:
            raise PayloadError(f"truncated: {where} {name} needs {count * dtype.itemsize} bytes")
        arrays[name] = np.frombuffer(view, dtype, count, offset).astype(dtype.name)
        offset += count * dtype.itemsize
    leaf = LeafPayload(path, shape, arrays["values"], arrays.get("scales"), arrays.get("index"))
    _check_contents(leaf, spec, where)
    return leaf, offset


def _check_path(raw: Any, where: str) -> tuple[str | int, ...]:
    if not isinstance(raw, list) or len(raw) > MAX_PATH_DEPTH:
        raise PayloadError(f"{where}: path must be a list of at most {MAX_PATH_DEPTH} keys")
    for key in raw:
        ok_str = isinstance(key, str) and len(key) <= MAX_KEY_CHARS
        ok_int = isinstance(key, int) and not isinstance(key, bool) and abs(key) < 2**31
        if not (ok_str or ok_int):
            raise PayloadError(f"{where}: path key {key!r:.100} is not a short str or an int32")
    return tuple(raw)


def _check_shape(raw: Any, where: str) -> tuple[int, ...]:
    if not isinstance(raw, list) or len(raw) > MAX_NDIM:
        raise PayloadError(f"{where}: shape must be a list of at most {MAX_NDIM} dims")
    for dim in raw:
        if not isinstance(dim, int) or isinstance(dim, bool) or not 0 <= dim < 2**62:
            raise PayloadError(f"{where}: shape {raw!r:.200} has a bad dimension {dim!r:.50}")
    if math.prod(raw) >= 2**62:  # a Python int: no overflow; max_elements is checked later
        raise PayloadError(f"{where}: shape {raw!r:.200} is absurdly large")
    return tuple(raw)


def _check_contents(leaf: LeafPayload, spec: CompressionSpec, where: str) -> None:
    """Values decode() relies on: finite numbers, codes the encoder can emit, valid indices."""
    values, fmt = leaf.values, spec.format
    n = math.prod(leaf.shape)
    k = sent_count(n, spec)
    if fmt == "fp32" and not np.isfinite(values).all():
        raise PayloadError(f"{where}: non-finite fp32 values")
    if fmt == "bf16" and ((values & 0x7F80) == 0x7F80).any():
        raise PayloadError(f"{where}: non-finite bf16 values")
    if fmt == "int8" and (values == -128).any():
        raise PayloadError(f"{where}: int8 code -128 (the encoder uses [-127, 127])")
    if fmt in NIBBLE_FORMATS:
        nibbles = np.stack([values & 0xF, values >> 4], axis=-1).reshape(-1)  # low nibble first
        if (nibbles[:k] == 8).any():  # int4 -8 or fp4 "-0": never emitted
            raise PayloadError(f"{where}: {fmt} code 8 is not canonical")
        if (nibbles[k:] != 0).any():
            raise PayloadError(f"{where}: padding nibble is not 0")
    if fmt in CRUMB_FORMATS:  # every 2-bit code is a level; only the padding can be wrong
        crumbs = (values[:, None] >> np.array([0, 2, 4, 6], np.uint8)) & 3
        if (crumbs.reshape(-1)[k:] != 0).any():
            raise PayloadError(f"{where}: padding bits of the {fmt} values are not 0")
    if leaf.scales is not None and not (np.isfinite(leaf.scales) & (leaf.scales >= 0)).all():
        raise PayloadError(f"{where}: scales must be finite and >= 0")
    if leaf.index is not None and spec.chunk:
        _check_chunk_index(leaf.index, n, spec, where)
    elif leaf.index is not None and leaf.index.size:
        _check_index(leaf.index, n, where)


def _check_index(gaps: np.ndarray, n: int, where: str) -> None:
    """Delta-coded indices must land strictly increasing inside [0, n)."""
    # Each step is 1 + gap <= n < 2**62, so a uint64 cumsum that wraps would decrease.
    if int(gaps.max()) >= n:
        raise PayloadError(f"{where}: index gap {int(gaps.max())} out of range for {n} values")
    index = np.cumsum(gaps.astype(np.uint64) + np.uint64(1)) - np.uint64(1)
    if (index[1:] <= index[:-1]).any() or int(index[-1]) >= n:
        raise PayloadError(f"{where}: indices run past the {n} values of the leaf")


def _check_chunk_index(packed: np.ndarray, n: int, spec: CompressionSpec, where: str) -> None:
    """Chunked top-k: per chunk, k_c positions strictly increasing below the chunk's length;
    the padding slot (odd counts) is 0."""
    full, k_full, tail, k_tail = chunk_topk_counts(n, spec.chunk, spec.topk)
    k = full * k_full + k_tail
    slots = unpack_index12(packed)
    if (slots[k:] != 0).any():
        raise PayloadError(f"{where}: index padding slot is not 0")
    head_CK = slots[: full * k_full].astype(np.int64).reshape(full, k_full)
    tail_K = slots[full * k_full : k].astype(np.int64)
    for positions, length, what in ((head_CK, spec.chunk, "chunk"), (tail_K, tail, "last chunk")):
        if positions.size and (positions >= length).any():
            raise PayloadError(f"{where}: index out of range for a {what} of {length} values")
        if (np.diff(positions, axis=-1) <= 0).any():
            raise PayloadError(f"{where}: indices within a {what} are not strictly increasing")


# ------------------------------------------------------------------------------------ trees


def tree_from_paths(paths: list[tuple], arrays: list) -> Any:
    """Nested dicts from key paths (lists where the keys are exactly 0..n-1)."""
    if len(paths) == 1 and paths[0] == ():
        return arrays[0]
    root: dict = {}
    for path, array in zip(paths, arrays, strict=True):
        node = root
        for key in path[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise PayloadError(f"leaf path {list(path)} runs through another leaf")
        if not path or path[-1] in node:
            raise PayloadError(f"leaf path {list(path)} is repeated or clashes with another")
        node[path[-1]] = array
    return _listify(root)


def _listify(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    node = {key: _listify(child) for key, child in node.items()}
    if (
        node
        and all(isinstance(key, int) for key in node)
        and sorted(node) == list(range(len(node)))
    ):
        return [node[i] for i in range(len(node))]
    return node
