"""Planning: what a config needs on given hardware (memory, step time, MFU), and the ladder.

estimate   the analytic model: mesh layout, exact state shards, activation memory, step time
planner    a config's `Plan` (resolved config, memory, step-time bound, token budget), the ladder
compiled   the check against XLA: the train step compiled ahead of time, its per-device memory
tables     a plan as an aligned text table, the ladder as one line per rung
__main__   `python -m near_jax.plan`: flags and main
"""
