"""Sizes of a model: parameter counts and training FLOPs per token."""

from __future__ import annotations

import functools
from typing import Any

import jax

from near_jax.config import ModelConfig
from near_jax.model.transformer import init


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
