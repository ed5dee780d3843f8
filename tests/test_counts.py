"""Parameter counts and training FLOPs per token, against the leaves of model.init."""

import jax
import pytest
from helpers import model_config

from near_jax import model

jax.config.update("jax_default_matmul_precision", "highest")
# Eager flax scans dispatch op by op; jit keeps these tests fast.
apply = jax.jit(model.apply, static_argnums=4)


def test_flops_per_token_counts_matmuls_and_causal_attention():
    cfg = model_config()
    params = model.init(cfg, jax.random.key(0))
    matmul = sum(
        x.size
        for path, x in jax.tree_util.tree_leaves_with_path(params)
        if path[-1].key not in ("embed", "scale")
    )
    c = model.ModelConfig.from_config(cfg)
    for length in (1, 128, 1000):
        attn = 3 * 4 * c.n_layers * c.n_heads * c.head_dim * (length + 1) / 2
        assert model.flops_per_token(cfg, length) == pytest.approx(6 * matmul + attn)
    counts = model.param_counts(cfg)
    assert counts["total"] == sum(x.size for x in jax.tree.leaves(params))
    assert counts["embedding"] == 384 * 64
