"""The hosts of a multi-host island: who holds, pulls and pushes which shards.

An island may be several processes (`jax.distributed`: a TPU slice, GPU nodes, or
`python -m launch.local -n 2 -- python -m near_jax.diloco.island ...`) training one model
whose params are sharded over all their devices. No host ever gathers the model:

    held      the shards that overlap this host's addressable part of the params: it pulls
              them, keeps θ and m of them, applies updates to them, and builds its device
              arrays from them (`device_params`)
    owned     the shards it pushes: those it holds whole and no lower-numbered host does
              (the run's plan cuts large leaves along their FSDP axis, so each host holds
              whole slices of them)
    gathered  shards no host holds whole (small leaves sharded across hosts, or a plan
              whose slices are thicker than a host's block): every host all-gathers just
              those leaves and host 0 pushes them

Everything that decides the island's path (the run finished? the round closed? which
version next?) is read by host 0 and broadcast (`agree`), so all hosts take the same
collectives in the same order. One process is the special case: it holds and owns every
shard, and nothing is broadcast.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from near_jax.diloco.protocol import ShardPlan, Shards

Box = tuple[tuple[int, int], ...]  # [start, stop) per dimension


def _box(index: tuple, shape: tuple[int, ...]) -> Box:
    return tuple(
        (sl.start or 0, shape[d] if sl.stop is None else sl.stop) for d, sl in enumerate(index)
    )


def _overlap(a: Box, b: Box) -> Box | None:
    out = tuple((max(a0, b0), min(a1, b1)) for (a0, a1), (b0, b1) in zip(a, b, strict=True))
    return out if all(lo < hi for lo, hi in out) else None


def _volume(box: Box) -> int:
    return math.prod(hi - lo for lo, hi in box)


def _local(box: Box, within: Box) -> tuple[slice, ...]:
    """`box` as an index into an array that holds `within`."""
    return tuple(slice(lo - w0, hi - w0) for (lo, hi), (w0, _) in zip(box, within, strict=True))


class Hosts:
    """This process's part of the island's shards (see the module docstring)."""

    def __init__(self, plan: ShardPlan, shardings: Any):
        self.plan = plan
        self.index, self.count = jax.process_index(), jax.process_count()
        flat = jax.tree.leaves(shardings)
        if len(flat) != len(plan.shapes):
            raise ValueError(f"{len(flat)} param shardings for {len(plan.shapes)} leaves")
        # Per leaf, per process: the distinct boxes of the leaf its devices hold.
        self.boxes: list[dict[int, set[Box]]] = []
        for sharding, shape in zip(flat, plan.shapes, strict=True):
            per_process: dict[int, set[Box]] = {}
            for device, index in sharding.devices_indices_map(shape).items():
                per_process.setdefault(device.process_index, set()).add(_box(index, shape))
            self.boxes.append(per_process)
        self.held, self.owned, self.gathered = [], [], []
        for s, pieces in enumerate(plan.shards):
            boxes = [self._piece_box(p) for p in pieces]
            holders = [
                h
                for h in range(self.count)
                if all(self._covers(h, p.leaf, b) for p, b in zip(pieces, boxes, strict=True))
            ]
            if any(
                self._touches(self.index, p.leaf, b) for p, b in zip(pieces, boxes, strict=True)
            ):
                self.held.append(s)
            if not holders:
                self.gathered.append(s)
            if (holders and holders[0] == self.index) or (not holders and self.index == 0):
                self.owned.append(s)
        self._gathered_leaves = sorted({p.leaf for s in self.gathered for p in plan.shards[s]})
        self._full: dict[int, np.ndarray] = {}  # those leaves, all-gathered (`gather_leaves`)

    def _piece_box(self, piece) -> Box:
        shape = self.plan.shapes[piece.leaf]
        return _box(piece.index(len(shape)), shape)

    def _covers(self, host: int, leaf: int, box: Box) -> bool:
        overlaps = [_overlap(b, box) for b in self.boxes[leaf].get(host, ())]
        # `is not None`: () is a scalar's whole box, not "no overlap".
        covered = sum(_volume(o) for o in overlaps if o is not None)
        return covered == _volume(box)

    def _touches(self, host: int, leaf: int, box: Box) -> bool:
        return any(_overlap(b, box) is not None for b in self.boxes[leaf].get(host, ()))

    # ------------------------------------------------------------------ agreement

    def agree(self, value: int) -> int:
        """Host 0's `value` on every host (an int: a version, a flag)."""
        if self.count == 1:
            return int(value)
        out = multihost_utils.broadcast_one_to_all(np.asarray(value, np.int64))
        return int(np.asarray(out))

    def gather_entries(self, entries: dict[int, tuple[str, int]]) -> dict[int, tuple[str, int]]:
        """Every host's pushed shards' (sha256, bytes), on every host (one small all-gather)."""
        if self.count == 1:
            return dict(entries)
        table = np.zeros((self.plan.num_shards, 40), np.uint8)
        for s, (sha, nbytes) in entries.items():
            table[s, :32] = np.frombuffer(bytes.fromhex(sha), np.uint8)
            table[s, 32:] = np.frombuffer(int(nbytes).to_bytes(8, "little"), np.uint8)
        tables = np.asarray(multihost_utils.process_allgather(table))  # [hosts, shards, 40]
        merged = {}
        for s in range(self.plan.num_shards):
            for row in tables[:, s]:
                if row.any():
                    merged[s] = (
                        row[:32].tobytes().hex(),
                        int.from_bytes(row[32:].tobytes(), "little"),
                    )
        return merged

    # ------------------------------------------------------------- params <-> shards

    def pieces(self, params: Any, shards: Iterable[int]) -> Shards:
        """The given owned shards of a tree of global arrays, from this host's data (and, for
        gathered shards, from the all-gathered leaves: call `gather_leaves` first)."""
        leaves = jax.tree.leaves(params)
        out = {}
        for s in shards:
            out[s] = [self._piece(leaves[p.leaf], p) for p in self.plan.shards[s]]
        return out

    def gather_leaves(self, params: Any) -> None:
        """All-gathers the leaves of the gathered shards (a collective: every host calls it)."""
        leaves = jax.tree.leaves(params)
        self._full = {}
        if self._gathered_leaves:
            chosen = [leaves[i] for i in self._gathered_leaves]
            full = (
                multihost_utils.process_allgather(chosen, tiled=True) if self.count > 1 else chosen
            )
            self._full = {
                i: np.asarray(x) for i, x in zip(self._gathered_leaves, full, strict=True)
            }

    def _piece(self, array: Any, piece) -> np.ndarray:
        shape = self.plan.shapes[piece.leaf]
        box = self._piece_box(piece)
        if piece.leaf in self._full:
            return np.asarray(self._full[piece.leaf][piece.index(len(shape))], np.float32)
        out = np.empty(tuple(hi - lo for lo, hi in box), np.float32)
        for shard in array.addressable_shards:
            held = _box(shard.index, shape)
            if (o := _overlap(held, box)) is not None:
                out[_local(o, box)] = np.asarray(shard.data)[_local(o, held)]
        return out

    def device_params(self, held: Shards, shardings: Any, dtypes: Any) -> Any:
        """Global arrays of the params from this host's held shards (no host sends any)."""
        by_leaf: dict[int, list[tuple[Box, np.ndarray]]] = {}
        for s, pieces in held.items():
            for piece, array in zip(self.plan.shards[s], pieces, strict=True):
                by_leaf.setdefault(piece.leaf, []).append((self._piece_box(piece), array))
        flat_shardings, treedef = jax.tree.flatten(shardings)
        out = []
        for leaf, (sharding, dtype) in enumerate(
            zip(flat_shardings, jax.tree.leaves(dtypes), strict=True)
        ):
            shape = self.plan.shapes[leaf]

            def region(index, leaf=leaf, shape=shape, dtype=dtype):
                want = _box(index, shape)
                buf = np.empty(tuple(hi - lo for lo, hi in want), np.float32)
                for box, array in by_leaf.get(leaf, ()):
                    if (o := _overlap(box, want)) is not None:
                        buf[_local(o, want)] = array[_local(o, box)]
                return buf.astype(dtype)

            out.append(jax.make_array_from_callback(shape, sharding, region))
        return jax.tree.unflatten(treedef, out)
