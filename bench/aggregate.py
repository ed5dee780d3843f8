"""Aggregator memory and time for one round of N contributions, sharded vs one object.

    python3 bench/aggregate.py                                    # 100M params, 32 x int4
    python3 bench/aggregate.py --params=20M --contributions=8 --shard_bytes=4M
    python3 bench/aggregate.py --params=1.5B --contributions=16 --format=int8+topk=0.1 --keep

What is measured: a file store gets three runs of the same synthetic transformer-shaped model
(`--params` float32 elements: an embedding and stacked layers whose large leaves the shard
plan cuts): "sharded" cut at `--shard_bytes`, the baseline "one-shard" whose plan is one
shard holding the whole model (one object per contribution, what the store held before
sharding), and "K=2", the sharded plan again, closed by two aggregator workers
(`--shards=0/2` and `--shards=1/2`). N islands' random deltas (normal x 1e-3, one seed per
island) are encoded with `--format` and pushed to every run as signed contributions, one
delta at a time, by a generator subprocess. Then, for each run, a fresh subprocess
(`--_role=aggregate`) loads the run and closes round 0 with `Aggregator.run_round()` (check
the N contributions, stream their shards into the mean, outer step, write version 1, commit
the decision). For K=2 that subprocess is the coordinator (`Aggregator(workers=2)`: derives
the even shards, proposes the set, waits for the worker, writes the manifest, commits) and a
second subprocess (`--_role=worker`, `ShardWorker(..., 1, 2)`) runs alongside it, deriving
the odd shards; it exits once version 1 is published. The K=2 decision's hashes (params,
momentum, server error feedback, update) must equal the K=1 sharded run's: same inputs, same
plan, the same bytes whatever K is.

Per row: peak RSS of that aggregator process (`os.wait4` -> ru_maxrss, from the OS; the
child's own VmHWM is printed alongside as a cross-check: the parent stays small so that
the high-water mark a spawned child inherits at exec is not what is measured), wall time
of `run_round` (round s), its outer step alone (derive, write, commit: outer s) and the
bytes it read from the store (run_round only; load() reads the version's manifest and only
checks that its shards exist). For the K=2 worker: its peak RSS, the seconds it spent
deriving (busy s) and the bytes it read. A "floor" process that only loads the run gives
the RSS that is not the round's. For reference, N x the model's fp32 bytes is what the
aggregator held before shards (every decoded Δ at once). One round per row, no repeats:
round 0 of a run can only be closed once. Prints a table and one JSON line.

Target (the issue): 32 int4 contributions of a 100M-parameter model closed with peak RSS
<= 1.5 GB (before shards: more than 13 GB); with K=2 workers, <= 1 GB per worker.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

# Runnable as `python3 bench/aggregate.py` from anywhere (the children run this file too).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from near_jax.diloco.codec.spec import CompressionSpec  # noqa: E402 - light: no jax import

RUNS = {"sharded": "bench-sharded", "one-shard": "bench-one-shard", "K=2": "bench-k2"}
K_WORKERS = 2  # the "K=2" run's aggregator workers (coordinator 0/K and workers 1..K-1)
DECISION_HASHES = ("params_sha256", "momentum_sha256", "server_ef_sha256", "update_sha256")
LR, MOMENTUM = 0.7, 0.9
DEFAULT_SHARD_BYTES = 64 << 20  # = protocol.DEFAULT_SHARD_BYTES (checked in the children)
_COUNT = re.compile(r"(\d+(?:\.\d*)?(?:[eE]\d+)?)([KMGB]?)")


# ------------------------------------------------------------------------------- flags


def _number(text: str, units: dict[str, int], what: str) -> int:
    match = _COUNT.fullmatch(text.strip().upper())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number like {what}")
    value = float(match.group(1)) * units[match.group(2)]
    if not math.isfinite(value) or value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return int(value)


def param_count(text: str) -> int:
    """100M, 1.5B, 20M, 2K or 1e6 (decimal units)."""
    return _number(text, {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9}, "100M or 1e6")


def byte_count(text: str) -> int:
    """64M, 1G, 4096 (binary units: 64M = 64 MiB, like protocol.DEFAULT_SHARD_BYTES)."""
    return _number(text, {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "B": 1}, "64M or 4096")


def spec_text(text: str) -> str:
    try:
        return str(CompressionSpec.parse(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=param_count, default=param_count("100M"))
    ap.add_argument("--contributions", type=positive, default=32, help="N islands")
    ap.add_argument("--format", type=spec_text, default="int4", help="compression spec")
    ap.add_argument(
        "--shard_bytes",
        type=byte_count,
        default=DEFAULT_SHARD_BYTES,
        help="the sharded run's shard size (64M = 64 MiB)",
    )
    ap.add_argument("--dir", default="", help="store directory (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the store directory")
    ap.add_argument(
        "--_role",
        default="main",
        choices=("main", "generate", "aggregate", "worker"),
        help=argparse.SUPPRESS,
    )
    ap.add_argument("--_run", default="", help=argparse.SUPPRESS)
    ap.add_argument("--_workers", type=positive, default=1, help=argparse.SUPPRESS)  # K, coord.
    ap.add_argument("--_shards", default="", help=argparse.SUPPRESS)  # "i/K", a worker
    ap.add_argument("--_load_only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.shard_bytes < 64:  # protocol.shards.MIN_SHARD_BYTES
        ap.error(f"--shard_bytes={args.shard_bytes} is too small: must be >= 64")
    if args._role != "main" and not args.dir:
        ap.error(f"--_role={args._role} needs --dir")
    return args


# ------------------------------------------------------------------------ the synthetic model


def model_shapes(params: int) -> dict[str, dict[str, tuple[int, ...]] | tuple[int, ...]]:
    """A transformer-like tree of about `params` float32 elements: embedding [16D, D] and
    12 stacked layers (qkv, out, mlp in/out: 12 D² per layer; norms [L, D]), so that at the
    default shard size the large stacked leaves are cut and the small ones grouped."""
    layers = 12
    d = max(4, round(math.sqrt(params / (16 + 12 * layers))))
    return {
        "embed": (16 * d, d),
        "layers": {
            "attn_qkv": (layers, d, 3 * d),
            "attn_out": (layers, d, d),
            "mlp_in": (layers, d, 4 * d),
            "mlp_out": (layers, 4 * d, d),
            "norm_attn": (layers, d),
            "norm_mlp": (layers, d),
        },
        "final_norm": (d,),
    }


def like_tree(params: int):
    """The model's shapes as jax.ShapeDtypeStructs (no memory)."""
    import jax
    import numpy as np

    return jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s, np.float32),
        model_shapes(params),
        is_leaf=lambda x: isinstance(x, tuple),
    )


def random_tree(like, seed: int, scale: float):
    """A float32 tree shaped like `like`: normal x scale (one generator per tree)."""
    import jax
    import numpy as np

    rng = np.random.default_rng(seed)

    def leaf(s):
        x = rng.standard_normal(s.shape, dtype=np.float32)
        x *= np.float32(scale)  # in place: never two copies of a leaf
        return x

    return jax.tree.map(leaf, like)


def plans(args: argparse.Namespace, like) -> dict:
    """{run's row name: shard plan}; the baseline's one shard holds the whole model, the
    K=2 run has the sharded run's plan."""
    from near_jax.diloco import protocol

    assert protocol.DEFAULT_SHARD_BYTES == DEFAULT_SHARD_BYTES, "update DEFAULT_SHARD_BYTES"
    whole = max(4 * protocol.num_elements(like), 64)
    sharded = protocol.plan_shards(like, args.shard_bytes)
    return {"sharded": sharded, "one-shard": protocol.plan_shards(like, whole), "K=2": sharded}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------- role: generate (child)


def generate(args: argparse.Namespace) -> dict:
    """Creates the runs at version 0 and pushes N signed contributions to each, one delta
    in memory at a time; returns what the parent reports (as JSON on stdout)."""
    from near_jax.contrib import identity
    from near_jax.contrib.contributor import Signer
    from near_jax.diloco import protocol
    from near_jax.diloco.aggregator import Aggregator
    from near_jax.diloco.store import ObjectStore

    store = ObjectStore.open(args.dir)
    like = like_tree(args.params)
    cut = plans(args, like)
    params0 = random_tree(like, seed=1_000_000, scale=0.02)
    bases = {}
    for name, plan in cut.items():
        agg = Aggregator(
            store,
            RUNS[name],
            like,
            spec=args.format,
            lr=LR,
            momentum=MOMENTUM,
            quorum=args.contributions,
            round_timeout=3600.0,
            shard_bytes=plan.shard_bytes,
        )
        agg.create(params0, {"inner_steps": 1})
        bases[name] = protocol.load_version(store, RUNS[name], 0, plan)  # manifest only
    del params0
    pushed = dict.fromkeys(cut, 0)
    t0 = time.perf_counter()
    for i in range(args.contributions):
        island = f"island-{i:04d}"
        signer = Signer(identity.generate(), island, "c" * 64, "d" * 64)
        delta = random_tree(like, seed=i, scale=1e-3)
        for name, plan in cut.items():
            run = RUNS[name]
            entries, nbytes, _ = protocol.push_shards(
                store, run, 0, island, plan, plan.split(delta), args.format
            )  # encoded once per run: the K=2 run's bytes are the sharded run's again
            body = protocol.contribution_body(
                run, island, bases[name], plan, args.format, entries, sign=signer
            )
            written, manifest_bytes = protocol.put_contribution(
                store, run, island, bases[name], body
            )
            assert written, f"{island} already pushed to {run}: use an empty --dir"
            pushed[name] += nbytes + manifest_bytes
        del delta
        elapsed = time.perf_counter() - t0
        log(
            f"  pushed {i + 1}/{args.contributions} contributions to {len(cut)} runs "
            f"({elapsed:.0f} s, {elapsed / (i + 1):.1f} s each)"
        )
    return {
        "params": protocol.num_elements(like),
        "shards": {name: plan.num_shards for name, plan in cut.items()},
        "max_shard_bytes": {name: 4 * plan.max_shard_elements() for name, plan in cut.items()},
        "contribution_bytes": {name: b / args.contributions for name, b in pushed.items()},
        "generate_s": time.perf_counter() - t0,
    }


# ---------------------------------------------------------------- role: aggregate (child)


def vm_hwm_bytes() -> int:
    """This process's own peak RSS since exec (/proc/self/status VmHWM); 0 off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def aggregate(args: argparse.Namespace) -> dict:
    """Loads run `--_run` and closes its round 0 (as the coordinator of `--_workers` K
    aggregator workers when K > 1); returns the round's stats."""
    from near_jax.diloco.aggregator import Aggregator
    from near_jax.diloco.aggregator.workers import my_shards
    from near_jax.diloco.store import ObjectStore

    store = ObjectStore.open(args.dir)
    agg = Aggregator(
        store,
        args._run,
        like_tree(args.params),
        spec=args.format,
        lr=LR,
        momentum=MOMENTUM,
        quorum=args.contributions,
        round_timeout=3600.0,
        shard_bytes=args.shard_bytes,  # run.json's plan wins (Aggregator._adopt_plan)
        workers=args._workers,
        poll_seconds=0.05,  # how often the coordinator looks for the workers' results
        log=log,
    )
    t0 = time.perf_counter()
    agg.load()
    load_s = time.perf_counter() - t0
    if args._load_only:  # the floor: imports, and load() (version 0's manifest)
        return {
            "run": args._run,
            "role": "load only",
            "shards": agg.plan.num_shards,
            "load_s": load_s,
            "vm_hwm_bytes": vm_hwm_bytes(),
        }
    t0 = time.perf_counter()
    stats = agg.run_round()
    round_s = time.perf_counter() - t0
    decision = stats.pop("decision")
    if stats["accepted"] != args.contributions:
        rejected = [(r.get("island"), r.get("reason")) for r in decision["rejected"][:3]]
        raise SystemExit(f"round accepted {stats['accepted']}, rejected e.g. {rejected}")
    return {
        **{k: v for k, v in stats.items() if k != "round_s"},  # its round_s counts idle time
        "run": args._run,
        "role": "aggregator" if args._workers == 1 else f"coordinator 0/{args._workers}",
        "shards": len(my_shards(agg.plan, 0, args._workers)),  # its own: s mod K == 0
        "load_s": load_s,
        "round_s": round_s,
        "vm_hwm_bytes": vm_hwm_bytes(),
        "hashes": {
            "update_sha256": decision["update_sha256"],
            **{k: decision["result"][k] for k in DECISION_HASHES if k != "update_sha256"},
        },
    }


def work(args: argparse.Namespace) -> dict:
    """Worker `--_shards` i/K of run `--_run`: derives its shards of round 0's proposal
    (`ShardWorker.poll_once`) until the coordinator has published version 1."""
    from near_jax.diloco import protocol
    from near_jax.diloco.aggregator import ShardWorker, parse_shards
    from near_jax.diloco.aggregator.workers import my_shards
    from near_jax.diloco.store import ObjectStore

    index, count = parse_shards(args._shards)
    store = ObjectStore.open(args.dir)
    worker = ShardWorker(
        store, args._run, like_tree(args.params), index, count, poll_seconds=0.05, log=log
    )
    busy_s, t0 = 0.0, time.perf_counter()
    while True:
        done, t = worker.done, time.perf_counter()
        if not worker.poll_once():
            break
        if worker.done > done:  # this poll derived a proposal: the worker's own work
            busy_s += time.perf_counter() - t
        latest = protocol.read_latest(store, args._run)
        if latest is not None and latest["version"] >= 1:
            break
        if time.perf_counter() - t0 > 6 * 3600:
            raise SystemExit(f"worker {index}/{count}: no version 1 after 6 hours")
        time.sleep(worker.poll_seconds)
    return {
        "run": args._run,
        "role": f"worker {index}/{count}",
        "shards": len(my_shards(worker.plan, index, count)),
        "derived": worker.done,
        "busy_s": busy_s,
        "bytes_read": store.bytes_read,
        "vm_hwm_bytes": vm_hwm_bytes(),
    }


# ------------------------------------------------------------------------- role: main


@dataclasses.dataclass
class Role:
    """One aggregator process to measure (a table row), with the worker processes that run
    alongside it (a row each)."""

    name: str
    argv: list[str]  # flags for `--_role=aggregate` beyond the common ones
    workers: list[list[str]] = dataclasses.field(default_factory=list)  # `--_role=worker`'s


def roles_to_run() -> list[Role]:
    """The rows, in order: K=1 sharded, one-shard, the K=2 coordinator and its worker(s),
    the floor."""
    run2 = RUNS["K=2"]
    return [
        Role("sharded", [f"--_run={RUNS['sharded']}"]),
        Role("one-shard", [f"--_run={RUNS['one-shard']}"]),
        Role(
            "K=2",
            [f"--_run={run2}", f"--_workers={K_WORKERS}"],
            [[f"--_run={run2}", f"--_shards={i}/{K_WORKERS}"] for i in range(1, K_WORKERS)],
        ),
        Role("floor", [f"--_run={RUNS['sharded']}", "--_load_only"]),
    ]


def spawn(args: argparse.Namespace, role: str, extra: list[str]) -> subprocess.Popen:
    """Starts this script as `--_role=role` (stdout: its JSON result; stderr: progress)."""
    argv = [
        sys.executable,
        os.path.abspath(__file__),
        f"--_role={role}",
        f"--dir={args.dir}",
        f"--params={args.params}",
        f"--contributions={args.contributions}",
        f"--format={args.format}",
        f"--shard_bytes={args.shard_bytes}",
        *extra,
    ]
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    return subprocess.Popen(argv, stdout=subprocess.PIPE, env=env)


def reap(proc: subprocess.Popen, role: str) -> tuple[dict, int]:
    """Waits for a spawned child: (its JSON result, its peak RSS in bytes: ru_maxrss from
    wait4, the child's own, in KiB on Linux)."""
    out = proc.stdout.read()
    proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    if proc.returncode != 0:
        raise SystemExit(f"error: the {role} process exited with {proc.returncode}")
    return json.loads(out.decode().strip().splitlines()[-1]), usage.ru_maxrss * 1024


def child(args: argparse.Namespace, role: str, extra: list[str]) -> tuple[dict, int]:
    return reap(spawn(args, role, extra), role)


def measure(args: argparse.Namespace, roles: list[Role]) -> list[dict]:
    """Runs each role's aggregator in its own process (its workers alongside, each in its
    own process); a row per process."""
    rows = []
    for role in roles:
        log(f"closing the round: {role.name} ...")
        workers = [spawn(args, "worker", argv) for argv in role.workers]
        try:
            result, peak = child(args, "aggregate", role.argv)
        except BaseException:
            for proc in workers:  # they would wait for a version 1 that never comes
                proc.kill()
                proc.wait()
            raise
        rows.append({"config": role.name, "peak_rss_bytes": peak, **result})
        for proc in workers:
            result, peak = reap(proc, "worker")
            rows.append({"config": role.name, "peak_rss_bytes": peak, **result})
    return rows


def main() -> None:
    args = parse_args()
    if args._role != "main":
        result = {"generate": generate, "aggregate": aggregate, "worker": work}[args._role](args)
        print(json.dumps(result), flush=True)
        return
    made = not args.dir
    if made:
        args.dir = tempfile.mkdtemp(prefix="bench-aggregate-")
    elif os.path.exists(args.dir) and os.listdir(args.dir):
        raise SystemExit(f"error: --dir={args.dir} is not empty (the runs are created fresh)")
    os.makedirs(args.dir, exist_ok=True)
    try:
        log(f"generating {args.contributions} contributions in {args.dir} ...")
        info, _ = child(args, "generate", [])
        rows = measure(args, roles_to_run())
    finally:
        if made and not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    report(args, info, rows)


def report(args: argparse.Namespace, info: dict, rows: list[dict]) -> None:
    p, n = info["params"], args.contributions
    model_bytes = 4 * p
    print(
        f"\n{p / 1e6:.1f}M params ({model_bytes / 1e6:.0f} MB fp32), {n} x {args.format} "
        f"contributions ({info['contribution_bytes']['sharded'] / 1e6:.1f} MB each), "
        f"shard_bytes {args.shard_bytes / 2**20:g} MiB; generated in {info['generate_s']:.0f} s"
    )
    print(f"before shards the aggregator held N x model fp32 = {n * model_bytes / 1e6:.0f} MB")
    header = (
        f"{'config':9} {'process':15} {'shards':>6} {'max shard MB':>12} {'N':>4} "
        f"{'peak RSS MB':>11} {'(VmHWM MB)':>10} {'round s':>8} {'outer s':>8} {'read MB':>8}"
    )
    print(header + "\n" + "-" * len(header))
    for r in rows:
        if r["config"] == "floor":
            continue
        max_shard = info["max_shard_bytes"].get(r["config"], 0) / 1e6
        worker = r["role"].startswith("worker")
        # a worker: its own shards, and the seconds it spent deriving them (busy s)
        n_col = "-" if worker else r["accepted"]
        round_col = f"({r['busy_s']:.2f})" if worker else f"{r['round_s']:.2f}"
        outer_col = "-" if worker else f"{r['outer_step_s']:.2f}"
        print(
            f"{r['config']:9} {r['role']:15} {r['shards']:>6} {max_shard:>12.1f} {n_col:>4} "
            f"{r['peak_rss_bytes'] / 1e6:>11.0f} {r['vm_hwm_bytes'] / 1e6:>10.0f} "
            f"{round_col:>8} {outer_col:>8} {r['bytes_read'] / 1e6:>8.0f}"
        )
    by = {(r["config"], r["role"]): r for r in rows}
    main_row, base = by[("sharded", "aggregator")], by[("one-shard", "aggregator")]
    k2 = [r for r in rows if r["config"] == "K=2"]
    floor = next((r for r in rows if r["config"] == "floor"), None)
    if any(r["role"].startswith("worker") for r in k2):
        print("(a worker's round s column: the seconds it spent deriving its shards)")
    if floor is not None:
        print(
            f"floor (a process that imports, opens the store and loads the run, no round): "
            f"peak RSS {floor['peak_rss_bytes'] / 1e6:.0f} MB"
        )
    if main_row["shards"] == 1:
        print("note: the sharded plan is one shard at this size; pass a smaller --shard_bytes")
    print(
        f"sharded / one-shard: peak RSS x{main_row['peak_rss_bytes'] / base['peak_rss_bytes']:.2f}"
        f", round time x{main_row['round_s'] / base['round_s']:.2f}"
    )
    k2_matches = None
    if k2:
        coordinator = k2[0]
        k2_matches = coordinator["hashes"] == main_row["hashes"]
        print(
            f"K={K_WORKERS} / K=1 sharded: round time "
            f"x{coordinator['round_s'] / main_row['round_s']:.2f}, max peak RSS per process "
            f"x{max(r['peak_rss_bytes'] for r in k2) / main_row['peak_rss_bytes']:.2f}; "
            f"decision hashes ({', '.join(DECISION_HASHES)}) "
            f"{'match' if k2_matches else 'DIFFER'}"
        )
        if not k2_matches:
            print(f"  K=1: {main_row['hashes']}\n  K={K_WORKERS}: {coordinator['hashes']}")
    keys = ("peak_rss_bytes", "vm_hwm_bytes", "round_s", "outer_step_s", "bytes_read", "shards")
    worker_keys = ("peak_rss_bytes", "vm_hwm_bytes", "bytes_read", "shards")
    out = {
        "bench": "aggregate",
        "params": p,
        "contributions": n,
        "format": args.format,
        "shard_bytes": args.shard_bytes,
        **{k: main_row[k] for k in keys},
        "model_fp32_bytes": model_bytes,
        "n_x_model_fp32_bytes": n * model_bytes,
        "contribution_bytes": info["contribution_bytes"]["sharded"],
        "generate_s": info["generate_s"],
        "baseline": {"config": base["config"], **{k: base[k] for k in keys}},
        "floor_rss_bytes": None if floor is None else floor["peak_rss_bytes"],
        "workers": [
            {
                "role": r["role"],
                **{k: r[k] for k in worker_keys},
                **(
                    {"busy_s": r["busy_s"]}
                    if r["role"].startswith("worker")
                    else {"round_s": r["round_s"], "outer_step_s": r["outer_step_s"]}
                ),
            }
            for r in k2
        ],
        "k2_round_s": k2[0]["round_s"] if k2 else None,
        "k2_matches_k1": k2_matches,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
