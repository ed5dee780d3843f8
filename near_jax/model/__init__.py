"""The model: a pure-functional decoder-only transformer (`params = model.init(cfg, rng)`).

layers        RMSNorm, RoPE, grouped-query attention, the SwiGLU MLP, Block
transformer   the scanned Transformer: init, logical axes, apply (with and without a KV cache),
              hidden (the final-normed residual stream, for the fused loss)
loss          weighted next-token cross-entropy (+ z-loss)
xent          the fused, chunked head + cross-entropy (`model.loss_chunk`): no [B, L, V] logits
counts        parameter counts and training FLOPs per token
kernels/      attention behind one door (`xla`, `pallas`, `cudnn`, `splash`, `auto`)

The model's schema is `near_jax.config.ModelConfig` (re-exported here). The package
re-exports the public functions so callers write `model.init(...)`, `model.apply(...)`,
`model.loss_fn(...)`.

Tensor names carry their shape, one capital letter per axis joined by `x` (`q_BxLxHxK`,
`logits_BxLxV`); a letter means the same axis everywhere in near_jax:

  A  micro-batches of a step (gradient accumulation, `train.microbatches`)
  B  batch: rows
  C  choices of one multiple-choice example
  D  d_model, the residual stream
  E  examples of a task
  F  MLP hidden width (`mlp_dim`)
  G  key/value heads (`n_kv_heads`)
  H  query heads (`n_heads`)
  K  head dim (K2: half of it, the RoPE frequencies)
  L  length: tokens of a row (the queries, in attention)
  M  key/value length in attention (M == L in self-attention)
  N  layers (`n_layers`)
  P  prompt length (prefill)
  Q  query heads per key/value head (H = G x Q)
  R  replicas (in-mesh DiLoCo)
  S  slots of the KV cache (its length)
  T  output positions: those whose logits are computed, or the tokens generated
  V  vocab
  Z  fragments of the params (streaming DiLoCo)
  1  an axis of size 1
"""

from near_jax.config import ModelConfig  # the model's schema, re-exported
from near_jax.model.counts import flops_per_token, param_counts
from near_jax.model.layers import rope
from near_jax.model.loss import loss_fn
from near_jax.model.transformer import (
    CACHE_AXES,
    REMAT_POLICIES,
    Params,
    apply,
    apply_with_cache,
    hidden,
    init,
    init_cache,
    logical_axes,
)
from near_jax.model.xent import chunked_scores, fused_xent, head_weights

__all__ = [
    "CACHE_AXES",
    "REMAT_POLICIES",
    "ModelConfig",
    "Params",
    "apply",
    "apply_with_cache",
    "chunked_scores",
    "flops_per_token",
    "fused_xent",
    "head_weights",
    "hidden",
    "init",
    "init_cache",
    "logical_axes",
    "loss_fn",
    "param_counts",
    "rope",
]
