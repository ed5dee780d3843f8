"""Attention kernels behind one door: `near_jax.model.kernels.attention`."""

from near_jax.model.kernels.attention import IMPLEMENTATIONS, attention, cached_attention

__all__ = ["IMPLEMENTATIONS", "attention", "cached_attention"]
