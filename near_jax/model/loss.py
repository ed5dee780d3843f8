"""The training loss: weighted next-token cross-entropy, with an optional z-loss."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from near_jax.config import ModelConfig
from near_jax.model.transformer import Params, apply


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
