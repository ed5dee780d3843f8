"""Attention kernels: forward and forward+backward time and TFLOP/s over a shape sweep.

    python3 bench/attention.py [--quick] [--dtype=bfloat16] [--causal=1] [--impls=a,b]
        [--shapes=B,L,H,G,K;...] [--segments=0,4] [--iters=10] [--warmup=2] [--rows_out=F]

Implementations: `pallas` (near_jax's flash attention through the dispatcher), `xla` and
`cudnn` (`jax.nn.dot_product_attention` with that implementation; cudnn on GPU only) and
`splash` (JAX's TPU splash attention through the dispatcher; TPU only). The default set is
what the platform can run. FLOPs: 4 * B * H * L^2 * K for the forward pass (QK^T and PV),
halved when causal; forward+backward counts 3.5x the forward (the backward's five matmuls),
the usual flash-attention accounting (packed segments do not change the count: the number
is what a dense causal kernel would do). `--segments=0,4` runs every shape twice: one
document per row, then 4 equal packed documents per row (`segment_ids`; every impl then goes
through near_jax's dispatcher, which is what the model calls). `--rows_out` appends each row
to a JSONL file as soon as it is measured, so a run cut short keeps its rows. On CPU the
Pallas kernels run in interpret mode: the numbers only show the script works (`--quick` is
the CI-sized smoke run).

Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from near_jax.model.kernels import attention as kernels_attention
from near_jax.train import metrics

# (batch, length, heads, kv_heads, head_dim)
SWEEP = [
    (8, 1024, 16, 16, 128),
    (4, 2048, 16, 16, 128),
    (2, 4096, 16, 16, 128),
    (1, 8192, 16, 16, 128),
    (2, 4096, 32, 8, 128),
    (2, 4096, 16, 16, 64),
    (1, 16384, 16, 4, 128),
]
QUICK_SWEEP = [(1, 256, 2, 1, 64), (1, 384, 4, 2, 128)]


def default_impls() -> list[str]:
    platform = jax.default_backend()
    if platform == "gpu":
        return ["pallas", "cudnn", "xla"]
    if platform == "tpu":
        return ["pallas", "splash", "xla"]
    return ["pallas", "xla"]


def attention_fn(impl: str, causal: bool, segment_ids: jax.Array | None = None):
    """(q, k, v) -> out for one implementation; with `segment_ids`, through the dispatcher."""
    if segment_ids is not None:
        return lambda q, k, v: kernels_attention(
            q, k, v, segment_ids_BxL=segment_ids, causal=causal, impl=impl
        )
    if impl in ("xla", "cudnn"):
        return lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation=impl
        )
    return lambda q, k, v: kernels_attention(q, k, v, causal=causal, impl=impl)


def attention_flops(batch, length, heads, head_dim, causal) -> float:
    """Forward FLOPs of attention scores and output; causal counts the lower half."""
    flops = 4.0 * batch * heads * length * length * head_dim
    return flops / 2 if causal else flops


def _time(fn, args, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def packed_segments(batch: int, length: int, segments: int) -> jax.Array | None:
    """[batch, length] ids of `segments` equal documents per row (None for 0: unpacked)."""
    if segments <= 0:
        return None
    ids = np.arange(length, dtype=np.int32) * segments // length
    return jnp.asarray(np.broadcast_to(ids, (batch, length)))


def measure(impl, shape, dtype, causal, iters, warmup, segments: int = 0) -> dict[str, Any]:
    """Times forward and forward+backward of `impl` on random inputs of `shape`, with
    `segments` packed documents per row (0: one unpacked document)."""
    b, length, h, g, d = shape
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((b, length, h, d)), dtype)
    k, v = (jnp.asarray(rng.standard_normal((b, length, g, d)), dtype) for _ in range(2))
    f = attention_fn(impl, causal, packed_segments(b, length, segments))
    fwd = jax.jit(f)
    fwd_bwd = jax.jit(jax.grad(lambda q, k, v: f(q, k, v).astype(jnp.float32).sum(), (0, 1, 2)))
    flops = attention_flops(b, length, h, d, causal)
    row: dict[str, Any] = dict(
        impl=impl, batch=b, length=length, heads=h, kv_heads=g, head_dim=d, segments=segments
    )
    try:
        row["fwd_ms"] = 1e3 * _time(fwd, (q, k, v), iters, warmup)
        row["fwd_bwd_ms"] = 1e3 * _time(fwd_bwd, (q, k, v), iters, warmup)
    except Exception as e:  # noqa: BLE001 - a failing impl is a row, not the end of the sweep
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        return row
    row["fwd_tflops"] = flops / row["fwd_ms"] / 1e9
    row["fwd_bwd_tflops"] = 3.5 * flops / row["fwd_bwd_ms"] / 1e9
    peak = metrics.peak_flops_per_device(jax.devices()[0])
    if peak:
        row["fwd_peak_fraction"] = row["fwd_tflops"] * 1e12 / peak
    return row


COLUMNS = [
    ("impl", "impl", "{}"),
    ("batch", "B", "{}"),
    ("length", "L", "{}"),
    ("heads", "H", "{}"),
    ("kv_heads", "G", "{}"),
    ("head_dim", "K", "{}"),
    ("segments", "S", "{}"),
    ("fwd_ms", "fwd ms", "{:.3f}"),
    ("fwd_tflops", "fwd TFLOP/s", "{:.3f}"),
    ("fwd_bwd_ms", "fwd+bwd ms", "{:.3f}"),
    ("fwd_bwd_tflops", "fwd+bwd TFLOP/s", "{:.3f}"),
    ("fwd_peak_fraction", "fwd % peak", "{:.1%}"),
]


_FIRST_NUMBER = [key for key, _, _ in COLUMNS].index("fwd_ms")


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as an aligned text table (errors in place of numbers)."""
    cells = [[title for _, title, _ in COLUMNS]]
    for row in rows:
        line = []
        for key, _, fmt in COLUMNS:
            value = row.get(key)
            line.append("-" if value is None else fmt.format(value))
        if "error" in row:
            line[_FIRST_NUMBER] = row["error"]
            line[_FIRST_NUMBER + 1 :] = [""] * (len(COLUMNS) - _FIRST_NUMBER - 1)
        cells.append(line)
    widths = [max(len(c[i]) for c in cells if i < len(c)) for i in range(len(COLUMNS))]
    widths[_FIRST_NUMBER] = min(widths[_FIRST_NUMBER], 12)
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in cells
    )


def parse_shapes(text: str) -> list[tuple[int, ...]]:
    shapes = []
    for part in filter(None, text.split(";")):
        shape = tuple(int(x) for x in part.split(","))
        if len(shape) != 5:
            raise argparse.ArgumentTypeError(f"shape {part!r} is not B,L,H,G,K")
        shapes.append(shape)
    return shapes


def parse_segments(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x]
    except ValueError:
        values = []
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"segments {text!r} is not a comma list of ints >= 0")
    return values


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sweep (CPU smoke run)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--causal", type=int, default=1, choices=[0, 1])
    parser.add_argument("--impls", default="", help="comma-separated; default: the platform's")
    parser.add_argument("--shapes", type=parse_shapes, default=None, help="B,L,H,G,K;...")
    parser.add_argument(
        "--segments", type=parse_segments, default=[0], help="packed documents per row; 0: none"
    )
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rows_out", default="", help="append each row to this JSONL file")
    args = parser.parse_args(argv)

    impls = [s for s in args.impls.split(",") if s] or default_impls()
    shapes = args.shapes or (QUICK_SWEEP if args.quick else SWEEP)
    iters, warmup = (2, 1) if args.quick else (args.iters, args.warmup)
    dtype, causal = jnp.dtype(args.dtype), bool(args.causal)
    rows = []
    for segments in args.segments:
        for shape in shapes:
            for impl in impls:
                row = measure(impl, shape, dtype, causal, iters, warmup, segments)
                rows.append(row)
                if args.rows_out:
                    with open(args.rows_out, "a") as f:
                        f.write(json.dumps(row) + "\n")
    device = jax.devices()[0]
    print(
        f"attention | {device.device_kind} ({jax.default_backend()}) | {args.dtype} | "
        f"causal={causal} | jax {jax.__version__}"
    )
    print(table(rows))
    print(
        json.dumps(
            dict(
                bench="attention",
                device=device.device_kind,
                platform=jax.default_backend(),
                jax=jax.__version__,
                dtype=args.dtype,
                causal=causal,
                rows=rows,
            )
        )
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
