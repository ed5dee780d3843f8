"""The training loss: weighted next-token cross-entropy, with an optional z-loss.

With `model.loss_chunk` > 0 the output head and the loss run fused, chunk by chunk over the
sequence (`xent.fused_xent`), so no [B, L, V] logits are ever held; 0 computes the full
logits with `apply` (the reference the fused path is tested against).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from near_jax.config import ModelConfig
from near_jax.model.transformer import Params, apply, hidden
from near_jax.model.xent import fused_xent, head_weights


def loss_fn(params: Params, batch: dict[str, jax.Array], cfg: Any) -> tuple[jax.Array, dict]:
    """Weighted next-token cross-entropy (+ z-loss); returns (loss, aux metrics)."""
    mcfg = ModelConfig.from_config(cfg)
    args = (params, batch["inputs"], batch["positions"], batch["segment_ids"], mcfg)
    weights_BxL = batch["weights"].astype(jnp.float32)
    denom = jnp.maximum(weights_BxL.sum(), 1.0)
    if mcfg.loss_chunk:
        head_DxV = head_weights(params, mcfg.tie_embeddings)
        xent_sum, z_sum = fused_xent(
            hidden(*args), head_DxV, batch["targets"], weights_BxL, mcfg.loss_chunk, mcfg.dtype
        )
    else:
        logits_BxLxV = apply(*args)
        xent_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, batch["targets"])
        xent_sum = (xent_BxL * weights_BxL).sum()
        z_sum = 0.0
        if mcfg.z_loss:
            log_z_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
            z_sum = (jnp.square(log_z_BxL) * weights_BxL).sum()
    xent = xent_sum / denom
    loss = xent + mcfg.z_loss * z_sum / denom if mcfg.z_loss else xent
    return loss, {"xent": xent, "weight": weights_BxL.sum()}
