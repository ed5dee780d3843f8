"""Planning: what a config needs on given hardware (memory, step time, MFU), and the ladder.

planner    the analytic memory and step-time model, the compiled-memory check, the tables
__main__   `python -m near_jax.plan`: flags and main
"""
