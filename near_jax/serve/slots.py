"""The serving engine's device side: one dense KV cache of `slots` rows and two jitted steps.

The cache is model.init_cache(cfg, slots, cache_len), sharded by the logical CACHE_AXES like
Generator's: the slot axis is the batch, split over the data-parallel devices; params stay
as they are on the mesh. The steps have fixed shapes (chunk; a decode bucket), so serving
compiles each shape once (warmup), whatever the mix of requests:

- `prefill`: one chunk of one slot's prompt, [1, chunk] tokens at positions start ..
  start + chunk - 1, written into that slot's rows of the cache. The slot's rows are cut out
  of the cache (a dynamic slice on one device; where the slot axis is sharded, a masked sum:
  XLA would all-gather the whole cache for a dynamic slice of a sharded axis, the sum only
  all-reduces one slot), run through model.apply_with_cache with batch 1, and put back. It
  returns the token sampled from the logits of the chunk's last real token (used after the
  prompt's last chunk only).
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
    ):
        """`slots` a multiple of the mesh's data-parallel size; `cache_len` a multiple of
        `chunk`, so a chunk written at a multiple of `chunk` never runs past the cache
        (dynamic_update_slice would clamp the start and overwrite earlier tokens);
        `length_buckets` >= 1 the number of attention spans (each one more compile of every
        decode bucket)."""
        if length_buckets < 1:
            raise ValueError(f"length_buckets={length_buckets} is not allowed: must be >= 1")
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

    def _prefill_fn(self, params, cache, tokens_C, ints_4, seed, floats_2):
        """ints_4 = (slot, start, index of the last real token in the chunk, top_k);
        floats_2 = (temperature, top_p). Returns (first token, cache)."""
        slot, start, last, top_k = ints_4[0], ints_4[1], ints_4[2], ints_4[3]
        rows = {k: self._slot_rows(v, slot) for k, v in cache.items()}
        positions_1xC = (start + jnp.arange(self.chunk))[None]
        logits_1x1xV, rows = model.apply_with_cache(
            params, tokens_C[None], positions_1xC, rows, self.model_cfg, select_BxT=last[None, None]
        )
        cache = {k: self._put_rows(cache[k], rows[k], slot) for k in cache}
        # The prompt's first output token is token 0 of the request's key sequence.
        keys_1 = request_keys(seed[None], jnp.zeros(1, jnp.int32))
        token_1 = sample_rows(
            self._mask_vocab(logits_1x1xV[:, 0]),
            keys_1,
            floats_2[0][None],
            top_k[None],
            floats_2[1][None],
        )
        return token_1[0], cache

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

    def run_prefill(self, params, cache, tokens_C, slot, start, last, sampling, seed):
        """One chunk of one slot (host arguments); returns (token as a device scalar, cache).
        `sampling` = (temperature, top_k, top_p)."""
        temperature, top_k, top_p = sampling
        return self.prefill(
            params,
            cache,
            jax.device_put(np.asarray(tokens_C, np.int32), self.replicated),
            jax.device_put(np.asarray([slot, start, last, top_k], np.int32), self.replicated),
            jax.device_put(np.asarray(seed, np.uint32), self.replicated),
            jax.device_put(np.asarray([temperature, top_p], np.float32), self.replicated),
        )

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
        """Compiles (by running) prefill and every decode bucket and span on idle inputs;
        returns the cache. They write garbage at position 0 of slot 0 (prefill) and of every slot
        (decode): harmless only while no slot holds a request (see engine.py)."""
        tokens_C = np.full(self.chunk, pad_id)
        token, cache = self.run_prefill(params, cache, tokens_C, 0, 0, 0, (0.0, 0, 1.0), 0)
        for n, span in itertools.product(self.buckets, self.spans):
            ints_4xB = np.stack([np.full(n, pad_id), np.zeros(n), np.zeros(n), np.zeros(n)])
            floats_2xB = np.stack([np.zeros(n), np.ones(n)])
            args = (ints_4xB, np.zeros(n), floats_2xB, span)
            token, cache = self.run_decode(params, cache, *args)
        jax.block_until_ready((token, cache))
        return cache
