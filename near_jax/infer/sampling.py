"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus).

All functions are jit-friendly; the sampling settings are static (a hashable dataclass).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How to pick the next token. temperature 0 means greedy (argmax)."""

    temperature: float = 0.0
    top_k: int = 0  # keep the k most likely tokens; 0 = all
    top_p: float = 1.0  # keep the smallest set whose probability reaches p; 1 = all

    def __post_init__(self):
        # NaN passes every comparison below; it (or Inf) would sample garbage, not fail.
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(
                f"temperature={self.temperature} is not allowed: must be a finite number >= 0"
            )
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} is not allowed: must be >= 0 (0 = off)")
        if not 0.0 < self.top_p <= 1.0:  # also refuses NaN
            raise ValueError(f"top_p={self.top_p} is not allowed: must be in (0, 1]")


def mask_top_k(logits_BxV: jax.Array, k: int) -> jax.Array:
    """Sets every logit below the row's k-th largest to -inf (ties at the k-th are kept)."""
    if k <= 0 or k >= logits_BxV.shape[-1]:
        return logits_BxV
    kth_Bx1 = jax.lax.top_k(logits_BxV, k)[0][:, -1:]
    return jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)


def mask_top_p(logits_BxV: jax.Array, p: float) -> jax.Array:
    """Keeps the most likely tokens whose cumulative probability first reaches p (>= 1 token)."""
    if p >= 1.0:
        return logits_BxV
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    # A token is kept if the probability mass strictly before it is still below p.
    before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    kept_BxV = before_BxV < p
    threshold_Bx1 = jnp.min(jnp.where(kept_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits_BxV < threshold_Bx1, -jnp.inf, logits_BxV)


def sample(logits_BxV: jax.Array, rng: jax.Array, sampling: Sampling) -> jax.Array:
    """The next token of each row (int32 [B]) under `sampling`."""
    logits_BxV = logits_BxV.astype(jnp.float32)
    if sampling.temperature == 0.0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits_BxV = logits_BxV / sampling.temperature
    logits_BxV = mask_top_k(logits_BxV, sampling.top_k)
    logits_BxV = mask_top_p(logits_BxV, sampling.top_p)
    return jax.random.categorical(rng, logits_BxV, axis=-1).astype(jnp.int32)


def sample_rows(
    logits_BxV: jax.Array,
    keys_B: jax.Array,
    temperature_B: jax.Array,
    top_k_B: jax.Array,
    top_p_B: jax.Array,
) -> jax.Array:
    """The next token of each row (int32 [B]), each row under its own settings and key.

    The settings are arrays (traced, so one compile serves any mix of requests); a row's
    draw is what `sample` gives that row alone with the same key and Sampling(temperature,
    top_k, top_p): temperature 0 = greedy, top_k 0 = all, top_p 1 = all. `keys_B` is a
    batch of typed PRNG keys, one per row, so a row's draw does not depend on the others.
    """
    logits_BxV = logits_BxV.astype(jnp.float32)
    v = logits_BxV.shape[-1]
    greedy_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    # Greedy rows still go through the draw below (then are replaced): divide by 1, not 0.
    temperature_B = temperature_B.astype(jnp.float32)
    scaled_BxV = logits_BxV / jnp.where(temperature_B > 0, temperature_B, 1.0)[:, None]
    # One descending sort serves both masks: top-k reads the k-th largest, and the top-k
    # masked row sorted is the sorted row with the entries below the k-th set to -inf.
    sorted_BxV = jnp.sort(scaled_BxV, axis=-1)[:, ::-1]
    k_B = top_k_B.astype(jnp.int32)
    kth_Bx1 = jnp.take_along_axis(sorted_BxV, jnp.clip(k_B - 1, 0, v - 1)[:, None], axis=-1)
    kth_Bx1 = jnp.where(((k_B > 0) & (k_B < v))[:, None], kth_Bx1, -jnp.inf)
    scaled_BxV = jnp.where(scaled_BxV < kth_Bx1, -jnp.inf, scaled_BxV)
    sorted_BxV = jnp.where(sorted_BxV < kth_Bx1, -jnp.inf, sorted_BxV)
    # Top-p as in mask_top_p, with p per row; p >= 1 keeps everything (no rounding of the
    # cumulative sum can drop a tail token).
    p_Bx1 = top_p_B.astype(jnp.float32)[:, None]
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    threshold_Bx1 = jnp.min(
        jnp.where(before_BxV < p_Bx1, sorted_BxV, jnp.inf), axis=-1, keepdims=True
    )
    threshold_Bx1 = jnp.where(p_Bx1 >= 1.0, -jnp.inf, threshold_Bx1)
    scaled_BxV = jnp.where(scaled_BxV < threshold_Bx1, -jnp.inf, scaled_BxV)
    drawn_B = jax.vmap(lambda key, row_V: jax.random.categorical(key, row_V))(keys_B, scaled_BxV)
    return jnp.where(temperature_B > 0, drawn_B.astype(jnp.int32), greedy_B)
