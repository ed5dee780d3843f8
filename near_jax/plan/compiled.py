"""The check against XLA: the train step compiled ahead of time, and its per-device memory.

`python -m near_jax.plan --compile` imports this only in the worker that simulates the devices:
it pulls in the train loop and the data pipeline (grain, orbax), which planning never needs.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from near_jax import data, sharding
from near_jax.plan.planner import resolve
from near_jax.train.loop import trainer_for

# XLA CPU options that compile ~4x faster with the same buffer assignment: the LLVM back end
# without optimizations, the new fusion emitters off (a flag newer XLA no longer has).
FAST_CPU_OPTIONS: dict[str, Any] = {
    "xla_backend_optimization_level": 0,
    "xla_cpu_use_fusion_emitters": False,
}


@functools.cache
def fast_cpu_compile_options() -> dict[str, Any]:
    """FAST_CPU_OPTIONS less those the running XLA does not know (one tiny compile each)."""
    x = jax.device_put(np.zeros(2, np.float32), jax.devices("cpu")[0])
    lowered = jax.jit(lambda a: a + 1).lower(x)
    known = {}
    for key, value in FAST_CPU_OPTIONS.items():
        try:
            lowered.compile(compiler_options={key: value})
        except jax.errors.JaxRuntimeError:
            continue
        known[key] = value
    return known


def fast_cpu_xla_flags() -> str:
    """fast_cpu_compile_options() as XLA_FLAGS text, for child processes."""
    return " ".join(
        f"--{key}={str(value).lower()}" for key, value in fast_cpu_compile_options().items()
    )


def compiled_memory(cfg: ml_collections.ConfigDict, devices: list[Any]) -> dict[str, float]:
    """Per-device bytes XLA assigns to the train step on `devices` (compiled, not run).

    Lowers `near_jax.train`'s jitted step from abstract state and batch (nothing is
    allocated) and reads `compiled.memory_analysis()`: arguments + outputs - aliased
    (donated) + temporaries. Compiled with fast_cpu_compile_options(): buffer assignment is
    the same, compiling is ~4x faster.
    """
    cfg = resolve(cfg)
    mesh = sharding.make_mesh(cfg.mesh, devices)
    start = time.perf_counter()
    trainer = trainer_for(cfg, mesh)
    rows, seq = cfg.train.global_batch_size, cfg.data.seq_len
    batch = {
        k: jax.ShapeDtypeStruct(
            (rows, seq), np.float32 if k == "weights" else np.int32, sharding=trainer.batch_sharding
        )
        for k in data.FEATURES
    }
    lowered = trainer.step.lower(trainer.abstract_state, batch)
    compiled = lowered.compile(compiler_options=fast_cpu_compile_options())
    stats = compiled.memory_analysis()
    total = (
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        - stats.alias_size_in_bytes
        + stats.temp_size_in_bytes
    )
    return {
        "arguments": float(stats.argument_size_in_bytes),
        "outputs": float(stats.output_size_in_bytes),
        "aliased": float(stats.alias_size_in_bytes),
        "temporaries": float(stats.temp_size_in_bytes),
        "total": float(total),
        "compile_s": time.perf_counter() - start,
    }
