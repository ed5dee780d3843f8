"""The DiLoCo outer step, shared by in-mesh replicas and islands.

Every H inner steps each replica (or island) r has moved from the global params θ to θ_r.
Its pseudo-gradient is Δ_r = θ − θ_r; the outer step averages them, Δ = mean_r Δ_r (in
float32), and updates θ with an outer optimizer: optax SGD with Nesterov momentum (DiLoCo's
defaults: lr 0.7, momentum 0.9). Every replica then restarts from the new θ.

With lr 1 and momentum 0 the outer step is θ ← θ − Δ = mean_r θ_r: plain parameter
averaging (and, with one replica, plain training).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def outer_optimizer(lr: float, momentum: float) -> optax.GradientTransformation:
    """SGD with Nesterov momentum (plain SGD when momentum is 0)."""
    return optax.sgd(lr, momentum=momentum or None, nesterov=bool(momentum))


def pseudo_gradient(global_params: Any, local_params: Any) -> Any:
    """Δ = θ_global − θ_local in float32."""
    return jax.tree.map(
        lambda g, p: g.astype(jnp.float32) - p.astype(jnp.float32), global_params, local_params
    )


def outer_step(
    optimizer: optax.GradientTransformation,
    global_params: Any,
    outer_state: Any,
    delta: Any,
    mask: Any | None = None,
) -> tuple[Any, Any]:
    """Applies the averaged pseudo-gradient `delta`; returns (new params, new outer state).

    `mask` (a tree of booleans broadcastable to each param, or None for all) limits the step
    to some params (streaming DiLoCo's fragments): elsewhere params and momentum are kept.
    """
    updates, new_state = optimizer.update(delta, outer_state, global_params)
    new_params = jax.tree.map(
        lambda p, u: (p.astype(jnp.float32) + u).astype(p.dtype), global_params, updates
    )
    if mask is None:
        return new_params, new_state
    new_params = jax.tree.map(jnp.where, mask, new_params, global_params)
    state_mask = optax.tree_map_params(
        optimizer, lambda _, m: m, outer_state, mask, transform_non_params=lambda _: True
    )
    new_state = jax.tree.map(jnp.where, state_mask, new_state, outer_state)
    return new_params, new_state
