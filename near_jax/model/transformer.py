"""A Llama-3-style decoder-only transformer, pure-functional over a plain params pytree.

    params = init(cfg, rng)
    logits_BxLxV = apply(params, tokens_BxL, positions_BxL, segment_ids_BxL, cfg)

`cfg` is the `model` section of the config (a ConfigDict) or a `ModelConfig`. Layers are
Flax Linen modules stacked with `nn.scan`; every parameter carries logical axis names, which
`logical_axes(cfg)` returns as a tree of PartitionSpecs for `sharding.py` to map to the mesh.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from near_jax.config import ModelConfig  # the model fields; model.ModelConfig stays usable
from near_jax.model import kernels
from near_jax.sharding import constrain

Params = Any


def _normal(std: float, names: tuple[str, ...]):
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

    @nn.compact
    def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL, cache=None):
        """Without `cache`: attention within the rows. With `cache` ({"k", "v"} of [B,S,G,K]):
        writes this call's keys/values at their positions and attends over the cache;
        returns (out, new cache)."""
        c = self.cfg
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        d, h, g, k = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim
        out_std = c.init_std / (2 * c.n_layers) ** 0.5
        w_q = self.param("q", _normal(c.init_std, ("embed", "heads", "head_dim")), (d, h, k), pdt)
        kv_names = ("embed", "kv_heads", "head_dim")
        w_k = self.param("k", _normal(c.init_std, kv_names), (d, g, k), pdt)
        w_v = self.param("v", _normal(c.init_std, kv_names), (d, g, k), pdt)
        w_o = self.param("o", _normal(out_std, ("heads", "head_dim", "embed")), (h, k, d), pdt)

        q_BxLxHxK = jnp.einsum("bld,dhk->blhk", x_BxLxD, w_q.astype(dt))
        k_BxLxGxK = jnp.einsum("bld,dgk->blgk", x_BxLxD, w_k.astype(dt))
        v_BxLxGxK = jnp.einsum("bld,dgk->blgk", x_BxLxD, w_v.astype(dt))
        q_BxLxHxK = constrain(q_BxLxHxK, ("batch", "length", "heads", "head_dim"))
        k_BxLxGxK = constrain(k_BxLxGxK, ("batch", "length", "kv_heads", "head_dim"))
        v_BxLxGxK = constrain(v_BxLxGxK, ("batch", "length", "kv_heads", "head_dim"))
        q_BxLxHxK = rope(q_BxLxHxK, positions_BxL, c.rope_theta)
        k_BxLxGxK = rope(k_BxLxGxK, positions_BxL, c.rope_theta)
        if cache is not None:
            cache = {
                "k": _write_cache(cache["k"], k_BxLxGxK, positions_BxL),
                "v": _write_cache(cache["v"], v_BxLxGxK, positions_BxL),
            }
            out_BxLxHxK = kernels.cached_attention(
                q_BxLxHxK, cache["k"], cache["v"], positions_BxL, window=c.attention_window
            )
            out_BxLxD = jnp.einsum("blhk,hkd->bld", out_BxLxHxK, w_o.astype(dt))
            return constrain(out_BxLxD, ("batch", "length", "embed")), cache
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


def _write_cache(cache_BxSxGxK: jax.Array, new_BxLxGxK: jax.Array, positions_BxL: jax.Array):
    """Writes each row's new entries into its cache from slot positions[b, 0] on."""
    new_BxLxGxK = new_BxLxGxK.astype(cache_BxSxGxK.dtype)
    write = jax.vmap(lambda c, n, p: jax.lax.dynamic_update_slice_in_dim(c, n, p, axis=0))
    cache_BxSxGxK = write(cache_BxSxGxK, new_BxLxGxK, positions_BxL[:, 0])
    return constrain(cache_BxSxGxK, ("batch", "length", "kv_heads", "head_dim"))


class Mlp(nn.Module):
    """SwiGLU feed-forward block."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD):
        c = self.cfg
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        out_std = c.init_std / (2 * c.n_layers) ** 0.5
        w_gate = self.param(
            "gate", _normal(c.init_std, ("embed", "mlp")), (c.d_model, c.mlp_dim), pdt
        )
        w_up = self.param("up", _normal(c.init_std, ("embed", "mlp")), (c.d_model, c.mlp_dim), pdt)
        w_down = self.param("down", _normal(out_std, ("mlp", "embed")), (c.mlp_dim, c.d_model), pdt)
        gate_BxLxF = jnp.einsum("bld,df->blf", x_BxLxD, w_gate.astype(dt))
        up_BxLxF = jnp.einsum("bld,df->blf", x_BxLxD, w_up.astype(dt))
        hidden_BxLxF = constrain(nn.silu(gate_BxLxF) * up_BxLxF, ("batch", "length", "mlp"))
        out_BxLxD = jnp.einsum("blf,fd->bld", hidden_BxLxF, w_down.astype(dt))
        return constrain(out_BxLxD, ("batch", "length", "embed"))


class Block(nn.Module):
    """One pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL, cache=None):
        c = self.cfg
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        h = RMSNorm(c.norm_eps, dt, pdt, name="attn_norm")(x_BxLxD)
        attn_BxLxD, cache = Attention(c, name="attn")(h, positions_BxL, segment_ids_BxL, cache)
        x_BxLxD = x_BxLxD + attn_BxLxD
        h = RMSNorm(c.norm_eps, dt, pdt, name="mlp_norm")(x_BxLxD)
        x_BxLxD = x_BxLxD + Mlp(c, name="mlp")(h)
        x_BxLxD = constrain(x_BxLxD, ("batch", "length", "embed"))
        return x_BxLxD, cache


REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Transformer(nn.Module):
    """Embedding, the stack of blocks (scanned or unrolled), final norm and output head."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens_BxL, positions_BxL, segment_ids_BxL, cache=None, select_BxT=None):
        """Logits [B, L, V]; with `cache` (stacked per layer) returns (logits, new cache).

        `select_BxT`, if given, picks the positions whose logits are computed ([B, T, V]),
        so a prefill pays for the output head on one position per row, not all L.
        """
        c = self.cfg
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        # Untied, the lookup table starts at std 1 (unit-scale residual stream); tied, it is
        # also the output head, so it starts at the head's init_std (the Llama convention).
        embed_std = c.init_std if c.tie_embeddings else 1.0
        embed_VxD = self.param(
            "embed", _normal(embed_std, ("vocab", "embed")), (c.vocab_size, c.d_model), pdt
        )
        x_BxLxD = jnp.take(embed_VxD, tokens_BxL, axis=0).astype(dt)
        x_BxLxD = constrain(x_BxLxD, ("batch", "length", "embed"))

        block = Block
        if c.remat != "none" and cache is None:
            block = nn.remat(Block, policy=REMAT_POLICIES[c.remat], prevent_cse=not c.scan_layers)
        if c.scan_layers:
            # The cache, stacked on a leading layer axis, is scanned over like the params.
            stack = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast) + ((0,) if cache is not None else ()),
                length=c.n_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            extra = (cache,) if cache is not None else ()
            x_BxLxD, cache = stack(c, name="blocks")(
                x_BxLxD, positions_BxL, segment_ids_BxL, *extra
            )
        else:
            layers = []
            for i in range(c.n_layers):
                layer_cache = None if cache is None else jax.tree.map(lambda x, i=i: x[i], cache)
                x_BxLxD, layer_cache = block(c, name=f"block_{i}")(
                    x_BxLxD, positions_BxL, segment_ids_BxL, layer_cache
                )
                layers.append(layer_cache)
            if cache is not None:
                cache = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)

        if select_BxT is not None:
            x_BxLxD = jnp.take_along_axis(x_BxLxD, select_BxT[:, :, None], axis=1)
        x_BxLxD = RMSNorm(c.norm_eps, dt, pdt, name="final_norm")(x_BxLxD)
        if c.tie_embeddings:
            head_DxV = embed_VxD.T  # exactly as Hugging Face Llama ties them
        else:
            head_DxV = self.param(
                "head", _normal(c.init_std, ("embed", "vocab")), (c.d_model, c.vocab_size), pdt
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
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """One generation step: logits of new tokens given the cache, and the updated cache.

    Each row's tokens go to cache slots positions[b, 0] ... positions[b, 0] + L - 1
    (positions must be consecutive within a row) and attend to every slot <= their position,
    so rows of a batch can be at different lengths. Prefill: the (right-padded) prompts at
    positions 0..L-1; decode: one token per row at its own position. Positions must stay
    below the cache length (slots are not checked inside jit).
    """
    segment_ids_BxL = jnp.ones_like(tokens_BxL)  # unused by cached attention
    return _module(cfg).apply(
        {"params": params}, tokens_BxL, positions_BxL, segment_ids_BxL, cache, select_BxT
    )


def loss_fn(params: Params, batch: dict[str, jax.Array], cfg: Any) -> tuple[jax.Array, dict]:
    """Weighted next-token cross-entropy (+ z-loss); returns (loss, aux metrics)."""
    mcfg = ModelConfig.from_config(cfg)
    logits_BxLxV = apply(params, batch["inputs"], batch["positions"], batch["segment_ids"], mcfg)
    weights_BxL = batch["weights"].astype(jnp.float32)
    xent_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, batch["targets"])
    denom = jnp.maximum(weights_BxL.sum(), 1.0)
    xent = (xent_BxL * weights_BxL).sum() / denom
    loss = xent
    if mcfg.z_loss:
        log_z_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
        loss = loss + mcfg.z_loss * (jnp.square(log_z_BxL) * weights_BxL).sum() / denom
    return loss, {"xent": xent, "weight": weights_BxL.sum()}


def param_counts(cfg: Any) -> dict[str, int]:
    """Parameter counts: total, embedding (input table) and non-embedding."""
    shapes = jax.eval_shape(functools.partial(init, cfg), jax.random.key(0))
    total = sum(x.size for x in jax.tree.leaves(shapes))
    embedding = shapes["embed"].size
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}


def flops_per_token(cfg: Any, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul params + causal attention, forward + backward.

    Matmul params are all weights except the input embedding (a lookup, not a matmul) and the
    norms; the output head counts whether tied or not. Causal attention is counted honestly:
    query i attends to i + 1 keys, so a row of L tokens averages (L + 1) / 2 keys per query,
    and QK^T plus PV cost 2 * 2 * heads * head_dim FLOPs per query-key pair, times 3 for
    forward + backward.
    """
    c = ModelConfig.from_config(cfg)
    attn = c.d_model * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads)
    mlp = 3 * c.d_model * c.mlp_dim
    matmul_params = c.n_layers * (attn + mlp) + c.d_model * c.vocab_size
    attention = 3 * 4 * c.n_layers * c.n_heads * c.head_dim * (seq_len + 1) / 2
    return 6.0 * matmul_params + attention
