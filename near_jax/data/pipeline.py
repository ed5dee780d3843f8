"""The grain input pipeline: documents -> tokens -> packed rows -> per-host batches.

Sources, document identities and the train/val split are in `near_jax.data.documents`.

Pipeline: the data is cut into `data.shards` fixed shards (default: the process count at the
run's start), one grain graph each; a host reads the shards its rows of the global batch come
from (see HostIterator), so the global stream never depends on the number of hosts.
  document ids of the split -> the shard's documents (ids[shard::num_shards])
  -> shuffle (per epoch; train from `seed`, val from a fixed seed so every fresh val iterator
  yields the same batches) -> repeat forever (train and val)
  -> read + tokenize in `read_threads` threads: [bos] + tokens + [eos] (.bin chunks as-is)
  -> pack (concatenate, then split) into rows of seq_len + 1 tokens: no padding in an endless
  stream; a long document runs on over several rows, and its positions restart at 0 in each
  row (every row starts a fresh segment)
  -> window shuffle of rows (`shuffle_window` / num_shards), so one long document does not
  fill a batch
  -> batch global_batch_size // num_shards rows -> features:
     inputs = row[:-1], targets = row[1:], positions, segment_ids (1, 2, ... per document in
     the row; 0 = padding), weights = 1.0 where the target is in the same segment as the input.
Everything is deterministic for a seed, and the iterator state (`get_state()`, a small
JSON-able dict) restores the exact next batch.

If a split has fewer documents than there are shards, every shard reads all of them and keeps
rows shard::num_shards after packing instead (still disjoint between shards).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from collections.abc import Mapping
from typing import Any

import grain
import numpy as np

from near_jax.config import ConfigError
from near_jax.data.documents import Documents, list_documents, split_documents
from near_jax.data.packing import PackIterDataset
from near_jax.data.tokenizer import Tokenizer, load_tokenizer

FEATURES = ("inputs", "targets", "positions", "segment_ids", "weights")
_VAL_SHUFFLE_SEED = 0  # val order never depends on the training seed


def _seed32(*parts: Any) -> int:
    """A 32-bit seed derived from `parts`; grain's shuffle uses seed + epoch per epoch, so
    hashing keeps seeds s and s+1 from sharing epochs."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


# ----------------------------------------------------------------------------- pipeline


@functools.lru_cache(maxsize=8)
def _cached_tokenizer(spec: str, mtime_ns: int) -> Tokenizer:
    del mtime_ns  # part of the cache key only
    return load_tokenizer(spec)


def _tokenizer(spec: str) -> Tokenizer:
    """load_tokenizer, cached per (spec, file mtime): val iterators are made often."""
    path = os.path.expanduser(spec)
    mtime = os.stat(path).st_mtime_ns if spec != "byte" and os.path.isfile(path) else 0
    return _cached_tokenizer(spec, mtime)


@dataclasses.dataclass(frozen=True, eq=False)
class _ReadTokens:
    """Map: document id -> int32 tokens (runs in grain's reader threads)."""

    docs: Documents
    tokenizer: Tokenizer

    def __call__(self, i) -> np.ndarray:
        return self.docs.read_tokens(int(i), self.tokenizer)


@dataclasses.dataclass(frozen=True)
class _TakeRow:
    """Map: a batch of `process_count` rows -> the row of this host."""

    index: int

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: v[self.index] for k, v in rows.items()}


def _features(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """[B, L+1] packed rows -> the model's [B, L] inputs/targets/positions/segments/weights."""
    tokens, segs = rows["tokens"], rows["segment_ids"]
    seg_in, seg_out = segs[:, :-1], segs[:, 1:]
    weights = (seg_in == seg_out) & (seg_out != 0)
    return {
        "inputs": np.ascontiguousarray(tokens[:, :-1]),
        "targets": np.ascontiguousarray(tokens[:, 1:]),
        "positions": np.ascontiguousarray(rows["positions"][:, :-1]),
        "segment_ids": np.ascontiguousarray(seg_in),
        "weights": weights.astype(np.float32),
    }


def shard_dataset(
    data_cfg,
    *,
    split: str,
    seed: int,
    rows_per_step: int,
    shard: int,
    num_shards: int,
    val_seed: int | None = None,
) -> grain.IterDataset:
    """The endless, deterministic stream of one data shard: batches of `rows_per_step` rows.

    Each element is a dict of numpy arrays [rows_per_step, seq_len]: inputs, targets,
    positions, segment_ids (int32) and weights (float32).
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if data_cfg.seq_len <= 0:
        raise ConfigError(f"config.data.seq_len={data_cfg.seq_len} is not allowed: > 0")
    tokenizer = _tokenizer(data_cfg.tokenizer)
    docs = list_documents(data_cfg)
    ids = split_documents(docs, split, data_cfg.val_fraction)
    reader = _ReadTokens(docs, tokenizer)
    reader(ids[0])  # fail now, not in a reader thread, on e.g. a wrong jsonl_field

    ds = grain.MapDataset.source(ids)
    rows_per_shard = len(ids) < num_shards  # too few documents: shard rows, not docs
    if not rows_per_shard:
        ds = ds[shard::num_shards]
    if split == "train":
        shuffle_seed = _seed32("train", int(seed))
    else:  # a val_seed draws other val batches (contribution scoring); None: the fixed order
        shuffle_seed = _VAL_SHUFFLE_SEED if val_seed is None else _seed32("val", int(val_seed))
    if data_cfg.shuffle:
        ds = ds.shuffle(seed=shuffle_seed)
    ds = ds.repeat().map(reader)
    threads = int(data_cfg.read_threads)
    ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(16, 8 * threads))
    )
    ds = PackIterDataset(ds, row_len=data_cfg.seq_len + 1, pad_id=tokenizer.pad_id)
    if rows_per_shard:
        ds = ds.batch(num_shards, drop_remainder=True).map(_TakeRow(shard))
    window = data_cfg.shuffle_window // num_shards  # the whole run holds shuffle_window rows
    if data_cfg.shuffle and window > 1:
        # A long document fills many consecutive rows; mixing rows keeps batches diverse.
        ds = grain.experimental.WindowShuffleIterDataset(
            ds, window_size=window, seed=_seed32("rows", shuffle_seed)
        )
    return ds.batch(rows_per_step, drop_remainder=True).map(_features)


class HostIterator:
    """This host's rows of each global batch, cut from the fixed data shards they come from.

    Global batch rows [s * B/S, (s+1) * B/S) come from shard s; the host with index p of P
    takes rows [p * B/P, (p+1) * B/P). The global stream depends only on the shard count S,
    never on P, so a run can resume on another number of hosts. `get_state()` holds the
    state of every shard this host reads; `set_state()` accepts a merge of all hosts' states.
    """

    def __init__(self, shard_iters: dict[int, Any], num_shards: int, lo: int, hi: int, rps: int):
        self._iters, self.num_shards = shard_iters, num_shards
        self._shards = sorted(shard_iters)
        first = self._shards[0] * rps
        self._slice = slice(lo - first, hi - first)

    def __iter__(self) -> HostIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        parts = [next(self._iters[s]) for s in self._shards]
        return {k: np.concatenate([p[k] for p in parts])[self._slice] for k in FEATURES}

    def get_state(self) -> dict[str, Any]:
        """{"num_shards": S, "shards": {"<shard>": state}} for the shards this host reads."""
        return {
            "num_shards": self.num_shards,
            "shards": {str(s): self._iters[s].get_state() for s in self._shards},
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Restores from a state that holds (at least) every shard this host reads."""
        if state.get("num_shards") != self.num_shards:
            raise ValueError(
                f"the saved data position is for {state.get('num_shards')} data shards, this "
                f"run has {self.num_shards} (config.data.shards must not change within a run)"
            )
        missing = [s for s in self._shards if str(s) not in state["shards"]]
        if missing:
            raise ValueError(f"the saved data position lacks shards {missing}")
        for s in self._shards:
            self._iters[s].set_state(state["shards"][str(s)])


def make_iterator(
    data_cfg,
    *,
    split: str,
    seed: int,
    global_batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    val_seed: int | None = None,
) -> HostIterator:
    """This host's endless, deterministic, checkpointable iterator of batches of `split`.

    Each batch is [global_batch_size // process_count, seq_len] per array. The shard count is
    `data.shards`, or the process count when that is 0. process_index / process_count default
    to jax.process_index() / jax.process_count(). The val split is read in one fixed order
    unless `val_seed` is given (then in the order that seed shuffles it to).
    """
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    num_shards = data_cfg.shards or process_count
    batch = global_batch_size
    for name, n in (("the number of processes", process_count), ("data.shards", num_shards)):
        if batch <= 0 or batch % n:
            raise ConfigError(
                f"config.train.global_batch_size={batch} is not allowed: a positive multiple "
                f"of {name} ({n})"
            )
    rps = batch // num_shards
    lo, hi = process_index * batch // process_count, (process_index + 1) * batch // process_count
    shards = range(lo // rps, -(-hi // rps))
    iters = {
        s: iter(
            shard_dataset(
                data_cfg,
                split=split,
                seed=seed,
                rows_per_step=rps,
                shard=s,
                num_shards=num_shards,
                val_seed=val_seed,
            )
        )
        for s in shards
    }
    return HostIterator(iters, num_shards, lo, hi, rps)


def to_global_batch(local_batch: Mapping[str, np.ndarray], sharding) -> dict[str, Any]:
    """Assembles each host's batch into global jax.Arrays (batch dim split over hosts).

    `sharding` is one jax.sharding.Sharding for every array, or a mapping key -> Sharding.
    """
    import jax

    def one(key: str):
        return sharding[key] if isinstance(sharding, Mapping) else sharding

    return {
        k: jax.make_array_from_process_local_data(one(k), np.asarray(v))
        for k, v in local_batch.items()
    }
