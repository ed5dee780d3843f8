"""Checkpoint cost: step time with and without async saves, save/restore wall time and bytes.

    python3 bench/checkpoint.py [--presets=tiny,m100] [--steps=30] [--every=5]

For each preset it runs `steps` train steps without checkpoints, then the same with an async
save every `every` steps, and reports the median step time of both, the extra wall time per
save, that overhead projected to one save per 100 steps (the target is < 5%), the time the
training loop is blocked by a save, the time until it is committed, the bytes written and the
restore time. Prints a table and one JSON line.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time

import jax
from absl import app, flags
from train_throughput import random_batch

from near_jax import cli, config, model, sharding
from near_jax.train import checkpoint
from near_jax.train.loop import trainer_for

_PRESETS = flags.DEFINE_list("presets", ["tiny", "m100"], "Presets to measure: tiny, m100.")
_STEPS = flags.DEFINE_integer("steps", 30, "Timed steps per measurement.")
_EVERY = flags.DEFINE_integer("every", 5, "Save every N steps in the checkpointed run.")


def preset(name: str):
    """tiny: configs/tiny.py's model; m100: a ~100M-parameter model with a small batch."""
    cfg = config.default_config()
    m = cfg.model
    m.vocab_size, m.dtype = 384, "float32"
    if name == "tiny":
        m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.mlp_dim = 256, 4, 4, 2, 512
        cfg.train.global_batch_size, cfg.data.seq_len = 16, 256
    elif name == "m100":
        m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.mlp_dim = 768, 12, 12, 4, 2560
        cfg.train.global_batch_size, cfg.data.seq_len = 2, 128
    else:
        raise app.UsageError(f"--presets: unknown preset {name!r}; allowed: tiny, m100")
    cfg.name = name
    return config.validate(cfg)


class _Position:
    """A stand-in data iterator position (the pipeline itself is not what is measured)."""

    def __init__(self):
        self.step = 0

    def get_state(self):
        return {"step": self.step}


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def measure(cfg, steps: int, every: int) -> dict:
    """Runs the two measurements for one config; returns the row of numbers."""
    mesh = sharding.make_mesh(cfg.mesh)
    trainer = trainer_for(cfg, mesh)
    batch = jax.device_put(random_batch(cfg, cfg.model.vocab_size), trainer.batch_sharding)
    state = trainer.init(jax.random.key(0))
    state, stats = trainer.step(state, batch)  # compile
    jax.block_until_ready(stats)

    def run(ckpt=None):
        times, blocked = [], []
        start = time.perf_counter()
        nonlocal state
        for i in range(1, steps + 1):
            t = time.perf_counter()
            state, stats = trainer.step(state, batch)
            jax.block_until_ready(stats)
            if ckpt is not None and i % every == 0:
                s = time.perf_counter()
                ckpt.save(int(state.step), state._asdict(), _Position(), cfg)
                blocked.append(time.perf_counter() - s)
            times.append(time.perf_counter() - t)
        if ckpt is not None:
            ckpt.wait()
        return time.perf_counter() - start, times, blocked

    base_total, base_times, _ = run()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = checkpoint.Checkpointer(tmp, keep=2)
        ck_total, ck_times, blocked = run(ckpt)
        last = max(ckpt.steps())
        t = time.perf_counter()
        ckpt.save(last + 1, state._asdict(), _Position(), cfg, wait=True)
        sync_save_s = time.perf_counter() - t
        nbytes = _dir_bytes(os.path.join(tmp, str(last + 1)))
        t = time.perf_counter()
        restored = ckpt.restore(trainer.abstract_state._asdict())
        jax.block_until_ready(restored.state)
        restore_s = time.perf_counter() - t
        ckpt.close()

    step_s = statistics.median(base_times)
    n_saves = steps // every
    per_save = max(ck_total - base_total, 0.0) / max(n_saves, 1)
    return {
        "preset": cfg.name,
        "params_m": model.param_counts(trainer.model_cfg)["total"] / 1e6,
        "step_s_median": step_s,
        "step_s_median_with_saves": statistics.median(ck_times),
        "slowdown_measured": ck_total / base_total - 1.0,
        "save_interval": every,
        "overhead_per_save_s": per_save,
        "slowdown_at_100_steps": per_save / (100 * step_s),
        "save_blocking_s_median": statistics.median(blocked) if blocked else None,
        "save_sync_s": sync_save_s,
        "restore_s": restore_s,
        "checkpoint_bytes": nbytes,
    }


def main(argv):
    del argv
    cli.quiet_library_logs()
    rows = [measure(preset(name), _STEPS.value, _EVERY.value) for name in _PRESETS.value]
    keys = list(rows[0])
    width = max(len(k) for k in keys)
    print(f"{'':<{width}}  " + "  ".join(f"{r['preset']:>12}" for r in rows))
    for key in keys[1:]:
        cells = []
        for r in rows:
            v = r[key]
            cells.append(f"{v:>12.4g}" if isinstance(v, float) else f"{v!s:>12}")
        print(f"{key:<{width}}  " + "  ".join(cells))
    print(json.dumps({"bench": "checkpoint", "device": jax.devices()[0].device_kind, "rows": rows}))


if __name__ == "__main__":
    app.run(main)
