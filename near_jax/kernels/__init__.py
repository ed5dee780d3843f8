"""Attention kernels behind one door: `near_jax.kernels.attention`."""

from near_jax.kernels.attention import IMPLEMENTATIONS, attention, cached_attention

__all__ = ["IMPLEMENTATIONS", "attention", "cached_attention"]
