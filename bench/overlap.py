"""Island compute utilization with and without --overlap, over a simulated slow link.

    python3 bench/overlap.py                          # sync vs overlap=H, 100Mbit,50ms
    python3 bench/overlap.py --modes=sync,overlap,dense,nolink --rounds=6 --inner=12

For each mode: a fresh file:// store, one aggregator and M islands (quorum M) started as
subprocesses of the real programs (`python -m near_jax.diloco.aggregator` / `.island`), all
behind `--link` (`near_jax.diloco.slowlink`), for R rounds. Each island logs per round
(metrics.jsonl, split "island"): train_s, idle_s, wall_s, utilization = train_s / wall_s,
wait_s, bytes_pushed, bytes_pulled. Round 0 (compile, join, the full pull) is skipped; a
row is the median over islands and rounds 1..R-1 (utilization_pooled: their summed train_s
over their summed wall_s; utilization_min: the worst of them).

Modes:
  sync      the islands wait for each round (no --overlap); SparseLoCo, int2 top-1% payloads
  overlap   --overlap=H/F: the next round's steps train while the round is exchanged
  dense     contrast: overlap with fp32 dense payloads (nesterov outer optimizer)
  nolink    contrast: sync without --link (the store at local-disk speed)

`steps_per_s` = H / wall_s (inner steps an island completes per second of wall time), next
to `compute_steps_per_s` = the steps it trained / train_s: utilization near 1 with a low
steps_per_s means the training itself ran slower (e.g. competing for CPU with the exchange
thread), which utilization alone cannot show.

All processes share this machine's CPUs (JAX_PLATFORMS=cpu, one host device each): on a
small machine the islands and the aggregator compete for cores, so train_s is inflated by
that contention; the numbers orient, they do not stand for islands on separate hardware.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPARSE = ["--config.diloco.compression=int2:chunk=4096+topk=0.01"]
SPARSE += ["--config.diloco.outer_optimizer=sparseloco"]
DENSE = ["--config.diloco.compression=fp32", "--config.diloco.outer_optimizer=nesterov"]
FIELDS = ("utilization", "idle_s", "train_s", "wall_s", "wait_s", "bytes_pushed", "bytes_pulled")


def model_flags(a: argparse.Namespace) -> list[str]:
    """The config flags both programs run with (a ~1.1M-parameter model by default)."""
    c = "--config."
    return [
        "--config=configs/tiny.py",
        f"{c}model.d_model={a.d_model}",
        f"{c}model.n_layers={a.layers}",
        f"{c}model.n_heads=4",
        f"{c}model.n_kv_heads=2",
        f"{c}model.mlp_dim={4 * a.d_model}",
        f"{c}model.vocab_size={a.vocab}",
        f"{c}data.seq_len={a.seq}",
        f"{c}train.global_batch_size={a.batch}",
        f"{c}train.eval_batches=1",
        f"{c}optim.warmup_steps=0",
        f"{c}optim.lr=3e-3",
        f"{c}diloco.inner_steps={a.inner}",
    ]


def mode_flags(mode: str, a: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(config flags, island-only flags) of a mode."""
    link = [f"--link={a.link}"] if a.link else []
    if mode == "sync":
        return SPARSE + link, []
    if mode == "overlap":
        return SPARSE + link, [f"--overlap={a.inner}"]
    if mode == "dense":
        return DENSE + link, [f"--overlap={a.inner}"]
    if mode == "nolink":
        return SPARSE, []
    raise SystemExit(f"unknown mode {mode!r}: sync, overlap, dense, nolink")


def env() -> dict[str, str]:
    e = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    e["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    return e


def run_mode(mode: str, a: argparse.Namespace, base: str) -> tuple[list[dict], float]:
    """Runs one aggregator and a.islands islands to the end; (island records, seconds)."""
    d = os.path.join(base, mode)
    os.makedirs(os.path.join(d, "store"))
    cfg, island_only = mode_flags(mode, a)
    common = [f"--store=file://{d}/store", "--run=bench", f"--poll_seconds={a.poll}"]
    common += model_flags(a) + cfg
    py = [sys.executable, "-m", "near_jax.diloco"]
    agg = py[:-1] + [f"{py[-1]}.aggregator"] + common
    agg += [f"--rounds={a.rounds}", f"--quorum={a.islands}", "--round_timeout=600"]
    agg += ["--eval_batches=0", f"--workdir={d}/agg"]
    cmds = {"agg": agg}
    for i in range(a.islands):
        isl = py[:-1] + [f"{py[-1]}.island"] + common + island_only
        isl += [f"--island=i{i}", "--wait_for_run=600", f"--workdir={d}/i{i}"]
        cmds[f"i{i}"] = isl
    t0 = time.monotonic()
    procs = {}
    for name, cmd in cmds.items():
        log = open(os.path.join(d, f"{name}.log"), "w")
        procs[name] = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=log, stderr=log)
    failed = []
    deadline = t0 + a.timeout
    for name, p in procs.items():
        try:
            rc = p.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            p.kill()
            rc = "timeout"
        if rc != 0:
            failed.append(f"{name} ({rc})")
    for p in procs.values():  # nothing outlives a failed mode
        if p.poll() is None:
            p.kill()
            p.wait()
    seconds = time.monotonic() - t0
    if failed:
        raise SystemExit(f"{mode}: {', '.join(failed)} failed; see the logs in {d}")
    records = []
    for i in range(a.islands):
        with open(os.path.join(d, f"i{i}", "metrics.jsonl")) as f:
            for line in f:
                rec = json.loads(line)
                if rec.get("split") == "island":
                    records.append({"island": f"i{i}", **rec})
    return records, seconds


def summarize(mode: str, records: list[dict], seconds: float, a: argparse.Namespace) -> dict:
    """The median over islands and rounds >= 1 of each field, plus step rates."""
    kept = [r for r in records if r["round"] >= 1]
    row: dict = {"mode": mode, "rounds": len({r["round"] for r in kept}), "samples": len(kept)}
    for name in FIELDS:
        row[name] = statistics.median(r[name] for r in kept) if kept else None
    row["utilization_min"] = min(r["utilization"] for r in kept) if kept else None
    walls = sum(r["wall_s"] for r in kept)  # pooled: all kept rounds' train over their wall
    row["utilization_pooled"] = sum(r["train_s"] for r in kept) / walls if walls else None
    # Steps trained per round: H (H−τ then τ with overlap); per second of wall and of train.
    row["steps_per_s"] = statistics.median(a.inner / r["wall_s"] for r in kept) if kept else None
    row["compute_steps_per_s"] = (
        statistics.median(a.inner / r["train_s"] for r in kept) if kept else None
    )
    row["overlap"] = mode_flags(mode, a)[1][0].split("=")[1] if mode_flags(mode, a)[1] else "-"
    row["link"] = a.link if mode != "nolink" and a.link else "off"
    row["payload"] = "fp32" if mode == "dense" else "int2 top1%"
    row["mode_s"] = round(seconds, 1)
    return row


def table(rows: list[dict]) -> str:
    cols = ["mode", "link", "payload", "overlap", "utilization", "utilization_pooled"]
    cols += ["utilization_min"]
    cols += ["idle_s", "train_s", "wall_s", "wait_s", "bytes_pushed", "bytes_pulled"]
    cols += ["steps_per_s", "compute_steps_per_s", "samples", "mode_s"]

    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 1e4 else f"{v:.0f}"
        return str(v)

    lines = [" ".join(f"{c:>12}" for c in ["field"] + [r["mode"] for r in rows])]
    for c in cols[1:]:
        lines.append(" ".join(f"{x:>12}" for x in [c] + [cell(r[c]) for r in rows]))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", default="sync,overlap", help="of sync, overlap, dense, nolink")
    p.add_argument("--islands", type=int, default=2, help="M islands; quorum M")
    p.add_argument("--rounds", type=int, default=6, help="R rounds; round 0 is not counted")
    p.add_argument("--inner", type=int, default=12, help="H inner steps per round")
    p.add_argument("--link", default="100Mbit,50ms", help="--link of every program ('': off)")
    p.add_argument("--poll", type=float, default=0.1, help="--poll_seconds of every program")
    p.add_argument("--d_model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=384)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=4, help="global batch size per island")
    p.add_argument("--timeout", type=float, default=1200, help="seconds per mode")
    p.add_argument("--keep", default="", help="keep stores and logs in this dir (default: tmp)")
    a = p.parse_args()
    base = a.keep or tempfile.mkdtemp(prefix="near_jax_overlap_")
    os.makedirs(base, exist_ok=True)
    cpus = os.cpu_count()
    print(
        f"bench overlap: M={a.islands} islands + 1 aggregator as processes on {cpus} CPU "
        f"core(s) (they compete for them), H={a.inner}, R={a.rounds}, link {a.link or 'off'}, "
        f"logs in {base}",
        flush=True,
    )
    rows = []
    for mode in a.modes.split(","):
        records, seconds = run_mode(mode, a, base)
        rows.append(summarize(mode, records, seconds, a))
        r = rows[-1]
        print(
            f"  {mode}: utilization {r['utilization']:.3f}, idle {r['idle_s']:.2f}s, "
            f"train {r['train_s']:.2f}s, wall {r['wall_s']:.2f}s ({seconds:.0f}s)",
            flush=True,
        )
    print(table(rows))
    meta = {"islands": a.islands, "H": a.inner, "rounds": a.rounds, "cpus": cpus}
    meta.update(d_model=a.d_model, layers=a.layers, vocab=a.vocab, seq=a.seq, batch=a.batch)
    print(json.dumps({"bench": "overlap", **meta, "rows": rows}))


if __name__ == "__main__":
    main()
