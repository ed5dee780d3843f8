"""A Llama-3-style decoder-only transformer, pure-functional over a plain params pytree.

    params = init(cfg, rng)
    logits_BxLxV = apply(params, tokens_BxL, positions_BxL, segment_ids_BxL, cfg)

`cfg` is the `model` section of the config (a ConfigDict) or a `ModelConfig`. The blocks
(`layers.py`) are Flax Linen modules stacked with `nn.scan`; every parameter carries logical
axis names, which `logical_axes(cfg)` returns as a tree of PartitionSpecs for `sharding.py` to
map to the mesh. With a KV cache (`init_cache`, `apply_with_cache`) the model generates.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from near_jax.config import ModelConfig
from near_jax.model.layers import Block, RMSNorm, normal, write_cache
from near_jax.sharding import constrain

Params = Any


REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Transformer(nn.Module):
    """Embedding, the stack of blocks (scanned or unrolled), final norm and output head."""

    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        tokens_BxL,
        positions_BxL,
        segment_ids_BxL,
        cache=None,
        select_BxT=None,
        attend_len: int = 0,
        return_hidden: bool = False,
    ):
        """Logits [B, L, V]; with `cache` (stacked per layer) returns (logits, new cache).

        `select_BxT`, if given, picks the positions whose logits are computed ([B, T, V]),
        so a prefill pays for the output head on one position per row, not all L.
        `attend_len` (static): attention reads only the cache's first positions.
        """
        c = self.cfg
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        # Untied, the lookup table starts at std 1 (unit-scale residual stream); tied, it is
        # also the output head, so it starts at the head's init_std (the Llama convention).
        embed_std = c.init_std if c.tie_embeddings else 1.0
        embed_VxD = self.param(
            "embed", normal(embed_std, ("vocab", "embed")), (c.vocab_size, c.d_model), pdt
        )
        x_BxLxD = jnp.take(embed_VxD, tokens_BxL, axis=0).astype(dt)
        x_BxLxD = constrain(x_BxLxD, ("batch", "length", "embed"))

        block = Block
        if c.remat != "none" and cache is None:
            block = nn.remat(Block, policy=REMAT_POLICIES[c.remat], prevent_cse=not c.scan_layers)
        # With a cache, each block reads the whole stacked cache (with its layer index) and
        # returns only its new entries; one scatter after the stack writes them all, in place
        # when the cache is donated. Scanned, the cache is thus a loop constant: scanned over
        # (or carried), XLA copied the whole stacked cache into and out of the loop.
        if c.scan_layers:
            stack = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast)
                + ((nn.broadcast, 0) if cache is not None else ()),
                length=c.n_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            extra = (cache, jnp.arange(c.n_layers)) if cache is not None else ()
            x_BxLxD, new = stack(c, attend_len, name="blocks")(
                x_BxLxD, positions_BxL, segment_ids_BxL, *extra
            )
        else:
            layers = []
            for i in range(c.n_layers):
                x_BxLxD, layer_new = block(c, attend_len, name=f"block_{i}")(
                    x_BxLxD, positions_BxL, segment_ids_BxL, cache, None if cache is None else i
                )
                layers.append(layer_new)
            new = None if cache is None else jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
        if cache is not None:
            cache = {n: write_cache(cache[n], new[n], positions_BxL) for n in ("k", "v")}

        if select_BxT is not None:
            x_BxLxD = jnp.take_along_axis(x_BxLxD, select_BxT[:, :, None], axis=1)
        x_BxLxD = RMSNorm(c.norm_eps, dt, pdt, name="final_norm")(x_BxLxD)
        if return_hidden:  # the fused loss (xent.py) applies the head chunk by chunk
            return x_BxLxD
        if c.tie_embeddings:
            head_DxV = embed_VxD.T  # exactly as Hugging Face Llama ties them
        else:
            head_DxV = self.param(
                "head", normal(c.init_std, ("embed", "vocab")), (c.d_model, c.vocab_size), pdt
            )
        logits_BxLxV = jnp.einsum(
            "bld,dv->blv", x_BxLxD, head_DxV.astype(dt), preferred_element_type=jnp.float32
        )
        logits_BxLxV = constrain(logits_BxLxV, ("batch", "length", "vocab"))
        return logits_BxLxV if cache is None else (logits_BxLxV, cache)


def _module(cfg: Any) -> Transformer:
    return Transformer(ModelConfig.from_config(cfg))


def _dummy_inputs(batch: int = 1, length: int = 8):
    tokens = jnp.zeros((batch, length), jnp.int32)
    return tokens, jnp.broadcast_to(jnp.arange(length), (batch, length)), tokens + 1


@functools.cache
def _compiled_init(cfg: ModelConfig):
    # Compiled: op-by-op init of a scanned stack is slow, and jit lets callers shard it.
    # Cached per config so repeated inits (tests, tools) don't retrace and recompile.
    module = Transformer(cfg)
    return jax.jit(lambda r: nn.meta.unbox(module.init(r, *_dummy_inputs())["params"]))


def init(cfg: Any, rng: jax.Array) -> Params:
    """Initializes parameters: a plain pytree (nested dicts) of arrays."""
    return _compiled_init(ModelConfig.from_config(cfg))(rng)


def logical_axes(cfg: Any) -> Any:
    """A tree matching `init`'s output whose leaves are PartitionSpecs of logical axis names."""
    boxed = jax.eval_shape(lambda: _module(cfg).init(jax.random.key(0), *_dummy_inputs()))
    return nn.get_partition_spec(boxed["params"])


def apply(
    params: Params,
    tokens_BxL: jax.Array,
    positions_BxL: jax.Array,
    segment_ids_BxL: jax.Array,
    cfg: Any,
) -> jax.Array:
    """Returns float32 logits [batch, length, vocab] for packed token rows."""
    return _module(cfg).apply({"params": params}, tokens_BxL, positions_BxL, segment_ids_BxL)


def hidden(
    params: Params,
    tokens_BxL: jax.Array,
    positions_BxL: jax.Array,
    segment_ids_BxL: jax.Array,
    cfg: Any,
) -> jax.Array:
    """The final-normed residual stream [batch, length, d_model] (compute dtype): `apply`
    without the output head, for the fused chunked loss (`xent.py`)."""
    return _module(cfg).apply(
        {"params": params}, tokens_BxL, positions_BxL, segment_ids_BxL, return_hidden=True
    )


CACHE_AXES = ("layers", "batch", "length", "kv_heads", "head_dim")


def init_cache(cfg: Any, batch: int, max_len: int, dtype: Any = None) -> dict[str, jax.Array]:
    """An empty KV cache for `batch` rows of up to `max_len` tokens: {"k", "v"} [N,B,S,G,K].

    The cache is always stacked per layer (as scanned params are), whatever `scan_layers`.
    """
    c = ModelConfig.from_config(cfg)
    shape = (c.n_layers, batch, max_len, c.n_kv_heads, c.head_dim)
    dtype = jnp.dtype(dtype or c.dtype)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def apply_with_cache(
    params: Params,
    tokens_BxL: jax.Array,
    positions_BxL: jax.Array,
    cache: dict[str, jax.Array],
    cfg: Any,
    select_BxT: jax.Array | None = None,
    attend_len: int = 0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """One generation step: logits of new tokens given the cache, and the updated cache.

    Each row's tokens go to cache slots positions[b, 0] ... positions[b, 0] + L - 1
    (positions must be consecutive within a row) and attend to every slot <= their position,
    so rows of a batch can be at different lengths. Prefill: the (right-padded) prompts at
    positions 0..L-1; decode: one token per row at its own position. Positions must stay
    below the cache length (slots are not checked inside jit; a row's write past the end is
    clamped to its last L slots, see `layers.cache_slots`).

    The cache may hold more rows than the batch: the batch is then its first B rows, and the
    other rows are neither read nor written (a serving engine decoding only its busy slots;
    the cache's batch axis must not be sharded then).

    `attend_len` (static; 0 = the whole cache): attention reads only the cache's first
    `attend_len` positions, so a step's cost follows the sequences' lengths, not the
    cache's. Every position + L must then be at most `attend_len` (not checked in jit).
    """
    segment_ids_BxL = jnp.ones_like(tokens_BxL)  # unused by cached attention
    return _module(cfg).apply(
        {"params": params},
        tokens_BxL,
        positions_BxL,
        segment_ids_BxL,
        cache,
        select_BxT,
        attend_len,
    )
