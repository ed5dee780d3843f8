"""The layers of the transformer, as Flax Linen modules: RMSNorm, RoPE, attention, MLP, Block.

Every layer takes a `ModelConfig` (`near_jax.config`: the model section as a hashable value).
Each parameter is created with its logical axis names (`nn.with_logical_partitioning`), and
activations are constrained to theirs, for `sharding.py` to map to the mesh.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from near_jax.config import ModelConfig
from near_jax.model import kernels
from near_jax.sharding import constrain


def normal(std: float, names: tuple[str, ...]):
    """A normal(std) initializer whose parameter carries the logical axis `names`."""
    return nn.with_logical_partitioning(nn.initializers.normal(std), names)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learned scale, computed in float32."""

    eps: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        init = nn.with_logical_partitioning(nn.initializers.ones, ("embed",))
        scale_D = self.param("scale", init, (x_BxLxD.shape[-1],), self.param_dtype)
        x = x_BxLxD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return (x * scale_D.astype(jnp.float32)).astype(self.dtype)


def rope(x_BxLxHxK: jax.Array, positions_BxL: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding, rotating the two halves of each head (the HF Llama layout)."""
    half = x_BxLxHxK.shape[-1] // 2
    inv_freq_K2 = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles_BxLxK2 = positions_BxL[..., None].astype(jnp.float32) * inv_freq_K2
    sin = jnp.sin(angles_BxLxK2)[:, :, None, :]
    cos = jnp.cos(angles_BxLxK2)[:, :, None, :]
    x1, x2 = jnp.split(x_BxLxHxK.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxLxHxK.dtype)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE; the kernel comes from `near_jax.model.kernels`."""

    cfg: ModelConfig
    attend_len: int = 0  # with a cache: its first positions the queries read (0 = all)

    @nn.compact
    def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL, cache=None, layer=None):
        """Without `cache`: attention within the rows; returns (out, None).

        With `cache` (the whole stacked cache, {"k", "v"} of [N,B,S,G,K]; it may hold more
        rows than the batch, whose rows are then its first B) and this block's
        `layer` index: attends over layer `layer` of the cache as it will be once this call's
        keys/values are written (`write_cache`), and returns (out, {"k", "v"} of [B,L,G,K]):
        the new entries, which the caller writes for all layers at once after the stack. The
        cache is only read here, so a scanned stack never copies it in or out of its loop.
        """
        c = self.cfg
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        d, h, g, k = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim
        out_std = c.init_std / (2 * c.n_layers) ** 0.5
        w_q = self.param("q", normal(c.init_std, ("embed", "heads", "head_dim")), (d, h, k), pdt)
        kv_names = ("embed", "kv_heads", "head_dim")
        w_k = self.param("k", normal(c.init_std, kv_names), (d, g, k), pdt)
        w_v = self.param("v", normal(c.init_std, kv_names), (d, g, k), pdt)
        w_o = self.param("o", normal(out_std, ("heads", "head_dim", "embed")), (h, k, d), pdt)

        q_BxLxHxK = jnp.einsum("bld,dhk->blhk", x_BxLxD, w_q.astype(dt))
        k_BxLxGxK = jnp.einsum("bld,dgk->blgk", x_BxLxD, w_k.astype(dt))
        v_BxLxGxK = jnp.einsum("bld,dgk->blgk", x_BxLxD, w_v.astype(dt))
        q_BxLxHxK = constrain(q_BxLxHxK, ("batch", "length", "heads", "head_dim"))
        k_BxLxGxK = constrain(k_BxLxGxK, ("batch", "length", "kv_heads", "head_dim"))
        v_BxLxGxK = constrain(v_BxLxGxK, ("batch", "length", "kv_heads", "head_dim"))
        q_BxLxHxK = rope(q_BxLxHxK, positions_BxL, c.rope_theta)
        k_BxLxGxK = rope(k_BxLxGxK, positions_BxL, c.rope_theta)
        if cache is not None:
            new = {"k": k_BxLxGxK, "v": v_BxLxGxK}
            k_BxSxGxK, v_BxSxGxK = (
                _with_new_entries(cache[n], layer, new[n], positions_BxL, self.attend_len)
                for n in ("k", "v")
            )
            out_BxLxHxK = kernels.cached_attention(
                q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, positions_BxL, window=c.attention_window
            )
            out_BxLxD = jnp.einsum("blhk,hkd->bld", out_BxLxHxK, w_o.astype(dt))
            return constrain(out_BxLxD, ("batch", "length", "embed")), new
        out_BxLxHxK = kernels.attention(
            q_BxLxHxK,
            k_BxLxGxK,
            v_BxLxGxK,
            segment_ids_BxL=segment_ids_BxL,
            causal=True,
            impl=c.attention,
            block_q=c.attention_block_q,
            block_kv=c.attention_block_kv,
            window=c.attention_window,
        )
        out_BxLxD = jnp.einsum("blhk,hkd->bld", out_BxLxHxK, w_o.astype(dt))
        return constrain(out_BxLxD, ("batch", "length", "embed")), None


def cache_slots(positions_BxL: jax.Array, cache_len: int) -> jax.Array:
    """The cache slots [B, L] a call's entries go to: positions[b, 0] + 0 .. L-1 per row.

    As `jax.lax.dynamic_update_slice` did before, a start past the end is clamped so that
    the L entries fit (start = min(positions[b, 0], cache_len - L)): entries are never
    dropped or wrapped, but a row written past the end overwrites its last L slots under
    the wrong positions. Callers keep positions below the cache length
    (`near_jax.serve.slots` sizes the cache as a multiple of its chunk).
    """
    length = positions_BxL.shape[1]
    start_B = jnp.clip(positions_BxL[:, 0], 0, cache_len - length)
    return start_B[:, None] + jnp.arange(length, dtype=start_B.dtype)


def write_cache(
    cache_NxBxSxGxK: jax.Array, new_NxBxLxGxK: jax.Array, positions_BxL: jax.Array
) -> jax.Array:
    """Writes every layer's new entries into the stacked cache at `cache_slots`.

    One scatter in the cache's own layout that touches only the B*L new entries per layer:
    with a donated cache XLA updates it in place (a per-row dynamic_update_slice, vmapped,
    became a scatter over transposed copies of the whole cache).
    """
    slots_BxL = cache_slots(positions_BxL, cache_NxBxSxGxK.shape[2])
    b, length = slots_BxL.shape
    if cache_NxBxSxGxK.shape[1] == b:
        # Row b's L updates go to slots slots[b] of row b: the batch is a batching dim of the
        # scatter (not an index), which XLA keeps local where the batch is sharded (explicit
        # row indices get all-gathered, and a vmap moves the batch to the front: transposes).
        dims = jax.lax.ScatterDimensionNumbers(
            update_window_dims=(0, 3, 4),  # N, G, K of the updates [N, B, L, G, K]
            inserted_window_dims=(2,),  # S: one slot per update
            scatter_dims_to_operand_dims=(2,),
            operand_batching_dims=(1,),
            scatter_indices_batching_dims=(0,),
        )
        indices = slots_BxL[:, :, None]
    else:  # the batch is the cache's first B rows (an unsharded batch axis): explicit rows
        dims = jax.lax.ScatterDimensionNumbers(
            update_window_dims=(0, 3, 4),
            inserted_window_dims=(1, 2),  # one row and one slot per update
            scatter_dims_to_operand_dims=(1, 2),
        )
        rows_BxL = jnp.broadcast_to(jnp.arange(b)[:, None], (b, length))
        indices = jnp.stack([rows_BxL, slots_BxL], axis=-1)
    cache_NxBxSxGxK = jax.lax.scatter(
        cache_NxBxSxGxK,
        indices,
        new_NxBxLxGxK.astype(cache_NxBxSxGxK.dtype),
        dims,
        indices_are_sorted=True,
        unique_indices=True,
        mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS,  # cache_slots clamps
    )
    return constrain(cache_NxBxSxGxK, ("layers", "batch", "length", "kv_heads", "head_dim"))


def _with_new_entries(
    cache_NxBxSxGxK, layer, new_BxLxGxK, positions_BxL, attend_len: int = 0
) -> jax.Array:
    """Layer `layer` of the cache as `write_cache` will leave it: [B, S, G, K], S the
    cache's first `attend_len` positions (0 = all; every position must lie below it).

    Decode (L = 1): a select, elementwise, which XLA fuses with the layer's slice into one
    pass; the stacked cache itself is neither copied nor updated inside the stack. Chunks:
    the same scatter as `write_cache`, on the layer's slice (a select would need a gather).
    """
    b, length = new_BxLxGxK.shape[:2]
    s = attend_len or cache_NxBxSxGxK.shape[2]
    if length > 1:
        layer_1xBxSxGxK = jax.lax.dynamic_slice_in_dim(cache_NxBxSxGxK, layer, 1, axis=0)
        return write_cache(layer_1xBxSxGxK[:, :b, :s], new_BxLxGxK[None], positions_BxL)[0]
    # [:b]: the batch is the cache's first B rows (all of them, but for a serving bucket);
    # [:, :s]: a short sequence reads only the start of a long cache.
    layer_BxSxGxK = jax.lax.dynamic_index_in_dim(cache_NxBxSxGxK, layer, 0, keepdims=False)
    cache_BxSxGxK = layer_BxSxGxK[:b, :s]
    is_new_BxS = jnp.arange(s)[None, :] == cache_slots(positions_BxL, s)
    out_BxSxGxK = jnp.where(
        is_new_BxS[:, :, None, None], new_BxLxGxK.astype(cache_BxSxGxK.dtype), cache_BxSxGxK
    )
    return constrain(out_BxSxGxK, ("batch", "length", "kv_heads", "head_dim"))


class Mlp(nn.Module):
    """SwiGLU feed-forward block."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD):
        c = self.cfg
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        out_std = c.init_std / (2 * c.n_layers) ** 0.5
        w_gate = self.param(
            "gate", normal(c.init_std, ("embed", "mlp")), (c.d_model, c.mlp_dim), pdt
        )
        w_up = self.param("up", normal(c.init_std, ("embed", "mlp")), (c.d_model, c.mlp_dim), pdt)
        w_down = self.param("down", normal(out_std, ("mlp", "embed")), (c.mlp_dim, c.d_model), pdt)
        gate_BxLxF = jnp.einsum("bld,df->blf", x_BxLxD, w_gate.astype(dt))
        up_BxLxF = jnp.einsum("bld,df->blf", x_BxLxD, w_up.astype(dt))
        hidden_BxLxF = constrain(nn.silu(gate_BxLxF) * up_BxLxF, ("batch", "length", "mlp"))
        out_BxLxD = jnp.einsum("blf,fd->bld", hidden_BxLxF, w_down.astype(dt))
        return constrain(out_BxLxD, ("batch", "length", "embed"))


class Block(nn.Module):
    """One pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    cfg: ModelConfig
    attend_len: int = 0  # as Attention's

    @nn.compact
    def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL, cache=None, layer=None):
        """(x, None), or with the stacked `cache` and this block's `layer` (x, new entries)."""
        c = self.cfg
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        h = RMSNorm(c.norm_eps, dt, pdt, name="attn_norm")(x_BxLxD)
        attn = Attention(c, self.attend_len, name="attn")
        attn_BxLxD, new = attn(h, positions_BxL, segment_ids_BxL, cache, layer)
        x_BxLxD = x_BxLxD + attn_BxLxD
        h = RMSNorm(c.norm_eps, dt, pdt, name="mlp_norm")(x_BxLxD)
        x_BxLxD = x_BxLxD + Mlp(c, name="mlp")(h)
        x_BxLxD = constrain(x_BxLxD, ("batch", "length", "embed"))
        return x_BxLxD, new
