"""The model: a pure-functional decoder-only transformer (`params = model.init(cfg, rng)`).

transformer   layers (RMSNorm, RoPE attention, MLP, Block), the scanned Transformer, init,
              apply (with and without a KV cache), loss, parameter and FLOPs counts
kernels/      attention behind one door (`xla`, `pallas`, `cudnn`, `splash`, `auto`)

The model's schema is `near_jax.config.ModelConfig` (re-exported here). The package
re-exports the transformer's public functions so callers write `model.init(...)`,
`model.apply(...)`, `model.loss_fn(...)`.
"""

from near_jax.model.transformer import (
    CACHE_AXES,
    REMAT_POLICIES,
    ModelConfig,
    Params,
    apply,
    apply_with_cache,
    flops_per_token,
    init,
    init_cache,
    logical_axes,
    loss_fn,
    param_counts,
    rope,
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
