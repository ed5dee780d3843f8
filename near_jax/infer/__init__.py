"""Inference: load a trained run and sample from it.

loading     a run's config, tokenizer and params from its newest readable checkpoint
sampling    temperature / top-k / top-p sampling
generator   batched generation with a KV cache, bucketed shapes and memory checks

The command line is `python -m near_jax.generate` (near_jax/generate.py).
"""
