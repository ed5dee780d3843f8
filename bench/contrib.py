"""What validating untrusted contributors costs the aggregator, per round, on the host.

    python3 bench/contrib.py                            # N = 8, 32, 64 at 1M params
    python3 bench/contrib.py --params=4e6 --contributors=8,16 --repeats=3

Each row closes one round of N signed int8 contributions of a P-parameter model through
`ContribAggregator` on a local store, and times its phases (medians over --repeats rounds):
  check      read + verify the signature + stream and decode each shard (per contribution)
  screen     the Gram pass (every shard read again, norms and pairwise cosines, O(N²)),
             then the stale/copy/outlier checks
  score      `judging.judge`: N + 1 evaluations of a loss (validate_sample=0: all), each
             moved copy built from a Δ's shards, and the ratings; here a
             cheap numpy stand-in (a linear probe), so the column measures the host work
             around the model, not the model
  combine    the robust rule: trimmed mean (20%), median, and the plain mean as baseline
  ledger     the round's ledger transaction + the store mirror
Baseline in the same run: the plain diloco `Aggregator` (mean, no checks) on the same
contributions. Prints a table and one JSON line.

    python3 bench/contrib.py --adversarial              # the contributor gauntlet, 10 rounds
    python3 bench/contrib.py --adversarial --rounds=4 --cost-contributors=16 --repeats=1

--adversarial runs the gauntlet of tests/contrib_world.py (a least-squares model; real
store, signatures, screening, judging, ratings, ledger; run from a checkout: it imports
tests/) for --rounds rounds, three times with the same aggregator key (so the same scoring
seeds): honest-only; honest + the three cheats (lazy, valtrained, nearcopy) + 20 sybils
against an open run (new_keys_per_round=4); and the same against a run allowlisting only
the honest and cheat names. Per adversary kind: in how many of its pushes it was rejected
(with the reasons' prefixes) and its total reward; the honest share of the open run's
rewards; the open run's final eval loss against honest-only. Then the validation cost of
sampling: one round of --cost-contributors honest contributions (all rated by a first round)
judged with validate_sample=--sample against validating all, counting evaluator calls (val
and train losses) and timing `decide`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from near_jax.contrib import identity, judging, registry, screening, streamed
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
    # The probe's scores are noise around 0: min_score=-1 keeps all N in every phase. The
    # probe has no train data (no assigned-data check: --adversarial measures that) and all
    # N contributors are new in this one round (no new-key cap).
    policy = Policy(
        rule=rule,
        allowed_code=(CODE,),
        config_sha256=CONFIG,
        score_batches=1,
        min_score=-1.0,
        assigned_data=False,
        new_keys_per_round=0,
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
    originals = streamed.gram, screening.screen_gram, judging.judge
    streamed.gram = timed("screen", originals[0])
    screening.screen_gram = timed("screen", originals[1])
    judging.judge = timed("score", originals[2])
    agg.recorded = timed("ledger", agg.recorded)
    t0 = time.perf_counter()
    try:
        stats = agg.run_round()
    finally:
        streamed.gram, screening.screen_gram, judging.judge = originals
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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=float, default=1e6)
    parser.add_argument("--contributors", default="8,32,64")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--adversarial", action="store_true", help="the contributor gauntlet")
    parser.add_argument("--rounds", type=int, default=10, help="gauntlet rounds (--adversarial)")
    parser.add_argument(
        "--cost-contributors", type=int, default=64, help="N of the sampling cost (--adversarial)"
    )
    parser.add_argument("--sample", type=int, default=8, help="validate_sample K (--adversarial)")
    args = parser.parse_args(argv)
    if args.adversarial:
        return adversarial(args)
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
    result = {"bench": "contrib", "params": p, "rows": rows}
    print(json.dumps(result))
    return result


# --------------------------------------------------------------------------- --adversarial


def _contrib_world():
    """tests/contrib_world.py (with tests/helpers.py): the bench runs from a checkout."""
    tests = str(Path(__file__).resolve().parent.parent / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import contrib_world

    return contrib_world


def _run(cw, path: Path, rounds: int, cheats, sybils, key, allowlist=None):
    """(decisions, eval loss after each round) of a gauntlet run (`allowlist`: its entry)."""
    _, decisions, losses = cw.gauntlet(
        path, rounds, cheats, sybils, aggregator_key=key, allowlist=allowlist
    )
    return decisions, losses


def _tally(kind: str, names: list[str], decisions: list[dict]) -> dict:
    """How the adversaries `names` fared: pushes rejected with a reason (`caught`, out of
    `rounds` pushes), the reasons' prefixes, pushes accepted, total reward."""
    caught = pushed = accepted = 0
    reasons: set[str] = set()
    reward = 0.0
    for d in decisions:
        for e in d["contrib"]["entries"]:
            if e["contributor"] not in names:
                continue
            pushed += 1
            reward += e["reward"]
            if e["accepted"]:
                accepted += 1
            elif e["reason"]:
                caught += 1
                reasons.add(e["reason"].split(":")[0])
    return {
        "kind": kind,
        "caught": caught,
        "rounds": pushed,
        "reasons": sorted(reasons),
        "reward": reward,
        "accepted": accepted,
    }


# A low_rating nobody is below (the manifest's JSON has no -inf): only the sample is validated.
LOW_RATING_OFF = -1e9


def _cost_round(cw, path: Path, n: int, k: int, low_rating: float, key) -> dict:
    """Round 1 of a run of `n` honest contributors (round 0 rated them all: nobody has a
    rating then, so everyone is validated), judged with validate_sample=k: evaluator calls,
    seconds in `decide`, how many were validated and how many were rated below low_rating."""
    names = [f"c{i:02d}" for i in range(n)]
    # No new-key cap (all n join in round 0); otherwise the gauntlet's policy.
    policy = dataclasses.replace(
        cw.GAUNTLET_POLICY, validate_sample=k, new_keys_per_round=0, low_rating=low_rating
    )
    world = cw.World(path, names, policy, aggregator_key=key, tag="topic")
    agg, calls, spent = world.agg, {"val": 0, "train": 0}, [0.0]

    def counted(what, fn):
        def wrapper(*args, **kwargs):
            calls[what] += 1
            return fn(*args, **kwargs)

        return wrapper

    agg.loss_fn = counted("val", agg.loss_fn)
    agg.train_loss_fn = counted("train", agg.train_loss_fn)
    decide = agg.decide

    def timed_decide(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return decide(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - t0

    agg.decide = timed_decide
    try:
        for rnd in range(2):
            base, r = world.tree(world.base()), agg.state.version
            for name in names:
                world.push(name, cw.inner(base, name, r, tag="topic"))
            if rnd == 1:
                low = sum(agg.ratings[x].ordinal < low_rating for x in names if x in agg.ratings)
                unrated = sum(x not in agg.ratings for x in names)
                calls.update(val=0, train=0)
                spent[0] = 0.0
            decision = cw.close_round(world)
    finally:
        agg.close()
    entries = decision["contrib"]["entries"]
    validated = sum(json.loads(e["detail"])["validated"] for e in entries)
    return {
        "evaluations": calls["val"] + calls["train"],
        "val_calls": calls["val"],
        "train_calls": calls["train"],
        "decide_s": spent[0],
        "validated": validated,
        "low_rated": low,
        "unrated": unrated,
        "accepted": sum(e["accepted"] for e in entries),
        "rejected": dict(
            sorted(Counter(e["reason"].split(":")[0] for e in entries if not e["accepted"]).items())
        ),
    }


def validation_cost(cw, n: int, k: int, repeats: int, low_rating: float | None = None) -> dict:
    """Sampled (validate_sample=k) against validating all n, medians over `repeats`
    (`low_rating` None: the policy's default)."""
    if low_rating is None:
        low_rating = cw.GAUNTLET_POLICY.low_rating
    sampled, full = [], []
    for rep in range(repeats):
        key = cw.key_of(f"aggregator-{rep}")  # the same seeds for both
        with tempfile.TemporaryDirectory() as tmp:
            sampled.append(_cost_round(cw, Path(tmp) / "k", n, k, low_rating, key))
            full.append(_cost_round(cw, Path(tmp) / "all", n, 0, low_rating, key))

    def med(rows, field):
        return statistics.median(r[field] for r in rows)

    out = {"n": n, "k": k, "repeats": repeats, "low_rating": low_rating}
    for field in ("evaluations", "decide_s", "validated"):
        out[field] = {"sampled": med(sampled, field), "all": med(full, field)}
        out[field]["ratio"] = out[field]["sampled"] / max(out[field]["all"], 1e-12)
    out["validated_beyond_k"] = med(sampled, "validated") - k
    # Honest contributions screening or judging rejected in the timed round (every repeat).
    out["honest_rejected"] = {
        "sampled": [r["rejected"] for r in sampled],
        "all": [r["rejected"] for r in full],
    }
    out["low_rated"] = med(sampled, "low_rated")
    out["unrated"] = med(sampled, "unrated")  # screened out of round 0: never judged yet
    out["target_ratio"] = 0.25
    out["meets_target"] = out["evaluations"]["ratio"] <= 0.25
    return out


def adversarial(args) -> dict:
    cw = _contrib_world()
    cheats, sybils = tuple(cw.CHEATS), tuple(cw.SYBILS)
    key = cw.key_of("bench-aggregator")  # one key: the same scoring seeds in every run
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _, honest_losses = _run(cw, tmp / "honest", args.rounds, (), (), key)
        print(f"honest-only: {time.perf_counter() - t0:.1f}s", flush=True)
        opened, open_losses = _run(cw, tmp / "open", args.rounds, cheats, sybils, key)
        print(f"open run: {time.perf_counter() - t0:.1f}s", flush=True)
        walled = cw.allowlist_of(cw.HONEST + list(cheats))
        closed, closed_losses = _run(cw, tmp / "allow", args.rounds, cheats, sybils, key, walled)
        print(f"allowlisted run: {time.perf_counter() - t0:.1f}s", flush=True)
    adversaries = [_tally(c, [c], opened) for c in cheats]
    adversaries.append(_tally("sybils-open", list(sybils), opened))
    adversaries.append(_tally("sybils-allowlisted", list(sybils), closed))
    honest_open = _tally("honest", list(cw.HONEST), opened)  # not adversaries: false alarms
    rewards = cw.rewards_by_contributor(opened)
    total = math.fsum(rewards.values())
    honest = math.fsum(rewards.get(n, 0.0) for n in cw.HONEST)
    share = honest / total if total > 0 else 0.0
    gap = (open_losses[-1] - honest_losses[-1]) / honest_losses[-1]
    closed_rewards = cw.rewards_by_contributor(closed)
    closed_total = math.fsum(closed_rewards.values())
    closed_share = (
        math.fsum(closed_rewards.get(n, 0.0) for n in cw.HONEST) / closed_total
        if closed_total > 0
        else 0.0
    )
    cost = validation_cost(cw, args.cost_contributors, args.sample, args.repeats)
    print(f"validation cost: {time.perf_counter() - t0:.1f}s", flush=True)
    cost_off = None
    if not cost["meets_target"]:  # what the sample alone costs, low-rated ones not forced
        cost_off = validation_cost(
            cw, args.cost_contributors, args.sample, args.repeats, low_rating=LOW_RATING_OFF
        )
        print(
            f"validation cost (low_rating={LOW_RATING_OFF:g}): {time.perf_counter() - t0:.1f}s",
            flush=True,
        )

    print(
        f"\ncontributor gauntlet, {args.rounds} rounds: {len(cw.HONEST)} honest, cheats "
        f"{', '.join(cheats)}, {len(sybils)} sybils (caught: pushes rejected with a reason)"
    )
    header = f"{'adversary':<20} {'caught':>9} {'accepted':>8} {'reward':>8}  reasons"
    print(header + "\n" + "-" * (len(header) + 30))
    for a in adversaries:
        print(
            f"{a['kind']:<20} {a['caught']:>4}/{a['rounds']:<4} {a['accepted']:>8} "
            f"{a['reward']:>8.4f}  {', '.join(a['reasons'])}"
        )
    a = honest_open
    print(
        f"{'(honest, open run)':<20} {a['caught']:>4}/{a['rounds']:<4} {a['accepted']:>8} "
        f"{a['reward']:>8.4f}  {', '.join(a['reasons'])}"
    )
    print(
        f"\nhonest reward share (open run) {share:.4f}; allowlisted run {closed_share:.4f}\n"
        f"final eval loss: honest-only {honest_losses[-1]:.4f}, open run "
        f"{open_losses[-1]:.4f} ({100 * gap:+.2f}%), allowlisted run {closed_losses[-1]:.4f}"
    )
    for c in filter(None, (cost, cost_off)):
        ev, sec, val = c["evaluations"], c["decide_s"], c["validated"]
        print(
            f"\nvalidation cost, N={c['n']}, K={c['k']} vs all (low_rating={c['low_rating']:g}), "
            f"medians of {c['repeats']}: evaluator calls {ev['sampled']:g} vs {ev['all']:g} "
            f"({100 * ev['ratio']:.1f}%), decide {sec['sampled']:.3f}s vs {sec['all']:.3f}s "
            f"({100 * sec['ratio']:.1f}%); validated {val['sampled']:g} of {c['n']} "
            f"({c['validated_beyond_k']:g} beyond K: {c['low_rated']:g} rated below "
            f"low_rating, {c['unrated']:g} unrated); target <= 25% of evaluator calls: "
            f"{'met' if c['meets_target'] else 'NOT met'}; honest contributions rejected in "
            f"the timed round, per repeat: K={c['k']} {c['honest_rejected']['sampled']}, "
            f"all {c['honest_rejected']['all']}"
        )
    if cost_off is not None:
        print(
            f"(low_rating={LOW_RATING_OFF:g} is not the run's default "
            f"({cost['low_rating']:g}): it forces no low-rated contributor into the sample, "
            "to show what the sample alone costs)"
        )
    result = {
        "bench": "contrib_adversarial",
        "rounds": args.rounds,
        "adversaries": adversaries,
        "honest_open_run": honest_open,
        "honest_reward_share": share,
        "loss_gap_vs_honest": gap,
        "allowlisted_honest_reward_share": closed_share,
        "final_eval_loss": {
            "honest": honest_losses[-1],
            "open": open_losses[-1],
            "allowlisted": closed_losses[-1],
        },
        "validation_cost": {**cost, "low_rating_off": cost_off},
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
