"""The check against XLA: the analytic memory model agrees with the compiled train step's."""

import jax
import numpy as np
import pytest
from helpers import plan_config

from near_jax.plan import compiled
from near_jax.plan.compiled import compiled_memory
from near_jax.plan.estimate import layout, memory
from near_jax.plan.planner import resolve

PAIRS = {
    "full, fsdp x tensor, 1 kv head": plan_config(
        dict(d_model=256, n_heads=4, n_kv_heads=1, mlp_dim=640, vocab_size=6144, n_layers=6),
        dict(fsdp=4, tensor=2),
        batch=8,
        seq=384,
    ),
    "dots_saveable, tensor x fsdp, big vocab": plan_config(
        dict(d_model=96, n_heads=4, n_kv_heads=4, mlp_dim=384, vocab_size=16384, n_layers=2),
        dict(tensor=4, fsdp=2),
        remat="dots_saveable",
        batch=32,
        seq=64,
    ),
    "full, data, 4 micro-batches": plan_config(
        dict(n_heads=8, mlp_dim=1536, vocab_size=2048, n_layers=5), batch=32, seq=192, micro=4
    ),
    "fused loss, dots_saveable, tensor x fsdp, big vocab": plan_config(
        dict(d_model=96, n_heads=4, mlp_dim=384, vocab_size=16384, n_layers=2, loss_chunk=16),
        dict(tensor=4, fsdp=2),
        remat="dots_saveable",
        batch=32,
        seq=64,
    ),
    "fused loss, full, data, 32k vocab": plan_config(
        dict(d_model=128, mlp_dim=384, vocab_size=32768, n_layers=2, loss_chunk=64),
        batch=8,
        seq=512,
    ),
    "none, data x fsdp": plan_config(
        dict(d_model=192, n_heads=6, mlp_dim=768, vocab_size=3072, n_layers=3),
        dict(data=2, fsdp=4),
        remat="none",
        batch=24,
        seq=128,
    ),
}


@pytest.mark.parametrize("name", list(PAIRS))
def test_planner_memory_agrees_with_xla_within_15_percent(name):
    cfg = PAIRS[name]
    devices = cfg.mesh.data * cfg.mesh.fsdp * cfg.mesh.tensor
    xla = compiled_memory(cfg, jax.devices()[:devices])  # AOT: nothing is allocated
    planned = memory(resolve(cfg), layout(resolve(cfg), devices), "xla")
    ratio = planned["total"] / xla["total"]
    print(f"{name}: plan {planned['total'] / 2**20:.1f} MiB, XLA {xla['total'] / 2**20:.1f} MiB")
    assert 0.85 <= ratio <= 1.15, (ratio, planned, xla)
    # The donated train state is exact: params + AdamW mu and nu are XLA's arguments.
    state = planned["params"] + planned["optimizer"] + planned["batch"]
    assert abs(state / xla["arguments"] - 1) < 0.01


def test_fast_cpu_options_are_the_ones_this_xla_knows():
    options = compiled.fast_cpu_compile_options()
    assert options["xla_backend_optimization_level"] == 0  # every XLA has it
    assert options.items() <= compiled.FAST_CPU_OPTIONS.items()
    x = jax.device_put(np.ones(3, np.float32), jax.devices("cpu")[0])
    fn = jax.jit(lambda a: a * 2).lower(x).compile(compiler_options=options)
    np.testing.assert_array_equal(fn(x), [2, 2, 2])
    flags = compiled.fast_cpu_xla_flags().split()
    assert "--xla_backend_optimization_level=0" in flags and len(flags) == len(options)
