"""The serving engine's device side: one dense KV cache of `slots` rows and two jitted steps.

The cache is model.init_cache(cfg, slots, cache_len), sharded by the logical CACHE_AXES like
Generator's: the slot axis is the batch, split over the data-parallel devices; params stay
as they are on the mesh. The steps have fixed shapes (a prefill bucket; a decode bucket and
span), so serving compiles each shape once (warmup), whatever the mix of requests:

- `prefill`: one chunk of each of P slots' prompts, [P, chunk] tokens, row p at positions
  start_p .. start_p + chunk - 1, written into its slot's rows of the cache. P is a
  `prefill_buckets` size (powers of two up to `prefill_rows`), and a call whose chunks are
  all short (a prompt's last) runs a shorter chunk (`prefill_lengths`: chunk, chunk/2,
  chunk/4), so short prompts are not padded to a whole chunk; rows past the real ones name
  slot `slots` (out of range): they read some slot's rows and their writes are dropped. The
  slots' rows are gathered out of the cache, run through model.apply_with_cache with batch
  P, and scattered back. Where the slot axis is sharded, P is 1 and the slot's rows are a
  masked sum (XLA would all-gather the whole cache for a gather on a sharded axis; the sum
  only all-reduces one slot). It returns each row's token sampled from the logits of its
  chunk's last real token (used after a prompt's last chunk only). One call for a burst
  of short prompts, not one each: their matmuls share the weights' reads.
- `decode`: one token for each of the first b slots at its own position, sampled per row
  (sampling.sample_rows) with the row's key fold_in(key(seed), n) for its n-th token, so a
  seeded request draws the same tokens whatever else shares the batch. b is a bucket
  (`buckets`: dp times the powers of two below `slots`, and `slots`, dp the data-parallel
  size). The step cuts the first b/dp rows of every device's block of slots out of the
  cache (`bucket_slots`; a static slice of [dp, slots/dp], so no row moves between
  devices), runs them and writes them back in place, so its cost follows the busy rows,
  not `slots`; the other rows are untouched. The engine hands out slots in `order` (device
  j % dp, its (j // dp)-th row), so the first b slots of the order are bucket b's.
  Attention reads only the cache's first `span` positions (a static argument: `spans` are
  cache_len halved up to `length_buckets` - 1 times), the smallest span past every busy
  row's position, so its cost follows the sequences' lengths too, not cache_len.

The cache is donated to both steps, so it is updated in place.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from near_jax import model, sharding
from near_jax.infer import generator
from near_jax.infer.sampling import sample_rows


def request_keys(seeds_B: jax.Array, counts_B: jax.Array) -> jax.Array:
    """The PRNG key of each row's next token: fold_in(key(seed), n) for its n-th token."""
    return jax.vmap(lambda s, n: jax.random.fold_in(jax.random.key(s), n))(seeds_B, counts_B)


class SlotSteps:
    """The jitted prefill and decode steps over one dense cache of `slots` rows."""

    def __init__(
        self,
        model_cfg: model.ModelConfig,
        mesh: jax.sharding.Mesh,
        *,
        slots: int,
        cache_len: int,
        chunk: int,
        vocab_limit: int,
        length_buckets: int = 4,
        prefill_rows: int = 16,
    ):
        """`slots` a multiple of the mesh's data-parallel size; `cache_len` a multiple of
        `chunk`, so a chunk written at a multiple of `chunk` never runs past the cache
        (dynamic_update_slice would clamp the start and overwrite earlier tokens);
        `length_buckets` >= 1 the number of attention spans (each one more compile of every
        decode bucket); `prefill_rows` >= 1 the most prompt chunks one prefill call runs (1
        where the slot axis is sharded)."""
        for name, value in (("length_buckets", length_buckets), ("prefill_rows", prefill_rows)):
            if value < 1:
                raise ValueError(f"{name}={value} is not allowed: must be >= 1")
        if slots % sharding.data_parallel_size(mesh) or cache_len % chunk:
            raise ValueError(
                f"slots={slots}, cache_len={cache_len}, chunk={chunk} are not allowed: slots "
                f"must be a multiple of {sharding.data_parallel_size(mesh)} (data parallelism) "
                "and cache_len a multiple of chunk"
            )
        self.model_cfg, self.mesh = model_cfg, mesh
        self.slots, self.cache_len, self.chunk = slots, cache_len, chunk
        self.vocab_limit = vocab_limit
        shapes = jax.eval_shape(lambda: model.init_cache(model_cfg, slots, cache_len))
        logical = {k: PartitionSpec(*model.CACHE_AXES) for k in shapes}
        self.cache_shapes = shapes
        self.cache_shardings = sharding.logical_to_sharding(logical, shapes, mesh)
        need = self.cache_bytes_per_device()
        budget = int(generator.CACHE_MEMORY_FRACTION * generator.free_device_memory(mesh))
        if need > budget:
            raise ValueError(
                f"slots={slots} x cache_len={cache_len} is not allowed: the KV cache needs "
                f"{need / 2**30:.2f} GiB per device, over the {budget / 2**30:.2f} GiB allowed "
                f"({generator.CACHE_MEMORY_FRACTION:.0%} of the free memory)"
            )
        batch_axes = sharding.batch_sharding(mesh).spec[0]
        self.row_sharding = NamedSharding(mesh, PartitionSpec(batch_axes))
        self.rows_sharding = NamedSharding(mesh, PartitionSpec(None, batch_axes))
        self.replicated = sharding.replicated(mesh)
        dp = self._dp = sharding.data_parallel_size(mesh)
        self._sharded_slots = dp > 1
        self.buckets = (*(dp << i for i in range(slots.bit_length()) if dp << i < slots), slots)
        blocks_DxR = np.arange(slots).reshape(dp, slots // dp)
        self.order = blocks_DxR.T.reshape(-1)  # slot j: device j % dp, its (j // dp)-th row
        self.bucket_slots = {b: blocks_DxR[:, : b // dp].reshape(-1) for b in self.buckets}
        halves = (cache_len >> i for i in range(length_buckets))
        self.spans = tuple(sorted({n for n in halves if n > 0}))
        # A chunk of C < chunk tokens is only ever a prompt's last: it starts at a multiple
        # of chunk, so it never runs past the cache either.
        self.prefill_lengths = tuple(
            sorted({chunk >> i for i in range(3) if chunk % (1 << i) == 0})
        )
        most = 1 if self._sharded_slots else min(prefill_rows, slots)
        self.prefill_buckets = (*(1 << i for i in range(most.bit_length()) if 1 << i < most), most)
        self._init = jax.jit(
            lambda: model.init_cache(model_cfg, slots, cache_len),
            out_shardings=self.cache_shardings,
        )
        # Outputs laid out exactly as the cache came in: an equivalent but differently
        # spelled sharding would be another cache key, so one more compile while serving.
        self.prefill = jax.jit(
            self._prefill_fn,
            donate_argnums=1,
            out_shardings=(self.replicated, self.cache_shardings),
        )
        self.decode = jax.jit(
            self._decode_fn,
            donate_argnums=1,
            static_argnames="span",
            out_shardings=(self.row_sharding, self.cache_shardings),
        )

    def bucket(self, rows: int) -> int:
        """The smallest decode bucket of at least `rows` slots."""
        return next(b for b in self.buckets if b >= rows)

    def bucket_of_prefill(self, rows: int) -> int:
        """The smallest prefill bucket of at least `rows` chunks."""
        return next(b for b in self.prefill_buckets if b >= rows)

    def prefill_length(self, tokens: int) -> int:
        """The smallest prefill chunk length of at least `tokens` tokens."""
        return next(c for c in self.prefill_lengths if c >= tokens)

    @property
    def prefill_rows(self) -> int:
        """The most prompt chunks one prefill call runs."""
        return self.prefill_buckets[-1]

    def span(self, length: int) -> int:
        """The smallest attention span of at least `length` positions."""
        return next(n for n in self.spans if n >= length)

    def new_cache(self) -> dict[str, jax.Array]:
        """A zeroed cache, laid out on the mesh."""
        return self._init()

    def cache_bytes_per_device(self) -> int:
        """Bytes of the cache on one device."""
        return sum(
            int(np.prod(self.cache_shardings[k].shard_shape(v.shape))) * v.dtype.itemsize
            for k, v in self.cache_shapes.items()
        )

    def _mask_vocab(self, logits_BxV: jax.Array) -> jax.Array:
        ids_V = jnp.arange(logits_BxV.shape[-1])
        return jnp.where(ids_V < self.vocab_limit, logits_BxV, -jnp.inf)

    def _slot_rows(self, cache_NxBxSxGxK: jax.Array, slot: jax.Array) -> jax.Array:
        if not self._sharded_slots:
            return jax.lax.dynamic_slice_in_dim(cache_NxBxSxGxK, slot, 1, axis=1)
        mine_B = (jnp.arange(self.slots) == slot)[None, :, None, None, None]
        # where, not a multiply: 0 * a non-finite stale entry would not be 0.
        return jnp.sum(jnp.where(mine_B, cache_NxBxSxGxK, 0), axis=1, keepdims=True)

    def _put_rows(self, cache_NxBxSxGxK: jax.Array, rows_Nx1xSxGxK: jax.Array, slot: jax.Array):
        if not self._sharded_slots:
            return jax.lax.dynamic_update_slice_in_dim(cache_NxBxSxGxK, rows_Nx1xSxGxK, slot, 1)
        mine_B = (jnp.arange(self.slots) == slot)[None, :, None, None, None]
        return jnp.where(mine_B, rows_Nx1xSxGxK, cache_NxBxSxGxK)

    def _prefill_fn(self, params, cache, tokens_PxC, ints_7xP):
        """ints_7xP = (slot, start, index of the last real token in the chunk, top_k, seed,
        temperature, top_p) per row, the last three as the bits of their uint32 and float32.
        Returns (first token per row, cache)."""
        slots_P, starts_P, last_P, top_k_P = ints_7xP[:4]
        seeds_P = jax.lax.bitcast_convert_type(ints_7xP[4], jnp.uint32)
        floats_2xP = jax.lax.bitcast_convert_type(ints_7xP[5:], jnp.float32)
        if self._sharded_slots:  # one row (prefill_buckets)
            rows = {k: self._slot_rows(v, slots_P[0]) for k, v in cache.items()}
        else:  # a padding row's slot is out of range: clipped to read, dropped to write
            rows = {k: jnp.take(v, slots_P, axis=1, mode="clip") for k, v in cache.items()}
        positions_PxC = starts_P[:, None] + jnp.arange(tokens_PxC.shape[1])
        logits_Px1xV, rows = model.apply_with_cache(
            params, tokens_PxC, positions_PxC, rows, self.model_cfg, select_BxT=last_P[:, None]
        )
        if self._sharded_slots:
            cache = {k: self._put_rows(cache[k], rows[k], slots_P[0]) for k in cache}
        else:
            cache = {k: cache[k].at[:, slots_P].set(rows[k], mode="drop") for k in cache}
        # The prompt's first output token is token 0 of the request's key sequence.
        keys_P = request_keys(seeds_P, jnp.zeros_like(starts_P))
        logits_PxV = self._mask_vocab(logits_Px1xV[:, 0])
        return sample_rows(logits_PxV, keys_P, floats_2xP[0], top_k_P, floats_2xP[1]), cache

    def _decode_fn(self, params, cache, ints_7xB, span: int = 0):
        """ints_7xB = (input token, position, tokens drawn so far, top_k, seed, temperature,
        top_p) per slot of bucket_slots[B] (B a bucket), seed, temperature and top_p as the bits of
        their uint32 and float32 (one transfer); `span`: attention reads the cache's first
        `span` positions (0 = all; every decoding row's position is below it). Returns (next
        token per slot, cache)."""
        attend_len = 0 if span >= self.cache_len else span
        tokens_B, positions_B, counts_B, top_k_B = ints_7xB[:4]
        seeds_B = jax.lax.bitcast_convert_type(ints_7xB[4], jnp.uint32)
        floats_2xB = jax.lax.bitcast_convert_type(ints_7xB[5:], jnp.float32)
        b, dp = tokens_B.shape[0], self._dp

        def blocks(v_NxSx___, rows_per_device):  # [N, dp, rows per device, ...]
            n, _, *rest = v_NxSx___.shape
            return v_NxSx___.reshape(n, dp, rows_per_device, *rest)

        if b < self.slots and dp > 1:  # bucket_slots: a static slice of every device's block
            per = self.slots // dp
            rows = {
                k: blocks(v, per)[:, :, : b // dp].reshape(v.shape[0], b, *v.shape[2:])
                for k, v in cache.items()
            }
            logits_Bx1xV, rows = model.apply_with_cache(
                params,
                tokens_B[:, None],
                positions_B[:, None],
                rows,
                self.model_cfg,
                attend_len=attend_len,
            )
            cache = {
                k: jax.lax.dynamic_update_slice_in_dim(
                    blocks(v, per), blocks(rows[k], b // dp), 0, 2
                ).reshape(v.shape)
                for k, v in cache.items()
            }
        else:
            # Slots not split over devices: the bucket is the cache's first b rows, which the
            # model reads and writes in place (a slice written back made XLA copy the whole
            # cache twice a step).
            logits_Bx1xV, cache = model.apply_with_cache(
                params,
                tokens_B[:, None],
                positions_B[:, None],
                cache,
                self.model_cfg,
                attend_len=attend_len,
            )
        keys_B = request_keys(seeds_B, counts_B)
        logits_BxV = self._mask_vocab(logits_Bx1xV[:, 0])
        return sample_rows(logits_BxV, keys_B, floats_2xB[0], top_k_B, floats_2xB[1]), cache

    def run_prefill(self, params, cache, tokens_PxC, ints_4xP, seeds_P, floats_2xP):
        """One chunk of each of P <= prefill_rows slots from host arrays: tokens_PxC (C <=
        chunk), ints_4xP = (slot, start, index of the chunk's last real token, top_k),
        floats_2xP = (temperature, top_p). The call runs the smallest prefill length past
        every row's last real token. Returns (first token per row as a device array
        [bucket], cache); rows past P are padding."""
        n = len(tokens_PxC)
        p = self.bucket_of_prefill(n)
        c = self.prefill_length(int(np.max(ints_4xP[2])) + 1)
        tokens = np.zeros((p, c), np.int32)
        tokens[:n] = np.asarray(tokens_PxC)[:, :c]
        ints_7xP = np.zeros((7, p), np.int32)
        ints_7xP[0, n:] = self.slots  # padding rows: out of range, their writes dropped
        ints_7xP[:4, :n] = ints_4xP
        ints_7xP[4, :n] = np.asarray(seeds_P, np.uint32).view(np.int32)
        ints_7xP[5:, :n] = np.asarray(floats_2xP, np.float32).view(np.int32)
        put = functools.partial(jax.device_put, device=self.replicated)
        return self.prefill(params, cache, put(tokens), put(ints_7xP))

    def run_decode(self, params, cache, ints_4xB, seeds_B, floats_2xB, span: int):
        """One decode step from host arrays over the B slots bucket_slots[B] (B a bucket: the
        arrays' last axis, in that order) attending over `span` (one of `spans`) positions;
        returns (next tokens [B] device array, cache)."""
        ints_7xB = np.empty((7, np.shape(ints_4xB)[1]), np.int32)
        ints_7xB[:4] = ints_4xB
        ints_7xB[4] = np.asarray(seeds_B, np.uint32).view(np.int32)
        ints_7xB[5:] = np.asarray(floats_2xB, np.float32).view(np.int32)
        ints_7xB = jax.device_put(ints_7xB, self.rows_sharding)
        return self.decode(params, cache, ints_7xB, span=span)

    def warmup(self, params, cache, pad_id: int) -> dict[str, jax.Array]:
        """Compiles (by running) every prefill bucket and every decode bucket and span on
        idle inputs; returns the cache. They write garbage at position 0 .. chunk - 1 of the
        first slots (prefill) and at position 0 of every slot (decode): harmless only while
        no slot holds a request (see engine.py)."""
        for p, c in itertools.product(self.prefill_buckets, self.prefill_lengths):
            tokens_PxC = np.full((p, c), pad_id)
            ints_4xP = np.zeros((4, p), np.int32)
            ints_4xP[0], ints_4xP[2] = np.arange(p), c - 1
            floats_2xP = np.stack([np.zeros(p), np.ones(p)])
            token, cache = self.run_prefill(
                params, cache, tokens_PxC, ints_4xP, np.zeros(p), floats_2xP
            )
        for n, span in itertools.product(self.buckets, self.spans):
            ints_4xB = np.stack([np.full(n, pad_id), np.zeros(n), np.zeros(n), np.zeros(n)])
            floats_2xB = np.stack([np.zeros(n), np.ones(n)])
            args = (ints_4xB, np.zeros(n), floats_2xB, span)
            token, cache = self.run_decode(params, cache, *args)
        jax.block_until_ready((token, cache))
        return cache
