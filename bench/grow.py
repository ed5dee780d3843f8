"""Growing B from a trained A against training B from scratch, on the same data (CPU).

    python3 bench/grow.py                              # library defaults: clone + stack
    python3 bench/grow.py --all_options                # clone/zero x stack/identity
    python3 bench/grow.py --seeds=3 --tokens_a=... --tokens_b=... --grown_warmup=...

A small model A (configs/tiny.py made smaller, float32) trains for --tokens_a tokens and is
grown (`near_jax.grow.run.grow_run`) into B, about 4x A's parameters, wider (d_model, heads
and MLP x1.5 at the same head_dim) and deeper (layers x2). Then B trains for --tokens_b
tokens twice with the same data order, seed and schedule (linear warm-up + cosine over the
B budget): from scratch, and from the grown params (`checkpoint.init_from`: fresh
optimizer, step 0, data from the start). Both evaluate every --eval_every steps on the
same validation batches; the grown params are also evaluated at step 0.

Reported, per grown option (medians over --seeds):
  target            the scratch run's final eval loss (so tokens_scratch_to_target = T_B)
  grown_to_target   tokens the grown run needs to reach it: eval losses are interpolated
                    linearly between evaluations (null if it never gets there)
  speedup           T_B / grown_to_target (null if never reached, or reached at step 0:
                    unbounded); speedup_with_a also charges A's training,
                    converted to B tokens by FLOPs per token (A tokens x F_A / F_B)
  to A's loss       tokens each B run needs to reach A's final eval loss
  grown step 0      the grown params' eval loss before any training (a function-preserving
                    grow equals A's final eval loss)
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections

from near_jax import cli, model, sharding
from near_jax.data.tokenizer import load_tokenizer
from near_jax.grow import maps
from near_jax.grow.run import grow_run
from near_jax.train import metrics
from near_jax.train.checkpoint_reads import restore_params
from near_jax.train.loop import train, trainer_for
from near_jax.train.step import evaluate, resolve_config

REPO = Path(__file__).resolve().parents[1]
# A and B: same head_dim (32), B is x1.5 wide (d_model, heads, MLP) and x2 deep.
MODEL_A = {"d_model": 64, "n_heads": 2, "n_kv_heads": 2, "mlp_dim": 256, "n_layers": 2}
MODEL_B = {"d_model": 96, "n_heads": 3, "n_kv_heads": 3, "mlp_dim": 384, "n_layers": 4}
Curve = list[tuple[int, float]]  # (tokens trained, eval loss)


def base_config(args: argparse.Namespace, shape: dict[str, int], steps: int) -> Any:
    """configs/tiny.py with `shape`, the bench's batch, schedule and eval cadence."""
    spec = importlib.util.spec_from_file_location("tiny_config", REPO / "configs" / "tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    for key, value in shape.items():
        cfg.model[key] = value
    cfg.model.head_dim = 0  # d_model // n_heads = 32 for both
    cfg.data.seq_len = args.seq_len
    cfg.train.global_batch_size = args.batch
    cfg.train.steps = steps
    cfg.train.log_every = max(steps, 1)  # train metrics are not what is measured
    cfg.train.eval_every = args.eval_every
    cfg.train.eval_batches = args.eval_batches
    cfg.train.progress = "lines"
    cfg.optim.lr = args.lr
    cfg.optim.warmup_steps = max(1, round(args.warmup * steps))
    cfg.checkpoint.every = 0
    cfg.checkpoint.async_save = False
    return cfg


def steps_for(tokens: int, args: argparse.Namespace) -> int:
    """Optimizer steps that cover `tokens` (at least one)."""
    return max(1, round(tokens / (args.batch * args.seq_len)))


def eval_curve(workdir: str) -> Curve:
    """(tokens, eval loss) of every evaluation the run's metrics.jsonl holds, in order."""
    out = []
    with open(os.path.join(workdir, metrics.METRICS_FILE)) as f:
        for line in f:
            record = json.loads(line)
            if record.get("split") == "eval":
                out.append((int(record["tokens"]), float(record["loss"])))
    return out


def eval_params(cfg: ml_collections.ConfigDict, init_from: str) -> float:
    """The eval loss of the params in run `init_from` under `cfg` (the loop's own eval)."""
    cfg = resolve_config(cfg, load_tokenizer(cfg.data.tokenizer).vocab_size)
    trainer = trainer_for(cfg, sharding.make_mesh(cfg.mesh))
    _, params = restore_params(init_from, trainer.abstract_state.params)
    return evaluate(trainer, params, cfg.seed)["loss"]


def tokens_to(curve: Curve, target: float) -> float | None:
    """Tokens at which `curve` first reaches `target`, interpolated between evaluations."""
    prev = None
    for tokens, loss in curve:
        if loss <= target:
            if prev is None or prev[1] == loss:
                return float(tokens)
            t0, l0 = prev
            return t0 + (tokens - t0) * (l0 - target) / (l0 - loss)
        prev = (tokens, loss)
    return None


def quiet_train(cfg: ml_collections.ConfigDict, workdir: str) -> float:
    """Trains `cfg` in `workdir` with its progress lines on stderr; returns seconds."""
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        train(cfg, workdir)
    return time.perf_counter() - start


def model_sizes(cfg: ml_collections.ConfigDict, seq_len: int) -> dict[str, float]:
    """Parameter counts and training FLOPs per token of `cfg`'s model."""
    cfg = resolve_config(cfg, load_tokenizer(cfg.data.tokenizer).vocab_size)
    counts = model.param_counts(cfg.model)
    return {**counts, "flops_per_token": model.flops_per_token(cfg.model, seq_len)}


def one_seed(args: argparse.Namespace, seed: int, options: list[tuple[str, str]], root: str):
    """A, scratch B and one grown B per option, all with `seed`: the raw measurements."""
    steps_a, steps_b = steps_for(args.tokens_a, args), steps_for(args.tokens_b, args)
    cfg_a = base_config(args, MODEL_A, steps_a)
    cfg_a.seed = seed
    cfg_a.checkpoint.every = steps_a  # the one checkpoint B grows from
    run_a = os.path.join(root, f"a{seed}")
    seconds_a = quiet_train(cfg_a, run_a)
    curve_a = eval_curve(run_a)

    cfg_b = base_config(args, MODEL_B, steps_b)
    cfg_b.seed = seed
    run_s = os.path.join(root, f"scratch{seed}")
    seconds_s = quiet_train(cfg_b, run_s)
    out = {
        "seed": seed,
        "a": {"curve": curve_a, "seconds": seconds_a},
        "scratch": {"curve": eval_curve(run_s), "seconds": seconds_s},
        "grown": {},
    }
    for width, depth in options:
        name = f"{width}+{depth}"
        run_g = os.path.join(root, f"{width}-{depth}{seed}")
        grown = grow_run(run_a, cfg_b, run_g, width=width, depth=depth, noise=args.noise, seed=seed)
        cfg_g = base_config(args, MODEL_B, steps_b)
        cfg_g.seed = seed
        if args.grown_warmup >= 0:  # a lever for the grown run only; default: B's schedule
            cfg_g.optim.warmup_steps = max(1, round(args.grown_warmup * steps_b))
        cfg_g.checkpoint.init_from = run_g
        loss0 = eval_params(cfg_g, run_g)
        work = os.path.join(root, f"train-{width}-{depth}{seed}")
        seconds_g = quiet_train(cfg_g, work)
        out["grown"][name] = {
            "curve": [(0, loss0), *eval_curve(work)],
            "grow_seconds": grown.seconds,
            "seconds": seconds_g,
        }
    return out


def summarize(raw: list[dict], sizes_a: dict, sizes_b: dict, tokens_a: int) -> dict:
    """Per option: the medians over seeds of the targets, tokens to them and speedups."""

    def med(values: list[float | None]) -> float | None:
        # A seed that never reached a target counts as infinitely slow, so the median is
        # honest about it (null when the middle is such a seed).
        keyed = sorted((math.inf if v is None else v) for v in values)
        m = statistics.median(keyed)
        return None if math.isinf(m) else m

    a_in_b_tokens = tokens_a * sizes_a["flops_per_token"] / sizes_b["flops_per_token"]
    scratch_tokens = [r["scratch"]["curve"][-1][0] for r in raw]
    scratch_final = [r["scratch"]["curve"][-1][1] for r in raw]
    a_final = [r["a"]["curve"][-1][1] for r in raw]
    scratch_to_a = [tokens_to(r["scratch"]["curve"], r["a"]["curve"][-1][1]) for r in raw]
    options = {}
    for name in raw[0]["grown"]:
        g = [r["grown"][name] for r in raw]
        to_target = [tokens_to(x["curve"], s) for x, s in zip(g, scratch_final, strict=True)]
        speed = [
            None if t is None or t <= 0 else n / t
            for t, n in zip(to_target, scratch_tokens, strict=True)
        ]
        speed_a = [
            None if t is None else n / (t + a_in_b_tokens)
            for t, n in zip(to_target, scratch_tokens, strict=True)
        ]
        options[name] = {
            "tokens_grown_to_target": med(to_target),
            "speedup": med(speed),
            "speedup_with_a": med(speed_a),
            "final_loss": med([x["curve"][-1][1] for x in g]),
            "step0_loss": med([x["curve"][0][1] for x in g]),
            "tokens_to_a_loss": med(
                [tokens_to(x["curve"], a) for x, a in zip(g, a_final, strict=True)]
            ),
            "grow_seconds": med([x["grow_seconds"] for x in g]),
            "train_seconds": med([x["seconds"] for x in g]),
        }
    return {
        "a_final_loss": med(a_final),
        "target": med(scratch_final),
        "tokens_scratch_to_target": med(scratch_tokens),
        "scratch_tokens_to_a_loss": med(scratch_to_a),
        "a_in_b_tokens": a_in_b_tokens,
        "a_seconds": med([r["a"]["seconds"] for r in raw]),
        "scratch_seconds": med([r["scratch"]["seconds"] for r in raw]),
        "options": options,
    }


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "never"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def table(summary: dict, sizes_a: dict, sizes_b: dict, tokens_a: int, seeds: int) -> str:
    """The readable report: sizes, A, scratch B and one row per grown option."""
    lines = [
        f"A: {sizes_a['total']:,} params ({sizes_a['non_embedding']:,} non-embedding), "
        f"{sizes_a['flops_per_token']:.3g} FLOPs/token; B: {sizes_b['total']:,} "
        f"({sizes_b['non_embedding']:,} non-embedding; x{sizes_b['total'] / sizes_a['total']:.2f}"
        f" total, x{sizes_b['non_embedding'] / sizes_a['non_embedding']:.2f} non-embedding), "
        f"{sizes_b['flops_per_token']:.3g} FLOPs/token; medians over {seeds} seed(s)",
        f"A: {tokens_a:,} tokens ({summary['a_seconds']:.0f}s) -> eval loss "
        f"{summary['a_final_loss']:.4f}; its compute = {summary['a_in_b_tokens']:,.0f} B tokens",
        f"B scratch: {summary['tokens_scratch_to_target']:,} tokens "
        f"({summary['scratch_seconds']:.0f}s) -> eval loss {summary['target']:.4f} (the target); "
        f"reaches A's loss at {_fmt(summary['scratch_tokens_to_a_loss'], 6)} tokens",
        "",
    ]
    head = (
        "grown B",
        "step-0 loss",
        "final loss",
        "tokens to target",
        "speedup",
        "speedup incl. A",
        "tokens to A's loss",
        "grow s",
        "train s",
    )
    rows = [head]
    for name, o in summary["options"].items():
        rows.append(
            (
                name,
                _fmt(o["step0_loss"]),
                _fmt(o["final_loss"]),
                _fmt(o["tokens_grown_to_target"], 6),
                _fmt(o["speedup"], 3).replace("never", "n/a"),
                _fmt(o["speedup_with_a"], 3).replace("never", "n/a"),
                _fmt(o["tokens_to_a_loss"], 6),
                f"{o['grow_seconds']:.1f}",
                f"{o['train_seconds']:.0f}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.append("(tokens to a loss: linear interpolation between evaluations)")
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", default="clone", choices=maps.WIDTHS)
    p.add_argument("--depth", default="stack", choices=maps.DEPTHS)
    p.add_argument("--all_options", action="store_true", help="clone/zero x stack/identity")
    p.add_argument("--seeds", type=int, default=1, help="repeat with seeds 0..N-1; medians")
    p.add_argument("--tokens_a", type=int, default=400_000, help="A's training tokens")
    p.add_argument("--tokens_b", type=int, default=400_000, help="B's budget, both ways")
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3, help="peak lr of every run")
    p.add_argument("--warmup", type=float, default=0.1, help="warm-up, fraction of steps")
    p.add_argument(
        "--grown_warmup",
        type=float,
        default=-1.0,
        help="the grown runs' warm-up (fraction of steps); -1: the scratch run's",
    )
    p.add_argument("--noise", type=float, default=0.01, help="clone's symmetry-breaking noise")
    p.add_argument("--eval_every", type=int, default=10)
    p.add_argument("--eval_batches", type=int, default=8)
    p.add_argument("--out_dir", default="", help="keep the runs here (default: a temp dir)")
    p.add_argument("--json_only", action="store_true")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.tokens_a < 1 or args.tokens_b < 1 or args.noise < 0:
        p.error("--seeds, --tokens_a and --tokens_b must be >= 1 and --noise >= 0")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Runs the bench, prints the table and one JSON line; returns the JSON's dict."""
    cli.quiet_library_logs()
    args = parse(argv)
    if args.all_options:
        options = [(w, d) for w in maps.WIDTHS for d in maps.DEPTHS]
    else:
        options = [(args.width, args.depth)]
    start = time.perf_counter()
    root = args.out_dir or tempfile.mkdtemp(prefix="bench_grow_")
    try:
        raw = [one_seed(args, seed, options, root) for seed in range(args.seeds)]
    finally:
        if not args.out_dir:
            shutil.rmtree(root, ignore_errors=True)
    steps_a = steps_for(args.tokens_a, args)
    tokens_a = steps_a * args.batch * args.seq_len
    sizes_a = model_sizes(base_config(args, MODEL_A, steps_a), args.seq_len)
    sizes_b = model_sizes(base_config(args, MODEL_B, 1), args.seq_len)
    summary = summarize(raw, sizes_a, sizes_b, tokens_a)
    first = summary["options"][f"{options[0][0]}+{options[0][1]}"]
    result = {
        "bench": "grow",
        "device": jax.devices()[0].device_kind,
        "width": options[0][0],
        "depth": options[0][1],
        # The headline: the first option's (the flags', or clone+stack with --all_options).
        "tokens_scratch_to_target": summary["tokens_scratch_to_target"],
        "tokens_grown_to_target": first["tokens_grown_to_target"],
        "speedup": first["speedup"],
        "speedup_with_a": first["speedup_with_a"],
        "tokens_a": tokens_a,
        "params_a": sizes_a["total"],
        "params_b": sizes_b["total"],
        "non_embedding_a": sizes_a["non_embedding"],
        "non_embedding_b": sizes_b["non_embedding"],
        "flops_per_token_a": sizes_a["flops_per_token"],
        "flops_per_token_b": sizes_b["flops_per_token"],
        "seeds": args.seeds,
        "lr": args.lr,
        "warmup": args.warmup,
        "grown_warmup": args.grown_warmup if args.grown_warmup >= 0 else args.warmup,
        "noise": args.noise,
        "seq_len": args.seq_len,
        "batch": args.batch,
        "eval_every": args.eval_every,
        "eval_batches": args.eval_batches,
        **{k: v for k, v in summary.items() if k != "options"},
        "options": summary["options"],
        "curves_seed0": {
            "a": raw[0]["a"]["curve"],
            "scratch": raw[0]["scratch"]["curve"],
            **{k: v["curve"] for k, v in raw[0]["grown"].items()},
        },
        "wall_s": time.perf_counter() - start,
    }
    if not args.json_only:
        print(table(summary, sizes_a, sizes_b, tokens_a, args.seeds))
        print(f"wall time {result['wall_s']:.0f}s")
    print(json.dumps(result))
    sys.stdout.flush()
    return result


if __name__ == "__main__":
    main()
