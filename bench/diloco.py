"""DiLoCo vs data-parallel on CPU: final eval loss against bytes communicated.

    python3 bench/diloco.py                       # the full sweep (~15-30 min on 2 cores)
    python3 bench/diloco.py --steps=60 --replicas=2 --inner=10 --compression=int8  # smoke

Every row trains the same small model on the same token stream for the same number of
inner steps (so the same total tokens): the data-parallel baseline with global batch B, and
in-mesh DiLoCo (`near_jax.train.inmesh`) with M replicas of batch B/M each (one simulated
CPU device per replica), syncing every H steps with the pseudo-gradient compressed as
islands would send it. `--drop` adds rows where each contribution is lost with that
probability (`diloco.drop_prob`).

Bytes, per worker, sent plus received, over the whole run (P = parameter count):
  data-parallel  a ring all-reduce of fp32 gradients every step: 2(M-1)/M * 4P per step.
  DiLoCo         one full fp32 pull of the params at the start (joining), then per round
                 the island's compressed pseudo-gradient pushed and the aggregated outer
                 gradient, compressed the same way, pulled (islands apply it themselves
                 with the same outer optimizer). Payload sizes are exact
                 (`compress.encode(...).nbytes`, headers included). Dropped contributions
                 were still sent, so they count.

Prints a table, one JSON line, and writes diloco.png (eval loss vs bytes).
"""

from __future__ import annotations

import os

import ml_collections

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from near_jax import config as config_lib
from near_jax import data, model, sharding
from near_jax.diloco.codec import compress
from near_jax.train.loop import trainer_for
from near_jax.train.step import evaluate

FORMAT_NAMES = {"4bit": "int4"}  # the "4-bit" is int4 here (fp4 also accepted)


def base_config(steps: int, batch: int) -> ml_collections.ConfigDict:
    cfg = config_lib.default_config()
    m = cfg.model
    m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.mlp_dim = 64, 2, 4, 2, 192
    m.dtype, m.rope_theta, m.vocab_size = "float32", 10_000.0, 384
    cfg.data.seq_len = 64
    cfg.train.steps, cfg.train.global_batch_size = steps, batch
    cfg.train.eval_batches = 8
    cfg.optim.lr, cfg.optim.warmup_steps = 3e-3, max(steps // 20, 1)
    return cfg


def token_stream(cfg) -> list[dict[str, np.ndarray]]:
    """The run's batches, read once: every row trains on exactly these."""
    it = data.make_iterator(
        cfg.data, split="train", seed=cfg.seed, global_batch_size=cfg.train.global_batch_size
    )
    return [next(it) for _ in range(cfg.train.steps)]


def run_row(cfg, replicas: int, batches) -> tuple[float, float]:
    """Trains one row; returns (final eval loss, seconds)."""
    config_lib.validate(cfg)
    n_dev = max(replicas, 1)
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:n_dev], replicas=n_dev)
    trainer = trainer_for(cfg, mesh)
    state = trainer.init(jax.random.key(cfg.seed))
    start = time.perf_counter()
    for batch in batches:
        state, _ = trainer.step(state, data.to_global_batch(batch, trainer.batch_sharding))
    loss = evaluate(trainer, state.params, cfg.seed)["loss"]
    return loss, time.perf_counter() - start


def dp_bytes(n_params: int, workers: int, steps: int) -> float:
    return steps * 2 * (workers - 1) / workers * 4 * n_params


def diloco_bytes(params_np, spec: str, steps: int, inner: int) -> float:
    payload = compress.encode(params_np, spec)[0].nbytes
    full_pull = sum(x.size * 4 for x in jax.tree.leaves(params_np))
    return full_pull + (steps // inner) * 2 * payload


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400, help="inner steps per row")
    ap.add_argument("--batch", type=int, default=32, help="global batch (sequences)")
    ap.add_argument("--replicas", default="2,4,8")
    ap.add_argument("--inner", default="10,50,100")
    ap.add_argument("--compression", default="fp32,int8,4bit")
    ap.add_argument("--drop", type=float, default=0.5, help="drop rows (0 = none)")
    ap.add_argument("--out", default="diloco.png")
    args = ap.parse_args()
    ms = [int(x) for x in args.replicas.split(",")]
    hs = [int(x) for x in args.inner.split(",")]
    comps = [FORMAT_NAMES.get(c, c) for c in args.compression.split(",")]

    base = base_config(args.steps, args.batch)
    shapes = jax.eval_shape(lambda: model.init(base.model, jax.random.key(0)))
    params_np = jax.tree.map(
        lambda s: np.random.default_rng(0).standard_normal(s.shape).astype(np.float32), shapes
    )
    n_params = sum(x.size for x in jax.tree.leaves(params_np))

    batches = token_stream(base)
    rows = []
    dp_loss, dp_secs = run_row(base, replicas=0, batches=batches)
    rows.append(
        dict(
            method="data-parallel",
            M=0,
            H=1,
            compression="fp32",
            drop=0.0,
            loss=dp_loss,
            seconds=dp_secs,
        )
    )
    plan = [(m, h, c, 0.0) for m in ms for h in hs for c in comps]
    if args.drop:
        plan += [(m, 50 if 50 in hs else hs[0], comps[-1], args.drop) for m in ms]
    for m, h, c, drop in plan:
        cfg = base.copy_and_resolve_references()
        cfg.diloco.replicas, cfg.diloco.inner_steps = m, h
        cfg.diloco.compression, cfg.diloco.drop_prob = c, drop
        loss, secs = run_row(cfg, replicas=m, batches=batches)
        rows.append(
            dict(method="diloco", M=m, H=h, compression=c, drop=drop, loss=loss, seconds=secs)
        )
        print(f"  M={m} H={h} {c} drop={drop}: loss {loss:.4f} ({secs:.0f} s)", flush=True)

    for r in rows:
        workers = r["M"] or 4  # the baseline's bytes are quoted per M below
        r["bytes"] = (
            diloco_bytes(params_np, r["compression"], args.steps, r["H"])
            if r["M"]
            else dp_bytes(n_params, workers, args.steps)
        )
        r["dp_bytes_same_M"] = dp_bytes(n_params, r["M"] or 4, args.steps)
        r["bytes_ratio"] = r["dp_bytes_same_M"] / r["bytes"]
        r["loss_ratio"] = r["loss"] / dp_loss

    header = (
        f"{'method':14} {'M':>2} {'H':>4} {'compr':>6} {'drop':>4} {'eval loss':>9} "
        f"{'x DP':>6} {'MB/worker':>10} {'DP/this':>8}"
    )
    print(f"\n{n_params / 1e6:.2f}M params, {args.steps} inner steps, batch {args.batch}")
    print(header)
    for r in rows:
        print(
            f"{r['method']:14} {r['M']:>2} {r['H']:>4} {r['compression']:>6} "
            f"{r['drop']:>4.1f} {r['loss']:>9.4f} {r['loss_ratio']:>6.3f} "
            f"{r['bytes'] / 1e6:>10.2f} {r['bytes_ratio']:>8.1f}"
        )
    print(json.dumps({"bench": "diloco", "params": n_params, "steps": args.steps, "rows": rows}))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        marker = "*" if not r["M"] else ("x" if r["drop"] else "o")
        ax.scatter(r["bytes"], r["loss"], marker=marker, s=60 if not r["M"] else 25)
        ax.annotate(
            "DP"
            if not r["M"]
            else f"M{r['M']} H{r['H']} {r['compression']}" + (" drop" if r["drop"] else ""),
            (r["bytes"], r["loss"]),
            fontsize=6,
        )
    ax.set_xscale("log")
    ax.set_xlabel("bytes per worker (sent + received)")
    ax.set_ylabel("final eval loss (nats/token)")
    ax.set_title("DiLoCo vs data-parallel (same tokens, same inner steps)")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
