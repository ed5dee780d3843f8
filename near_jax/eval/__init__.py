"""Evaluation of checkpoints: held-out loss and multiple-choice tasks.

heldout       loss and perplexity on documents held out from training
taskfile      task files: the JSONL format, loading and validation (`TaskError`)
prompts       few-shot requests: one (prompt, continuation) per example and choice
scoring       log-likelihood of each request under the model, in padded, bucketed batches
tasks         a task end to end (`evaluate_task`): acc and acc_norm with their stderrs
checkpoints   evaluate a run's checkpoints once, or each as it appears (`watch`)
evaltasks/    task files shipped with near_jax
__main__      `python -m near_jax.eval`: flags and main
"""
