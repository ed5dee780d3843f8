"""Training: the state and step, the loop, checkpoints, and what keeps a run alive.

step                   TrainState, the jitted train/eval steps (`Trainer`), microbatching
inmesh                 in-mesh DiLoCo: replicas on a `replica` mesh axis, the same `Trainer`
loop                   `trainer_for` (the Trainer a config asks for) and `train(cfg, workdir)`
optim                  the optimizer and learning-rate schedule
checkpoint             Orbax checkpoints: async saves, retention, verified restores
checkpoint_reads       a step read without resuming: params only (init_from), config, kind
checkpoint_integrity   per-step sha256 manifests, verification, quarantine of damaged steps
preemption             SIGTERM/preemption notice → save and stop
distributed            multi-host start-up (`jax.distributed`)
metrics                writers (jsonl, TensorBoard), MFU, progress
__main__               `python -m near_jax.train`: flags and main
"""
