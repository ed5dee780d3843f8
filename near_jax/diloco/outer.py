"""The DiLoCo outer step, shared by in-mesh replicas and islands.

Every H inner steps each replica (or island) r has moved from the global params θ to θ_r.
Its pseudo-gradient is Δ_r = θ − θ_r; the outer step averages them, Δ = mean_r Δ_r (in
float32), and updates θ with an outer optimizer: optax SGD with Nesterov momentum (DiLoCo's
defaults: lr 0.7, momentum 0.9). Every replica then restarts from the new θ.

With lr 1 and momentum 0 the outer step is θ ← θ − Δ = mean_r θ_r: plain parameter
averaging (and, with one replica, plain training).

Two outer optimizers (`diloco.outer_optimizer`; `settings` resolves the config's −1 defaults):

    name        outer step                 error feedback (compressed Δ)   defaults
    nesterov    SGD + Nesterov momentum μ  e ← (Δ + e) − decoded            lr 0.7, μ 0.9, β 1
    sparseloco  plain SGD (μ = 0)          e ← (Δ + β·e) − decoded          lr 1.0, μ 0,   β 0.95

Nesterov is DiLoCo's (Douillard et al., 2023). SparseLoCo (templar, 2025) drops the outer
momentum and lets each worker's error feedback, decayed by β, carry what compression left
out; it pairs with aggressive compression (2-bit values of a chunked top-k of 1–3%), where
momentum on a sparse average would amplify the compression noise. β = 1 keeps every
residual forever (nothing is lost, only delayed); β < 1 forgets old residuals geometrically.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

OUTER_OPTIMIZERS = ("nesterov", "sparseloco")
# (lr, momentum, feedback decay) each outer optimizer uses where the config says -1.
DEFAULTS = {"nesterov": (0.7, 0.9, 1.0), "sparseloco": (1.0, 0.0, 0.95)}


@dataclasses.dataclass(frozen=True)
class OuterSettings:
    """The outer optimizer of a run, defaults resolved: what run manifests record."""

    optimizer: str = "nesterov"
    lr: float = 0.7
    momentum: float = 0.9
    feedback_decay: float = 1.0

    def __post_init__(self):
        if self.optimizer not in OUTER_OPTIMIZERS:
            raise ValueError(
                f"unknown outer optimizer {self.optimizer!r}; one of {OUTER_OPTIMIZERS}"
            )
        if not (self.lr > 0 and 0 <= self.momentum < 1 and 0 < self.feedback_decay <= 1):
            raise ValueError(
                f"bad outer settings {self}: need lr > 0, momentum in [0, 1), "
                "feedback_decay in (0, 1]"
            )
        if self.optimizer == "sparseloco" and self.momentum:
            raise ValueError("sparseloco has no outer momentum (error feedback replaces it)")


def settings(diloco: Any) -> OuterSettings:
    """The OuterSettings of a config's diloco section (a ConfigDict or dict), with each −1
    replaced by the outer optimizer's default (DEFAULTS)."""
    name = diloco["outer_optimizer"] if "outer_optimizer" in diloco else "nesterov"
    if name not in DEFAULTS:
        raise ValueError(f"unknown outer optimizer {name!r}; one of {OUTER_OPTIMIZERS}")
    given = [diloco.get(k, -1) for k in ("outer_lr", "outer_momentum", "feedback_decay")]
    lr, momentum, decay = (
        d if g == -1 else float(g) for g, d in zip(given, DEFAULTS[name], strict=True)
    )
    return OuterSettings(name, lr, momentum, decay)


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
