"""Assigned data: a contributor's train batches of round r, a function of (run, r, its key).

    seed = assigned_seed(run, r, public_key_hex)
    it = stream(cfg.data, seed, cfg.train.global_batch_size)   # what the island trains on
    b = batch(cfg.data, seed, i, cfg.train.global_batch_size)  # its i-th global batch
    evaluate = loss_fn(trainer)                                # evaluate(params, seed, i)

In a run whose contrib policy has `assigned_data` (`assigned(manifest)`), an island trains
the inner steps of round r on `stream(..., assigned_seed(run, r, key))` from its index 0:
batches it can compute but not choose. The aggregator can then check that a Δ lowered the
loss on those batches more than on random train batches (a contributor that trained on
other data, or on the scoring split, fails). With `--overlap=τ` the τ steps trained while
round r is exchanged read on in round r's stream (they count toward round r + 1, whose own
H − τ steps still start at index 0 of round r + 1's stream).

The global batches of a stream do not depend on how many processes read it: the shard
count is `data.shards`, or 1 when that is 0 (not the process count, as in a train run), so
a multi-host island and a one-process aggregator see the same batches. The data settings
that shape the stream (source, shuffle, shards, ...) must be the aggregator's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from near_jax import data
from near_jax.diloco import protocol

_DOMAIN = b"near_jax/assign/v1\n"
# Device batches loss_fn holds at most: a round checks a few, so more means old rounds.
_MAX_CACHED = 64


def assigned_seed(run: str, rnd: int, public_key_hex: str) -> int:
    """The data seed of `public_key_hex`'s round `rnd` in `run`: 31 bits of blake2b."""
    body = protocol.dumps([run, int(rnd), public_key_hex.lower()])
    digest = hashlib.blake2b(_DOMAIN + body, digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def assigned(manifest: dict) -> bool:
    """Whether a run's islands train on assigned data: its contrib policy says so (a
    manifest recorded before the field, or a run without contributors: no)."""
    policy = manifest.get("contrib", {}).get("policy", {})
    return bool(policy.get("assigned_data", False))


def stream(
    data_cfg,
    seed: int,
    global_batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> data.HostIterator:
    """This process's part of the train-split batches of the assignment `seed`; the global
    batches are the same for any process count (process_* default to jax's)."""
    fixed = data_cfg.copy_and_resolve_references()
    fixed.shards = int(data_cfg.shards) or 1  # never the process count: see the module doc
    return data.make_iterator(
        fixed,
        split="train",
        seed=seed,
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
    )


def batch(data_cfg, seed: int, index: int, global_batch_size: int) -> dict[str, np.ndarray]:
    """Global batch number `index` (0-based) of the assignment `seed`, read in one process."""
    if index < 0:
        raise ValueError(f"batch index {index} is negative")
    it = stream(data_cfg, seed, global_batch_size, process_index=0, process_count=1)
    for _ in range(index):
        next(it)
    return next(it)


def loss_fn(trainer) -> Callable[[Any, int, int], float]:
    """evaluate(params, seed, index): the mean eval loss of host params (a numpy tree) on
    `batch(cfg.data, seed, index, ...)`; batches are read once and cached (bounded)."""
    cfg = trainer.cfg
    size = cfg.train.global_batch_size
    shardings = trainer.state_shardings.params
    dtypes = jax.tree.map(lambda a: a.dtype, trainer.abstract_state.params)
    cache: dict[tuple[int, int], Any] = {}

    def evaluate(params: Any, seed: int, index: int) -> float:
        key = (int(seed), int(index))
        if key not in cache:
            if len(cache) >= _MAX_CACHED:
                cache.clear()
            host = batch(cfg.data, key[0], key[1], size)
            cache[key] = data.to_global_batch(host, trainer.batch_sharding)
        params = jax.tree.map(lambda x, d: x.astype(d), params, dtypes)
        params = jax.device_put(params, shardings)
        total, weight = jax.device_get(trainer.eval_step(params, cache[key]))
        return float(total) / max(float(weight), 1.0)

    return evaluate
