"""Train-step throughput: median step time, tokens/s, memory and MFU for a config and mesh.

    python3 bench/train_throughput.py --config=configs/tiny.py [--config.mesh.fsdp=-1 ...]
        [--steps=10] [--warmup=2] [--compare=loss_chunk=0,loss_chunk=1024]

Batches are random tokens already on the devices, so the number is the train step alone
(the input pipeline is measured separately). Prints a table and one JSON line.

`--profile_steps=N` traces N more steps of each variant with jax.profiler and prints its
costliest XLA ops: milliseconds per step, share of all op time, output shape, and the JAX
operation each came from (the compiled HLO's metadata), so a change can be aimed at what
the step actually spends.

`--compare` times several variants of the config in the same run, one after another:
comma-separated, each `key=value` (a model field, or `section.key`), several overrides of
one variant joined with `+`. The table then has a row per variant and the JSON line a
`variants` list and each variant's speed relative to the first.
"""

from __future__ import annotations

import copy
import glob
import gzip
import json
import re
import statistics
import sys
import tempfile
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from near_jax import cli, model, sharding
from near_jax import config as config_lib
from near_jax.config import ConfigError
from near_jax.data.tokenizer import load_tokenizer
from near_jax.train import metrics
from near_jax.train.loop import trainer_for
from near_jax.train.step import check_batch, resolve_config


def random_batch(cfg, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A [global_batch, seq_len] batch of random tokens, one document per row."""
    rng = np.random.default_rng(seed)
    b, length = cfg.train.global_batch_size, cfg.data.seq_len
    tokens = rng.integers(0, vocab, (b, length + 1), dtype=np.int32)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (b, length)).copy(),
        "segment_ids": np.ones((b, length), np.int32),
        "weights": np.ones((b, length), np.float32),
    }


_HLO_OP = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.+?) [a-z][\w-]*\(")  # name, shape


def hlo_ops(hlo_text: str) -> dict[str, tuple[str, str]]:
    """{instruction name: (output shape, JAX op name)} of a compiled module's text."""
    ops = {}
    for line in hlo_text.splitlines():
        m = _HLO_OP.match(line)
        if m:
            op_name = re.search(r'op_name="([^"]*)"', line)
            ops[m.group(1)] = (m.group(2), op_name.group(1) if op_name else "")
    return ops


def profile_ops(step, state, batch, steps: int, top: int = 12) -> tuple[list[dict], object]:
    """The `top` costliest XLA ops of `steps` traced calls of `step` (jax.profiler): ms
    per step, share of all op time, shape, JAX op name. Returns (ops, the last state)."""
    ops = hlo_ops(step.lower(state, batch).compile().as_text())
    with tempfile.TemporaryDirectory() as logdir:
        with jax.profiler.trace(logdir):
            for _ in range(steps):
                state, stats = step(state, batch)
                jax.block_until_ready(stats)
        (path,) = glob.glob(f"{logdir}/plugins/profile/*/*.trace.json.gz")
        with gzip.open(path) as f:
            events = json.load(f)["traceEvents"]
    micros: dict[str, float] = {}
    for e in events:  # op events carry the instruction's name; runtime events do not
        if e.get("ph") == "X" and e.get("name") in ops:
            micros[e["name"]] = micros.get(e["name"], 0.0) + e.get("dur", 0.0)
    total = sum(micros.values()) or 1.0
    rows = []
    for name, us in sorted(micros.items(), key=lambda kv: -kv[1])[:top]:
        shape, op_name = ops[name]
        rows.append(
            {
                "op": name,
                "ms_per_step": us / 1e3 / steps,
                "share": us / total,
                "shape": shape,
                "jax_op": op_name.split("/", 1)[-1],
            }
        )
    return rows, state


def profile_table(rows: list[dict]) -> str:
    """The costliest ops, one a line."""
    lines = [f"{'ms/step':>9} {'share':>6}  {'op':<28} {'shape':<24} jax op"]
    for r in rows:
        lines.append(
            f"{r['ms_per_step']:>9.1f} {r['share']:>6.1%}  {r['op'][:28]:<28} "
            f"{r['shape'][:24]:<24} {r['jax_op'][-70:]}"
        )
    return "\n".join(lines)


def measure(cfg, steps: int, warmup: int, profile_steps: int = 0) -> dict:
    """Compiles the train step for `cfg` and times `steps` steps after `warmup` ones;
    with `profile_steps`, also the costliest ops of that many traced steps ("profile")."""
    config_lib.validate(cfg)
    cfg = resolve_config(cfg, load_tokenizer(cfg.data.tokenizer).vocab_size)
    mesh = sharding.make_mesh(cfg.mesh)
    check_batch(cfg, mesh)
    trainer = trainer_for(cfg, mesh)
    state = trainer.init(jax.random.key(0))
    batch = jax.device_put(random_batch(cfg, cfg.model.vocab_size), trainer.batch_sharding)

    t0 = time.perf_counter()
    compiled = trainer.step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    compiled_bytes = None
    if mem is not None:
        compiled_bytes = (
            mem.argument_size_in_bytes
            + mem.output_size_in_bytes
            + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes
        )

    for _ in range(warmup):
        state, stats = trainer.step(state, batch)
    jax.block_until_ready(state)  # not `stats`: with --warmup=0 no step has run yet
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, stats = trainer.step(state, batch)
        jax.block_until_ready(stats)
        times.append(time.perf_counter() - t)

    profile = None
    if profile_steps:
        profile, state = profile_ops(trainer.step, state, batch, profile_steps)

    step_s = statistics.median(times)
    tokens = cfg.train.global_batch_size * cfg.data.seq_len
    tps = tokens / step_s
    n_dev = jax.device_count()
    peak = metrics.peak_flops_per_device(jax.devices()[0])
    flops = model.flops_per_token(trainer.model_cfg, cfg.data.seq_len)
    device_stats = jax.devices()[0].memory_stats() or {}
    return {
        "config": cfg.name or "custom",
        "device": jax.devices()[0].device_kind,
        "devices": n_dev,
        "mesh": dict(mesh.shape),
        "remat": cfg.model.remat,
        "attention": cfg.model.attention,
        "params_m": model.param_counts(trainer.model_cfg)["total"] / 1e6,
        "batch_tokens": tokens,
        "compile_s": compile_s,
        "step_s_median": step_s,
        "step_s_min": min(times),
        "tokens_per_s": tps,
        "tokens_per_s_per_device": tps / n_dev,
        "tflops_per_s_per_device": flops * tps / n_dev / 1e12,
        "mfu": metrics.mfu(flops, tps, n_dev, peak),
        "compiled_bytes_per_device": compiled_bytes,
        "temp_bytes_per_device": None if mem is None else mem.temp_size_in_bytes,
        "peak_bytes_in_use": device_stats.get("peak_bytes_in_use"),
        "loss": float(stats["loss"]),
        "profile": profile,
    }


def parse_compare(spec: str) -> list[dict[str, str]]:
    """`a=1,a=2+b=x` -> [{"model.a": "1"}, {"model.a": "2", "model.b": "x"}]; ValueError."""
    variants = []
    for variant in filter(None, spec.split(",")):
        overrides = {}
        for item in variant.split("+"):
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ValueError(f"--compare: {item!r} is not key=value")
            overrides[key if "." in key else f"model.{key}"] = value
        variants.append(overrides)
    return variants


def with_overrides(cfg, overrides: dict[str, str]):
    """A copy of `cfg` with `section.key` set to each value, cast to the field's type."""
    cfg = copy.deepcopy(cfg)
    for key, text in overrides.items():
        section, field = key.split(".", 1)
        if section not in cfg or field not in cfg[section]:
            raise ConfigError(f"--compare: config.{key} is not a config field")
        kind = type(cfg[section][field])
        value = text.lower() in ("1", "true") if kind is bool else kind(text)
        cfg[section][field] = value
    return cfg


def compare(
    cfg, variants: list[dict[str, str]], steps: int, warmup: int, profile_steps: int = 0
) -> list[dict]:
    """`measure` for each variant of `cfg`, in order, in this process."""
    results = []
    for overrides in variants:
        name = "+".join(f"{k.removeprefix('model.')}={v}" for k, v in overrides.items())
        variant_cfg = with_overrides(cfg, overrides)
        result = {"variant": name, **measure(variant_cfg, steps, warmup, profile_steps)}
        result["speedup"] = result["tokens_per_s"] / (results or [result])[0]["tokens_per_s"]
        results.append(result)
    return results


def _gib(n) -> str:
    return "n/a" if n is None else f"{n / 2**30:.3f}"


def compare_table(results: list[dict]) -> str:
    """One row per variant: step time, tokens/s, speedup, temporaries, compiled, peak, loss."""
    head = ("variant", "step_s", "tokens/s", "speedup", "temp_GiB", "compiled_GiB", "peak_GiB")
    rows = [(*head, "loss")]
    for r in results:
        rows.append(
            (
                r["variant"],
                f"{r['step_s_median']:.3f}",
                f"{r['tokens_per_s']:.1f}",
                f"{r['speedup']:.2f}x",
                _gib(r["temp_bytes_per_device"]),
                _gib(r["compiled_bytes_per_device"]),
                _gib(r["peak_bytes_in_use"]),
                f"{r['loss']:.4f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head) + 1)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows
    )


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def main(argv: list[str]) -> None:
    cli.quiet_library_logs()
    if len(argv) > 1:
        cli.usage_error(f"unexpected arguments: {' '.join(argv[1:])}")
    cfg = cli.load_config_flag(flags.FLAGS.config)
    steps, warmup = flags.FLAGS.steps, flags.FLAGS.warmup
    profile_steps = flags.FLAGS.profile_steps
    for name, value, least in (("steps", steps, 1), ("warmup", warmup, 0)):
        if value < least:
            cli.usage_error(f"--{name}={value} is not allowed: must be >= {least}")
    if profile_steps < 0:
        cli.usage_error(f"--profile_steps={profile_steps} is not allowed: must be >= 0")
    try:
        if flags.FLAGS.compare:
            variants = parse_compare(flags.FLAGS.compare)
            results = compare(cfg, variants, steps, warmup, profile_steps)
        else:
            result = measure(cfg, steps, warmup, profile_steps)
    except (ConfigError, ValueError) as e:
        cli.usage_error(str(e))
    for r in results if flags.FLAGS.compare else [result]:
        if r["profile"]:
            print(f"costliest ops of {r.get('variant', r['config'])} ({profile_steps} steps):")
            print(profile_table(r["profile"]) + "\n")
    if flags.FLAGS.compare:
        print(compare_table(results))
        print(json.dumps({"bench": "train_throughput", "variants": results}))
        sys.stdout.flush()
        return
    width = max(len(k) for k in result)
    shown = {k: v for k, v in result.items() if k != "profile"}
    print("\n".join(f"{k:<{width}}  {_fmt(v)}" for k, v in shown.items()))
    print(json.dumps({"bench": "train_throughput", **result}))
    sys.stdout.flush()


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", "configs/tiny.py", "Config file.")
    flags.DEFINE_integer("steps", 10, "Timed steps.")
    flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
    flags.DEFINE_integer("profile_steps", 0, "Steps traced with jax.profiler (0 = none).")
    flags.DEFINE_string(
        "compare",
        "",
        "Variants timed in one run: key=value[+key=value],... (e.g. loss_chunk=0,loss_chunk=1024).",
    )
    app.run(main, flags_parser=cli.parse_flags)
