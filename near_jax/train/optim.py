"""The optimizer: optax AdamW with warm-up + decay, global-norm clipping, a weight-decay mask."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

# Leaves whose key is one of these are embedding tables (decayed only if decay_embeddings).
EMBEDDING_KEYS = ("embed",)
# Leaves with one of these keys are norm scales or biases: never decayed.
NO_DECAY_KEYS = ("scale", "bias")


def make_schedule(optim_cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to lr, then cosine/linear decay to lr*min_lr_ratio, or constant."""
    lr, warmup = optim_cfg.lr, min(optim_cfg.warmup_steps, total_steps)
    final = lr * optim_cfg.min_lr_ratio
    decay_steps = max(total_steps - warmup, 1)
    if optim_cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=optim_cfg.min_lr_ratio)
    elif optim_cfg.schedule == "linear":
        decay = optax.linear_schedule(lr, final, decay_steps)
    else:
        decay = optax.constant_schedule(lr)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def decay_mask(params: Any, decay_embeddings: bool) -> Any:
    """True where weight decay applies: weight matrices, and embeddings if asked."""

    def keep(path, _):
        key = getattr(path[-1], "key", None)
        if key in NO_DECAY_KEYS:
            return False
        if key in EMBEDDING_KEYS:
            return decay_embeddings
        return True

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(
    optim_cfg: ml_collections.ConfigDict, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Returns (optimizer, learning-rate schedule) for a run of `total_steps` steps."""
    schedule = make_schedule(optim_cfg, total_steps)
    adamw = optax.adamw(
        schedule,
        b1=optim_cfg.b1,
        b2=optim_cfg.b2,
        eps=optim_cfg.eps,
        weight_decay=optim_cfg.weight_decay,
        mask=lambda p: decay_mask(p, optim_cfg.decay_embeddings),
    )
    if optim_cfg.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(optim_cfg.clip_norm), adamw), schedule
    return adamw, schedule
