"""Evaluation of checkpoints: held-out loss and multiple-choice tasks.

heldout       loss and perplexity on documents held out from training
tasks         task files (format, few-shot requests, scoring by log-likelihood)
checkpoints   evaluate a run's checkpoints once, or each as it appears (`watch`)
evaltasks/    task files shipped with near_jax
__main__      `python -m near_jax.eval`: flags and main
"""
