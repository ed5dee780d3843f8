"""How a run cuts its params into shards: the plan, and trees as per-shard lists of pieces.

Every object that holds a whole model — a version's params, momentum and error feedback, a
contribution, an update — is stored as one object per shard plus a small manifest of their
sha256 (`manifests.py`), so no party ever has to read, hash or hold the whole model at once.

The plan is a pure function of the params' shapes, `shard_bytes` and the split axes, all
recorded in run.json, so every party (islands of any size, aggregator workers, replays)
cuts the same shards and computes the same bits:

  - leaves are taken in tree order (`jax.tree.flatten`); a leaf whose float32 bytes are at
    most `shard_bytes` joins the current shard while that stays within `shard_bytes`, else
    it starts a new one;
  - a larger leaf is cut along its split axis (the axis FSDP shards, so a host of a
    multi-host island holds whole slices; 0 when none is given) into 2^k equal slices, the
    fewest whose float32 bytes fit `shard_bytes` (capped at the axis length: a slice is at
    least one index thick). Powers of two nest: a slice lies inside one host's block
    whenever the host count is a power of two up to 2^k dividing the axis.

A shard's data is a list of numpy arrays, one per piece (a whole leaf or one slice), in
plan order: the codec encodes it as one payload whose leaves are its pieces.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np

DEFAULT_SHARD_BYTES = 64 << 20
MIN_SHARD_BYTES = 64


@dataclasses.dataclass(frozen=True)
class Piece:
    """One leaf, or the slice [start, stop) of it along `axis`."""

    leaf: int
    axis: int
    start: int
    stop: int
    whole: bool

    def index(self, ndim: int) -> tuple[slice, ...]:
        """The numpy index of this piece in its leaf."""
        if self.whole:
            return (slice(None),) * ndim
        out = [slice(None)] * ndim
        out[self.axis] = slice(self.start, self.stop)
        return tuple(out)


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """The shards of a run's params (see the module docstring)."""

    shard_bytes: int
    paths: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    axes: tuple[int, ...]
    shards: tuple[tuple[Piece, ...], ...]
    treedef: Any = dataclasses.field(compare=False, repr=False)

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    def piece_shape(self, piece: Piece) -> tuple[int, ...]:
        shape = list(self.shapes[piece.leaf])
        if not piece.whole:
            shape[piece.axis] = piece.stop - piece.start
        return tuple(shape)

    def shard_like(self, s: int) -> list[jax.ShapeDtypeStruct]:
        """The pieces of shard `s` as shapes (the `like` of its decoded payload)."""
        return [jax.ShapeDtypeStruct(self.piece_shape(p), np.float32) for p in self.shards[s]]

    def shard_elements(self, s: int) -> int:
        return sum(math.prod(self.piece_shape(p)) for p in self.shards[s])

    def max_shard_elements(self) -> int:
        return max((self.shard_elements(s) for s in range(self.num_shards)), default=0)

    def split(self, tree: Any, shards: Iterable[int] | None = None) -> dict[int, list[np.ndarray]]:
        """{shard: its pieces} of a full tree shaped like the params (views, not copies)."""
        leaves = jax.tree.leaves(tree)
        if len(leaves) != len(self.shapes):
            raise ValueError(f"tree has {len(leaves)} leaves, the shard plan {len(self.shapes)}")
        out = {}
        for s in range(self.num_shards) if shards is None else shards:
            out[s] = [
                np.asarray(leaves[p.leaf])[p.index(len(self.shapes[p.leaf]))]
                for p in self.shards[s]
            ]
        return out

    def assemble(self, pieces: Mapping[int, list[np.ndarray]]) -> Any:
        """The full float32 tree from the pieces of every shard."""
        if set(pieces) != set(range(self.num_shards)):
            missing = sorted(set(range(self.num_shards)) - set(pieces))
            raise ValueError(f"cannot assemble the tree: shards {missing[:8]} are missing")
        leaves = [np.empty(shape, np.float32) for shape in self.shapes]
        for s, shard in enumerate(self.shards):
            for piece, array in zip(shard, pieces[s], strict=True):
                leaves[piece.leaf][piece.index(len(self.shapes[piece.leaf]))] = array
        return jax.tree.unflatten(self.treedef, leaves)

    def fragment(self, fragments: int, r: int) -> tuple[int, ...]:
        """The shards round r syncs when the run streams `fragments` F fragments: the r mod F
        -th of F contiguous, near-equal groups of shards (tree order), so each shard is
        synced once every F rounds. F = 1: every shard, every round."""
        if not 1 <= fragments <= self.num_shards:
            raise ValueError(
                f"{fragments} fragments need 1 to {self.num_shards} shards (the plan's); "
                "lower diloco.shard_bytes or diloco.fragments"
            )
        f = r % fragments
        lo, hi = f * self.num_shards // fragments, (f + 1) * self.num_shards // fragments
        return tuple(range(lo, hi))

    def describe(self) -> dict:
        """What run.json records so that every party rebuilds this plan (`from_record`)."""
        return {
            "shard_bytes": self.shard_bytes,
            "axes": dict(zip(self.paths, self.axes, strict=True)),
        }

    def plan_id(self) -> str:
        """sha256 of the shapes, paths and pieces: equal ids, equal shards."""
        body = json.dumps(
            [self.paths, self.shapes, [[dataclasses.astuple(p) for p in s] for s in self.shards]],
            separators=(",", ":"),
        )
        return hashlib.sha256(body.encode()).hexdigest()


def leaf_paths(like: Any) -> list[str]:
    """Readable, unique names of the leaves in tree order ("['layers']['wq']")."""
    return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(like)[0]]


def plan_shards(
    like: Any, shard_bytes: int = DEFAULT_SHARD_BYTES, axes: Mapping[str, int] | None = None
) -> ShardPlan:
    """The shard plan of a params tree (`like`: arrays or ShapeDtypeStructs); `axes` maps a
    leaf path to the axis its large leaves are cut along (default 0). ValueError on a
    shard_bytes below MIN_SHARD_BYTES or an axis out of range."""
    if isinstance(shard_bytes, bool) or not isinstance(shard_bytes, int):
        raise ValueError(f"shard_bytes must be an integer, got {shard_bytes!r}")
    if shard_bytes < MIN_SHARD_BYTES:
        raise ValueError(f"shard_bytes={shard_bytes} is too small: must be >= {MIN_SHARD_BYTES}")
    leaves, treedef = jax.tree.flatten(like)
    paths = leaf_paths(like)
    shapes = tuple(tuple(int(d) for d in np.shape(x)) for x in leaves)
    axes = dict(axes or {})
    unknown = sorted(set(axes) - set(paths))
    if unknown:
        raise ValueError(f"split axes name leaves the params do not have: {unknown[:4]}")
    split_axes = []
    shards: list[tuple[Piece, ...]] = []
    group: list[Piece] = []
    group_bytes = 0
    for i, (path, shape) in enumerate(zip(paths, shapes, strict=True)):
        axis = int(axes.get(path, 0))
        if shape and not 0 <= axis < len(shape):
            raise ValueError(f"split axis {axis} of {path} is out of range for shape {shape}")
        split_axes.append(axis)
        nbytes = 4 * math.prod(shape)
        if nbytes <= shard_bytes:
            if group and group_bytes + nbytes > shard_bytes:
                shards.append(tuple(group))
                group, group_bytes = [], 0
            group.append(Piece(i, axis, 0, shape[axis] if shape else 1, True))
            group_bytes += nbytes
            continue
        if group:
            shards.append(tuple(group))
            group, group_bytes = [], 0
        dim = shape[axis]
        count = 1 << max(0, math.ceil(math.log2(math.ceil(nbytes / shard_bytes))))
        count = min(count, dim)
        for k in range(count):
            shards.append((Piece(i, axis, k * dim // count, (k + 1) * dim // count, False),))
    if group:
        shards.append(tuple(group))
    return ShardPlan(shard_bytes, tuple(paths), shapes, tuple(split_axes), tuple(shards), treedef)


def from_record(like: Any, record: Mapping[str, Any]) -> ShardPlan:
    """The plan run.json's "shards" record describes (ValueError if it is malformed)."""
    if not isinstance(record, Mapping) or not isinstance(record.get("axes", {}), Mapping):
        raise ValueError("the run's shard record is not {shard_bytes, axes}")
    return plan_shards(like, record.get("shard_bytes"), record.get("axes") or {})
