"""The model: a pure-functional decoder-only transformer (`params = model.init(cfg, rng)`).

layers        RMSNorm, RoPE, grouped-query attention, the SwiGLU MLP, Block
transformer   the scanned Transformer: init, logical axes, apply (with and without a KV cache)
loss          weighted next-token cross-entropy (+ z-loss)
counts        parameter counts and training FLOPs per token
kernels/      attention behind one door (`xla`, `pallas`, `cudnn`, `splash`, `auto`)

The model's schema is `near_jax.config.ModelConfig` (re-exported here). The package
re-exports the public functions so callers write `model.init(...)`, `model.apply(...)`,
`model.loss_fn(...)`.
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
    init,
    init_cache,
    logical_axes,
)

__all__ = [
    "CACHE_AXES",
    "REMAT_POLICIES",
    "ModelConfig",
    "Params",
    "apply",
    "apply_with_cache",
    "flops_per_token",
    "init",
    "init_cache",
    "logical_axes",
    "loss_fn",
    "param_counts",
    "rope",
]
