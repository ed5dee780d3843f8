"""The validator's reads of whole-model trees, shard by shard: its memory stays bounded.

Nothing in a contributor round holds a whole contribution. Screening needs norms and
cosines, which add up over shards: `gram` streams every shard of the round's valid
contributions and of the history trees once, holding one shard of each at a time, into
their Gram matrix (`screening.GramAccumulator`). Scoring needs each Δ_i applied alone to
θ_r: `moved_trees` builds θ_r − k_i·Δ_i from Δ_i's shards, one contribution at a time.
Memory: O((N + H) × shard) for the Gram pass (N contributions, H history trees), then
θ_r and one moved copy (plus a shard) while scoring.

Every contribution shard is checked against its signed manifest hash on every read
(`protocol.read_delta_shard`), so what is screened, scored and applied is exactly what
was checked; a shard that changed since is a `protocol.ShardDefect`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

from near_jax.contrib import screening
from near_jax.diloco import protocol
from near_jax.diloco.codec.compress import Payload, decode
from near_jax.diloco.codec.spec import CompressionSpec, as_spec
from near_jax.diloco.protocol import ShardPlan, Verdict, VersionManifest
from near_jax.diloco.store import CorruptObject, ObjectStore, StoreError


@dataclasses.dataclass(frozen=True)
class Source:
    """A history tree that screening compares a round's contributions against: one applied
    contribution of round `rnd` (its verdict: key, sha256, shard manifest) or the update
    that round published (the manifest of the version it produced). Only what is needed to
    read its shards is held."""

    label: str
    rnd: int
    verdict: Verdict | None = None
    update: VersionManifest | None = None

    def read(self, store: ObjectStore, run: str, plan: ShardPlan, s: int) -> list[np.ndarray]:
        """Shard `s`, checked against its recorded hash and decoded (raises if it is bad)."""
        if self.verdict is not None:
            return protocol.read_delta_shard(store, run, self.rnd, plan, self.verdict, s)
        key = self.update.key("update", s)
        body = protocol.read_shard(store, key, self.update.update[s], protocol.shard_limit(plan, s))
        payload = Payload.from_bytes(body, max_elements=plan.shard_elements(s))
        return decode(payload, like=plan.shard_like(s))


def contribution_source(
    store: ObjectStore, run: str, plan: ShardPlan, rnd: int, island: str, sha: str
) -> Source | None:
    """`island`'s contribution to round `rnd` as a history Source: its object read (bounded)
    and its manifest parsed; None if it is missing, damaged or not the recorded object."""
    key = protocol.contrib_key(run, rnd, island)
    try:
        body = store.get(key, max_bytes=protocol.contribution_limit(plan))
    except CorruptObject:  # damaged or planted: it only drops out of the history
        return None
    if body is None or protocol.sha256(body) != sha:
        return None
    _, data = protocol.split_contribution(body)
    manifest = protocol.ContribManifest.from_bytes(data, plan)
    return Source(f"{island}@{rnd}", rnd, Verdict(key, island, sha, manifest))


def applied_sources(store: ObjectStore, run: str, plan: ShardPlan, rnd: int) -> list[Source]:
    """The contributions round `rnd`'s decision applied, as history Sources; an unreadable
    decision or contribution object only drops out (never a store that is down)."""
    decision = _quietly(lambda: protocol.read_json(store, protocol.decision_key(run, rnd)))
    out = []
    for entry in (decision or {}).get("accepted", []):
        source = _quietly(
            lambda e=entry: contribution_source(store, run, plan, rnd, e["island"], e["sha256"])
        )
        if source is not None:
            out.append(source)
    return out


def _quietly(read: Callable[[], Any]) -> Any:
    """read(), or None when what it reads is damaged (never when the store is down)."""
    try:
        return read()
    except StoreError:
        raise
    except Exception:  # noqa: BLE001 - a damaged object only drops out of the history
        return None


@dataclasses.dataclass
class Gram:
    """The Gram matrix of `candidates` then `history` (the ones whose shards read back),
    and with `gram(indicators=True)` their indicator Gram matrix `overlap`: the counts of
    positions where both decoded Δs are non-zero (`screening.screen_gram(overlap=...)`)."""

    matrix: np.ndarray
    candidates: list[Verdict]
    history: list[Source]
    overlap: np.ndarray | None = None

    def _rows(self, chosen: Sequence[Verdict]) -> list[int]:
        index = {id(c): i for i, c in enumerate(self.candidates)}
        rows = [index[id(c)] for c in chosen]
        return rows + list(range(len(self.candidates), len(self.candidates) + len(self.history)))

    def sub(self, chosen: Sequence[Verdict]) -> np.ndarray:
        """The Gram matrix of `chosen` (some of the candidates, in that order) then history."""
        rows = self._rows(chosen)
        return self.matrix[np.ix_(rows, rows)]

    def sub_overlap(self, chosen: Sequence[Verdict]) -> np.ndarray | None:
        """The indicator Gram matrix of `chosen` then history, as `sub`; None without one."""
        if self.overlap is None:
            return None
        rows = self._rows(chosen)
        return self.overlap[np.ix_(rows, rows)]


def sparse_spec(spec: CompressionSpec | str) -> bool:
    """Whether payloads of this compression spec send top-k positions (`+topk=F`, F > 0):
    then their non-zero positions say who copied whom (`gram(indicators=True)`).
    ValueError (one line) for a spec that does not parse."""
    return as_spec(spec).topk > 0


def gram(
    store: ObjectStore,
    run: str,
    plan: ShardPlan,
    rnd: int,
    candidates: Sequence[Verdict],
    history: Sequence[Source],
    *,
    indicators: bool = False,
) -> Gram:
    """Streams every shard of the (valid) candidates of round `rnd` and of the history once
    into their Gram matrix (and with `indicators`, in the same pass, into the indicator
    Gram matrix of their non-zero positions). A candidate with a bad shard is rejected
    (the ShardDefect's reason); a history tree that does not read back only drops out."""
    trees: list[Verdict | Source] = [*candidates, *history]
    alive = [True] * len(trees)
    acc = screening.GramAccumulator(len(trees))
    ind = screening.GramAccumulator(len(trees), indicators=True) if indicators else None
    for s in range(plan.num_shards):
        parts: list[list[np.ndarray] | None] = []
        for i, tree in enumerate(trees):
            part = None
            if alive[i] and isinstance(tree, Source):
                try:
                    part = tree.read(store, run, plan, s)
                except StoreError:
                    raise  # the store itself failed: not the tree's fault
                except Exception:  # noqa: BLE001 - a damaged history tree only drops out
                    alive[i] = False
            elif alive[i]:
                try:
                    part = protocol.read_delta_shard(store, run, rnd, plan, tree, s)
                except protocol.ShardDefect as e:
                    tree.reason, tree.manifest, alive[i] = e.reason, None, False
            parts.append(part)
        acc.add(parts)
        if ind is not None:
            ind.add(parts)
        del parts
    keep = [i for i, ok in enumerate(alive) if ok]
    kept = [trees[i] for i in keep]
    return Gram(
        acc.gram[np.ix_(keep, keep)],
        [t for t in kept if not isinstance(t, Source)],
        [t for t in kept if isinstance(t, Source)],
        None if ind is None else ind.gram[np.ix_(keep, keep)],
    )


def moved_trees(
    store: ObjectStore,
    run: str,
    plan: ShardPlan,
    rnd: int,
    params: Any,
    verdicts: Sequence[Verdict],
    scales: Sequence[float | None],
    step: float = 1.0,
) -> Iterator[Any]:
    """params − step·(Δ_i·float32(k_i)) for each contribution in turn (k_i None: Δ_i as it
    is), built from Δ_i's shards with the float32 operations of `screening.moved`, so it
    is bit for bit what the whole-tree `score_contributions` evaluates. ShardDefect if a
    shard no longer reads back as checked."""
    leaves = jax.tree.leaves(params)
    move = screening.moved(step)
    for verdict, k in zip(verdicts, scales, strict=True):
        out = [np.empty(np.shape(x), np.float32) for x in leaves]
        for s in range(plan.num_shards):
            for leaf, index, d in _placed(store, run, rnd, plan, verdict, s):
                if k is not None:
                    d = d * np.float32(k)
                out[leaf][index] = move(np.asarray(leaves[leaf])[index], d)
        yield jax.tree.unflatten(plan.treedef, out)
        del out


def _placed(
    store: ObjectStore, run: str, rnd: int, plan: ShardPlan, verdict: Verdict, s: int
) -> Iterator[tuple[int, Any, np.ndarray]]:
    """(leaf, index into it, values) of each piece of a contribution's shard `s`, checked
    against its signed hash (ShardDefect if it no longer reads back as checked)."""
    pieces = protocol.read_delta_shard(store, run, rnd, plan, verdict, s)
    for piece, d in zip(plan.shards[s], pieces, strict=True):
        yield piece.leaf, piece.index(len(plan.shapes[piece.leaf])), d


def total(
    store: ObjectStore,
    run: str,
    plan: ShardPlan,
    rnd: int,
    params: Any,
    verdicts: Sequence[Verdict],
) -> Any:
    """Σ Δ_i of the contributions (float32, a tree like `params`, built from their shards):
    what the assigned-data check takes each one's control from, the mean of the others
    (`judging`). Memory: one tree. ShardDefect if a shard no longer reads back as checked."""
    leaves = jax.tree.leaves(params)
    out = [np.zeros(np.shape(x), np.float32) for x in leaves]
    for s in range(plan.num_shards):
        for verdict in verdicts:
            for leaf, index, d in _placed(store, run, rnd, plan, verdict, s):
                out[leaf][index] += d
    return jax.tree.unflatten(plan.treedef, out)
