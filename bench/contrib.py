"""What validating untrusted contributors costs the aggregator, per round, on the host.

    python3 bench/contrib.py                            # N = 8, 32, 64 at 1M params
    python3 bench/contrib.py --params=4e6 --contributors=8,16 --repeats=3

Each row closes one round of N signed int8 contributions of a P-parameter model through
`ContribAggregator` on a local store, and times its phases (medians over --repeats rounds):
  check      read + verify the signature + stream and decode each shard (per contribution)
  screen     the Gram pass (every shard read again, norms and pairwise cosines, O(N²)),
             then the stale/copy/outlier checks
  score      N + 1 evaluations of a loss, each moved copy built from a Δ's shards; here a
             cheap numpy stand-in (a linear probe), so the column measures the host work
             around the model, not the model
  combine    the robust rule: trimmed mean (20%), median, and the plain mean as baseline
  ledger     the round's ledger transaction + the store mirror
Baseline in the same run: the plain diloco `Aggregator` (mean, no checks) on the same
contributions. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from near_jax.contrib import identity, registry, screening, streamed
from near_jax.contrib.contributor import Signer
from near_jax.contrib.policy import Policy
from near_jax.contrib.validator import ContribAggregator
from near_jax.diloco import protocol, robust
from near_jax.diloco.aggregator import Aggregator
from near_jax.diloco.store import ObjectStore

RUN, SPEC, CODE, CONFIG = "bench", "int8", "c" * 64, "d" * 64


def like_tree(params: int) -> dict:
    """A params-shaped tree of about `params` elements in a few leaves (like a model's)."""
    d = max(int((params / 12) ** 0.5), 8)
    return {"embed": np.zeros((4 * d, d), np.float32), "mlp": np.zeros((2, d, 4 * d), np.float32)}


def probe_loss(params, seed):
    """A cheap loss: a fixed linear probe of the params (stands in for a model eval)."""
    rng = np.random.default_rng(seed)
    return float(sum(np.mean(x) * rng.standard_normal() for x in params.values()) ** 2)


def one_round(path: Path, like: dict, n: int, rule: robust.Rule, rnd_seed: int) -> dict:
    store = ObjectStore.open(str(path))
    agg_key = identity.generate()
    # The probe's scores are noise around 0: min_score=-1 keeps all N in every phase.
    policy = Policy(
        rule=rule, allowed_code=(CODE,), config_sha256=CONFIG, score_batches=1, min_score=-1.0
    )
    agg = ContribAggregator(
        store,
        RUN,
        like,
        aggregator_key=agg_key,
        policy=policy,
        loss_fn=probe_loss,
        ledger_path=str(path / "ledger.sqlite"),
        spec=SPEC,
        lr=0.7,
        momentum=0.9,
        quorum=n,
        round_timeout=60.0,
    )
    rng = np.random.default_rng(rnd_seed)
    agg.create(
        {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in like.items()},
        agg.manifest_fields(),
    )
    base = agg.load()
    shared = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in like.items()}
    for i in range(n):
        name, key = f"c{i:03d}", identity.generate()
        registry.register(store, RUN, name, key, 0.0)
        delta = {
            k: 0.01 * (shared[k] + rng.standard_normal(v.shape).astype(np.float32))
            for k, v in like.items()
        }
        protocol.push_contribution(
            store,
            RUN,
            name,
            base,
            agg.plan,
            agg.plan.split(delta),
            SPEC,
            sign=Signer(key, name, CODE, CONFIG),
        )

    times: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            times[name] = times.get(name, 0.0) + time.perf_counter() - t0
            return out

        return wrapper

    agg.check = timed("check", agg.check)
    originals = streamed.gram, screening.screen_gram, screening.score_moved
    streamed.gram = timed("screen", originals[0])
    screening.screen_gram = timed("screen", originals[1])
    screening.score_moved = timed("score", originals[2])
    agg.recorded = timed("ledger", agg.recorded)
    t0 = time.perf_counter()
    try:
        stats = agg.run_round()
    finally:
        streamed.gram, screening.screen_gram, screening.score_moved = originals
        agg.close()
    times["round"] = time.perf_counter() - t0
    assert stats["accepted"] == n, stats["decision"]["rejected"][:3]
    times["check"] /= n  # per contribution
    deltas = [
        protocol.read_contribution(store, RUN, 0, agg.plan, e["island"])
        for e in stats["decision"]["accepted"]
    ]
    for name in ("trimmed_mean", "median", "mean"):
        t1 = time.perf_counter()
        robust.combine(robust.Rule(name), deltas)
        times[f"combine_{name}"] = time.perf_counter() - t1
    return times


def baseline_round(path: Path, like: dict, n: int, rnd_seed: int) -> float:
    """The plain diloco aggregator (mean, structural checks only) on n unsigned contributions."""
    store = ObjectStore.open(str(path))
    agg = Aggregator(
        store, RUN, like, spec=SPEC, lr=0.7, momentum=0.9, quorum=n, round_timeout=60.0
    )
    rng = np.random.default_rng(rnd_seed)
    agg.create({k: rng.standard_normal(v.shape).astype(np.float32) for k, v in like.items()}, {})
    base = agg.load()
    for i in range(n):
        delta = {k: 0.01 * rng.standard_normal(v.shape).astype(np.float32) for k, v in like.items()}
        protocol.push_contribution(
            store, RUN, f"c{i:03d}", base, agg.plan, agg.plan.split(delta), SPEC
        )
    t0 = time.perf_counter()
    agg.run_round()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=float, default=1e6)
    parser.add_argument("--contributors", default="8,32,64")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    like = like_tree(int(args.params))
    p = protocol.num_elements(like)
    rows = []
    for n in [int(x) for x in args.contributors.split(",")]:
        samples, base = [], []
        for rep in range(args.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                samples.append(one_round(Path(tmp), like, n, robust.Rule("trimmed_mean"), rep))
            with tempfile.TemporaryDirectory() as tmp:
                base.append(baseline_round(Path(tmp), like, n, rep))
        row = {"contributors": n, "params": p}
        for key in samples[0]:
            row[f"{key}_s"] = statistics.median(s[key] for s in samples)
        row["baseline_round_s"] = statistics.median(base)
        rows.append(row)
        print(
            f"N={n}: round {row['round_s']:.2f}s (baseline {row['baseline_round_s']:.2f}s)",
            flush=True,
        )
    cols = [
        ("N", "contributors", "{:d}"),
        ("round s", "round_s", "{:.3f}"),
        ("mean-only round s", "baseline_round_s", "{:.3f}"),
        ("check ms/contrib", "check_s", "{:.1f}"),
        ("screen s", "screen_s", "{:.3f}"),
        ("score s", "score_s", "{:.3f}"),
        ("ledger s", "ledger_s", "{:.3f}"),
        ("trimmed s", "combine_trimmed_mean_s", "{:.3f}"),
        ("median s", "combine_median_s", "{:.3f}"),
        ("mean s", "combine_mean_s", "{:.3f}"),
    ]
    print(
        f"\ncontributor validation per round, {p / 1e6:.2f}M params, int8, medians of "
        f"{args.repeats} (score = {len(like)}-leaf numpy probe, not a model eval)"
    )
    header = " | ".join(c[0] for c in cols)
    print(header + "\n" + "-" * len(header))
    for row in rows:
        cells = []
        for _, key, fmt in cols:
            value = row[key] * (1e3 if key == "check_s" else 1)
            cells.append(fmt.format(value))
        print(" | ".join(cells))
    print(json.dumps({"bench": "contrib", "params": p, "rows": rows}))


if __name__ == "__main__":
    main()
