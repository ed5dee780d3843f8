"""Helpers of bench/diloco.py: sizing presets, one training row, byte counts, the row file.

Kept apart so that diloco.py reads as the plan of the sweep. Nothing here is imported by
near_jax; the benchmark is the only user.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from near_jax import config as config_lib
from near_jax import data, sharding
from near_jax.diloco.codec import compress
from near_jax.train.loop import trainer_for

# Model and run sizes. `batch` is sequences per replica per step: data-parallel at M workers
# trains with global batch M * batch, DiLoCo with M replicas of `batch` each (same tokens).
PRESETS: dict[str, dict[str, Any]] = {
    # ~1.15M params; sized so the M=4 rows take minutes each on a shared 2-core CPU.
    "cpu": dict(
        d_model=128,
        n_layers=4,
        n_heads=4,
        n_kv_heads=4,
        mlp_dim=512,
        dtype="float32",
        seq_len=64,
        steps=3000,
        batch=1,
        eval_seqs=256,
    ),
    # ~132M params, for an accelerator (not run on the CPU development machine).
    "gpu": dict(
        d_model=768,
        n_layers=14,
        n_heads=12,
        n_kv_heads=4,
        mlp_dim=3072,
        dtype="bfloat16",
        seq_len=256,
        steps=10_000,
        batch=16,
        eval_seqs=1024,
    ),
}
VOCAB = 384  # the byte tokenizer's 256 bytes + specials, rounded up to 128
EVAL_BATCH = 32  # sequences per eval step, whatever M: every row sees the same val tokens


def base_config(preset: dict[str, Any], workers: int, inner_lr: float) -> ml_collections.ConfigDict:
    """The config of a data-parallel run over `workers` workers (DiLoCo rows add to it)."""
    cfg = config_lib.default_config()
    m = cfg.model
    for key in ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_dim", "dtype"):
        m[key] = preset[key]
    m.rope_theta, m.vocab_size = 10_000.0, VOCAB
    cfg.data.seq_len = preset["seq_len"]
    steps, batch = preset["steps"], workers * preset["batch"]
    cfg.train.steps, cfg.train.global_batch_size = steps, batch
    cfg.train.eval_batches = max(1, preset["eval_seqs"] // EVAL_BATCH)
    cfg.optim.lr, cfg.optim.warmup_steps = inner_lr, max(steps // 20, 1)
    return cfg


def diloco_config(
    base: ml_collections.ConfigDict, replicas: int, inner: int, compression: str, outer: str, lr
) -> ml_collections.ConfigDict:
    cfg = base.copy_and_resolve_references()
    dl = cfg.diloco
    dl.replicas, dl.inner_steps, dl.compression = replicas, inner, compression
    dl.outer_optimizer, dl.outer_lr = outer, lr
    return cfg


def token_stream(cfg: ml_collections.ConfigDict) -> list[dict[str, np.ndarray]]:
    """The run's batches, read once: every row at the same M trains on exactly these."""
    it = data.make_iterator(
        cfg.data, split="train", seed=cfg.seed, global_batch_size=cfg.train.global_batch_size
    )
    return [next(it) for _ in range(cfg.train.steps)]


def _trainer(cfg: ml_collections.ConfigDict, groups: int):
    """(trainer, layout). DiLoCo's M replicas are spread over `groups` devices (the mesh's
    replica axis, G = min(groups, M)), M / G vmapped on each; groups=1: all on one device."""
    devices = jax.devices()
    m = cfg.diloco.replicas
    if not m:
        return trainer_for(cfg, sharding.make_mesh(cfg.mesh, devices[:1])), "1 device"
    g = min(groups, m, len(devices))
    while m % g:
        g -= 1
    mesh = sharding.make_mesh(cfg.mesh, devices[:g], replicas=g)
    return trainer_for(cfg, mesh), f"{g} dev x {m // g} vmap"


def run_row(cfg: ml_collections.ConfigDict, batches, groups: int) -> dict[str, Any]:
    """Trains one row on `batches`; returns its eval loss, timings and Δ = θ_0 − θ_final."""
    config_lib.validate(cfg)
    trainer, layout = _trainer(cfg, groups)
    state = trainer.init(jax.random.key(cfg.seed))
    start_params = jax.device_get(state.params)
    start = time.perf_counter()
    first = None
    for batch in batches:
        state, _ = trainer.step(state, data.to_global_batch(batch, trainer.batch_sharding))
        if first is None:
            jax.block_until_ready(state.params)
            first = time.perf_counter() - start
    jax.block_until_ready(state.params)
    train_s = time.perf_counter() - start
    loss = eval_loss(trainer, state.params, cfg)
    final = jax.device_get(state.params)
    delta = jax.tree.map(lambda a, b: np.asarray(a, np.float32) - b, start_params, final)
    return dict(
        eval_loss=loss,
        layout=layout,
        first_step_s=round(first, 3),
        s_per_step=round((train_s - first) / max(len(batches) - 1, 1), 5),
        row_s=round(time.perf_counter() - start, 1),
        delta=delta,
    )


def eval_loss(trainer, params, cfg: ml_collections.ConfigDict) -> float:
    """Mean loss over the first `train.eval_batches` x EVAL_BATCH validation sequences."""
    it = data.make_iterator(cfg.data, split="val", seed=cfg.seed, global_batch_size=EVAL_BATCH)
    total = weight = 0.0
    for _ in range(cfg.train.eval_batches):
        batch = data.to_global_batch(next(it), trainer.batch_sharding)
        s, w = jax.device_get(trainer.eval_step(params, batch))
        total, weight = total + float(s), weight + float(w)
    return total / max(weight, 1.0)


# -- bytes ---------------------------------------------------------------------------------


def dp_bytes(n_params: int, workers: int, steps: int) -> float:
    """Per worker, sent + received: a ring all-reduce of fp32 gradients every step."""
    return steps * 2 * (workers - 1) / workers * 4 * n_params


def payload_nbytes(delta: Any, spec: str) -> int:
    """Exact wire size of `delta` compressed by `spec` (headers included). With top-k the
    index width depends on the data, so `delta` should be a real pseudo-gradient."""
    return compress.encode(delta, spec)[0].nbytes


def diloco_bytes(n_params: int, payload: int, steps: int, inner: int) -> float:
    """Per worker, sent + received: one full fp32 pull of the params when joining, then per
    round its payload pushed and the aggregated update, compressed the same way, pulled."""
    return 4 * n_params + (steps // inner) * 2 * payload


def spec_supported(spec: str) -> str | None:
    """None if this checkout's codec parses `spec`, else why not."""
    try:
        compress.CompressionSpec.parse(spec)
    except ValueError as e:
        return str(e).split(";")[0]
    return None


# -- the row file --------------------------------------------------------------------------


def row_key(row: dict[str, Any]) -> tuple:
    return (row["setup"], row["method"], row["M"], row["H"], row["compression"], row["lr"])


class RowFile:
    """One JSON object per finished row, appended and fsynced: a crash keeps finished rows."""

    def __init__(self, path: str, resume: bool):
        self.path = path
        if not resume and os.path.exists(path) and os.path.getsize(path):
            os.replace(path, path + ".prev")
            print(f"moved the previous {path} to {path}.prev (pass --resume to continue it)")
        self.rows: list[dict[str, Any]] = []
        if resume and os.path.exists(path):
            with open(path) as f:
                self.rows = [json.loads(line) for line in f if line.strip()]

    def get(self, key: tuple) -> dict[str, Any] | None:
        return next((r for r in self.rows if row_key(r) == key), None)

    def append(self, row: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.rows.append(row)


def best(rows: list[dict[str, Any]], **match) -> dict[str, Any] | None:
    """The row of lowest eval loss among those matching every given field (NaN never wins)."""
    found = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    found = [r for r in found if r["eval_loss"] is not None and math.isfinite(r["eval_loss"])]
    return min(found, key=lambda r: r["eval_loss"], default=None)


def with_gaps(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with `loss_gap_vs_dp` (vs the tuned data-parallel row at the same M) and `tuned`
    (the best of its learning-rate grid) filled in."""
    out = []
    for r in rows:
        r = dict(r)
        dp = best(rows, setup=r["setup"], method="data-parallel", M=r["M"])
        ok = dp is not None and r["eval_loss"] is not None
        r["loss_gap_vs_dp"] = round(r["eval_loss"] / dp["eval_loss"] - 1, 5) if ok else None
        grid = best(
            rows,
            setup=r["setup"],
            method=r["method"],
            M=r["M"],
            H=r["H"],
            compression=r["compression"],
        )
        r["tuned"] = grid is not None and row_key(grid) == row_key(r)
        out.append(r)
    return out


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'method':13} {'M':>2} {'H':>4} {'compression':26} {'lr':>7} {'inner lr':>8} "
        f"{'eval loss':>9} {'vs DP':>7} {'fp32/payload':>12} {'DP/bytes':>9} "
        f"{'MB/worker':>10} {'s/step':>7} {'row s':>6}"
    )
    lines = [head]
    for r in rows:
        gap = "" if r["loss_gap_vs_dp"] is None else f"{100 * r['loss_gap_vs_dp']:+.2f}%"
        loss = "nan" if r["eval_loss"] is None else f"{r['eval_loss']:.4f}"
        mark = "*" if r["tuned"] else " "
        lines.append(
            f"{r['method']:13} {r['M']:>2} {r['H']:>4} {r['compression']:26} "
            f"{r['lr']:>7g} {r['inner_lr']:>8g} {loss:>8}{mark} {gap:>7} "
            f"{r['payload_ratio_vs_fp32']:>12.1f} {r['bytes_ratio_vs_dp']:>9.1f} "
            f"{r['bytes_per_worker'] / 1e6:>10.2f} {r['s_per_step']:>7.3f} {r['row_s']:>6.0f}"
        )
    return "\n".join(lines)
